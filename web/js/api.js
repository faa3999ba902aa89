// The public API, as the page calls it: the key (keys mode), JSON requests, the Link header,
// uploads with progress. A 401 anywhere hands over to the key prompt (see main.js).

const KEY_STORAGE = "imgapi.key";
const TOKENS_STORAGE = "imgapi.deleteTokens";

/** A 401: no key, or one the server refused. The prompt is already up when this is thrown. */
export class AuthRequired extends Error {}

/** Any other non-2xx answer; `message` is the server's own error text. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let authHandler = () => {};

/** Called with the server's message on every 401. */
export function onAuthRequired(handler) {
  authHandler = handler;
}

/** For callers that read a 401 themselves (the event stream, uploads). */
export function unauthorized(message) {
  authHandler(message);
}

// sessionStorage: the key lives as long as the tab, never in a cookie (no CSRF to think about)
// and never in a URL (nor in history, logs or a Referer).
export function key() {
  return sessionStorage.getItem(KEY_STORAGE);
}

export function setKey(value) {
  if (value) sessionStorage.setItem(KEY_STORAGE, value);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export function authHeaders() {
  const k = key();
  return k ? { Authorization: `Bearer ${k}` } : {};
}

// The delete tokens of this tab's uploads: with one, an upload-only key can still delete what it
// uploaded (X-Delete-Token). Only for this tab, like the key.
function tokens() {
  try {
    return JSON.parse(sessionStorage.getItem(TOKENS_STORAGE) || "{}");
  } catch {
    return {};
  }
}

export function rememberDeleteToken(imageId, token) {
  if (!token) return;
  const all = tokens();
  all[imageId] = token;
  sessionStorage.setItem(TOKENS_STORAGE, JSON.stringify(all));
}

function forgetDeleteToken(imageId) {
  const all = tokens();
  if (imageId in all) {
    delete all[imageId];
    sessionStorage.setItem(TOKENS_STORAGE, JSON.stringify(all));
  }
}

export async function errorText(res) {
  try {
    const body = await res.json();
    if (body && typeof body.error === "string" && body.error) return body.error;
  } catch {
    // not JSON: fall through to the status line
  }
  return `${res.status} ${res.statusText || "error"}`.trim();
}

/** The server did not answer at all (down, restarting, offline). */
export const UNREACHABLE = 0;

export async function request(path, { method = "GET", headers = {}, signal } = {}) {
  let res;
  try {
    res = await fetch(path, {
      method,
      signal,
      cache: "no-store",
      headers: { Accept: "application/json", ...authHeaders(), ...headers },
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    // fetch's own words ("Failed to fetch") say nothing to a person.
    throw new ApiError(UNREACHABLE, "The server cannot be reached; retrying when it is back.");
  }
  if (res.status === 401) {
    const message = await errorText(res);
    authHandler(message);
    throw new AuthRequired(message);
  }
  if (!res.ok) throw new ApiError(res.status, await errorText(res));
  return res;
}

export async function getJSON(path, options) {
  const res = await request(path, options);
  return { body: await res.json(), res };
}

/** The rel="next" target of a Link header, as a path on this origin (the page's CSP allows only
 * 'self'; the server writes absolute URLs with PUBLIC_URL, which may name another host). */
export function nextLink(res) {
  const header = res.headers.get("Link");
  if (!header) return null;
  for (const part of header.split(",")) {
    const match = part.match(/<([^>]*)>\s*;(.*)/);
    if (match && /\brel="?next"?/.test(match[2])) {
      const url = new URL(match[1], location.href);
      return url.pathname + url.search;
    }
  }
  return null;
}

export function imagePath(imageId) {
  return `/api/images/${encodeURIComponent(imageId)}`;
}

export async function getImage(imageId) {
  return (await getJSON(imagePath(imageId))).body;
}

export async function deleteImage(imageId) {
  const token = tokens()[imageId];
  await request(imagePath(imageId), {
    method: "DELETE",
    headers: token ? { "X-Delete-Token": token } : {},
  });
  forgetDeleteToken(imageId);
}

export async function retryJob(imageId, kind) {
  const res = await request(`${imagePath(imageId)}/jobs/${encodeURIComponent(kind)}/retry`, {
    method: "POST",
  });
  return res.json();
}

/**
 * POST /api/images with XMLHttpRequest: fetch() reports no upload progress. Resolves with
 * {status, body} for any HTTP answer (the caller shows the server's error on the file) and
 * rejects only when no answer came (network error, abort).
 */
export function upload(file, onProgress, signal) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/api/images");
    xhr.responseType = "json";
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && event.total > 0) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      const body = xhr.response;
      if (xhr.status === 401) authHandler(body?.error || "an API key is required");
      resolve({ status: xhr.status, body });
    });
    xhr.addEventListener("error", () => reject(new Error("the connection failed")));
    xhr.addEventListener("abort", () => reject(new DOMException("cancelled", "AbortError")));
    signal?.addEventListener("abort", () => xhr.abort());
    const form = new FormData();
    form.append("file", file, file.name);
    xhr.send(form);
  });
}
