// Building DOM nodes without HTML strings: file names, captions and EXIF come from uploaders, so
// every text goes in as a text node or an attribute value, never through innerHTML.

/**
 * h("a", {href: "#", class: "x", dataset: {imageId: id}, onclick: fn}, "text", child)
 * Attribute values are set with setAttribute (no "style" attributes: the CSP forbids them).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replaces an element's children (text or nodes). */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}
