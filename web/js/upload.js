// Uploads: files from the picker or dropped anywhere on the page, a few in flight at once, each
// with its own row (progress bar from XHR upload progress, then the result or the server's error).

import { rememberDeleteToken, upload } from "./api.js";
import { h } from "./dom.js";
import * as fmt from "./format.js";

// Enough to keep the connection busy while the server validates the previous file; more only
// splits the same bandwidth.
const IN_FLIGHT = 3;
// A finished row goes after a moment (the card is in the grid); a failed one stays until dismissed.
const DONE_ROW_MS = 3000;
// Answers worth trying again as they are: no key yet, too many uploads, the server or network.
const TRANSIENT = new Set([0, 401, 403, 408, 429, 500, 502, 503, 504, 507]);

export class Uploader {
  constructor({ input, dropzone, list, onUploaded }) {
    this.list = list;
    this.dropzone = dropzone;
    this.onUploaded = onUploaded;
    this.queue = [];
    this.active = 0;
    input.addEventListener("change", () => {
      this.add(input.files);
      input.value = ""; // the same files may be chosen again
    });
    this.listenForDrops();
  }

  listenForDrops() {
    // Anywhere on the page: a drop that misses the zone would otherwise open the file in the tab.
    let depth = 0;
    const hasFiles = (event) => event.dataTransfer?.types?.includes("Files");
    document.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      depth += 1;
      document.body.classList.add("dragging");
    });
    document.addEventListener("dragleave", (event) => {
      if (!hasFiles(event)) return;
      depth = Math.max(0, depth - 1);
      if (depth === 0) document.body.classList.remove("dragging");
    });
    document.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    document.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      depth = 0;
      document.body.classList.remove("dragging");
      this.add(event.dataTransfer.files);
    });
  }

  add(files) {
    for (const file of Array.from(files || [])) {
      const item = this.row(file);
      this.list.prepend(item.li);
      this.queue.push(item);
    }
    this.pump();
  }

  row(file) {
    const progress = h("progress", { max: 1, value: 0, "aria-label": `Upload of ${file.name}` });
    const message = h("span", { class: "message" }, `${fmt.bytes(file.size)}, waiting…`);
    const actions = h("span", { class: "row-actions" });
    const li = h(
      "li",
      { class: "upload-row", dataset: { state: "waiting", fileName: file.name } },
      h("span", { class: "file-name" }, file.name),
      progress,
      actions,
      message,
    );
    return { file, li, progress, message, actions };
  }

  pump() {
    while (this.active < IN_FLIGHT && this.queue.length > 0) {
      const item = this.queue.shift();
      this.active += 1;
      this.send(item).finally(() => {
        this.active -= 1;
        this.pump();
      });
    }
  }

  async send(item) {
    const { li, progress, message, actions } = item;
    li.dataset.state = "uploading";
    actions.replaceChildren();
    progress.value = 0;
    message.textContent = "uploading…";
    let answer;
    try {
      answer = await upload(item.file, (fraction) => {
        progress.value = fraction;
        message.textContent =
          fraction < 1 ? `uploading… ${Math.round(fraction * 100)}%` : "checking…";
      });
    } catch (error) {
      this.failed(item, error.message || "the connection failed", 0);
      return;
    }
    const { status, body } = answer;
    if (status === 201 && body?.data) {
      progress.value = 1;
      li.dataset.state = "done";
      li.dataset.imageId = body.data.image_id;
      message.textContent = "uploaded";
      rememberDeleteToken(body.data.image_id, body.delete_token);
      this.onUploaded(body);
      setTimeout(() => li.remove(), DONE_ROW_MS);
      return;
    }
    // The server's own words: "file type ".xlsx" is not allowed (allowed: ...)".
    const reason = body?.error || `the server answered ${status}`;
    this.failed(item, reason, status);
    if (body?.data?.image_id) this.onUploaded(body); // failed uploads are recorded too
  }

  failed(item, reason, status) {
    const { li, message, actions } = item;
    li.dataset.state = "failed";
    message.textContent = reason;
    const dismiss = h(
      "button",
      { type: "button", "aria-label": `Dismiss ${item.file.name}`, onclick: () => li.remove() },
      "Dismiss",
    );
    const again = TRANSIENT.has(status)
      ? h(
          "button",
          {
            type: "button",
            onclick: () => {
              this.queue.push(item);
              li.dataset.state = "waiting";
              message.textContent = "waiting…";
              actions.replaceChildren();
              this.pump();
            },
          },
          "Try again",
        )
      : null;
    actions.replaceChildren(...[again, dismiss].filter(Boolean));
  }
}
