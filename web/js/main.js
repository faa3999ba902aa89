// The gallery: wires the grid, the uploads, the detail view, the header and the live events
// together, on the public API only. In keys mode a 401 from any call brings up the key prompt.

import * as api from "./api.js";
import { Detail } from "./detail.js";
import { EventStream } from "./events.js";
import { Grid } from "./grid.js";
import { Stats } from "./stats.js";
import { Uploader } from "./upload.js";

const $ = (id) => document.getElementById(id);

const notice = $("notice");
function showError(error, action = null) {
  notice.replaceChildren(error?.message || String(error));
  notice.dataset.status = String(error?.status ?? "");
  if (action) notice.append(" ", action);
  notice.hidden = false;
}
function clearError() {
  notice.hidden = true;
  notice.textContent = "";
  delete notice.dataset.status;
}

const stats = new Stats($("stats"), { onError: showError });
const grid = new Grid($("grid"), $("sentinel"), $("grid-status"), { onError: showError });

// -- the detail view and the URL ------------------------------------------------------------------

const DETAIL_ROUTE = /^#\/images\/([^/?#]+)$/;
// Whether the open detail was reached by a navigation inside this page (then closing it goes back
// in history), or by opening the page on its link (then closing it replaces the URL).
let openedHere = false;

const detail = new Detail($("detail"), {
  onClosed(imageId) {
    if (DETAIL_ROUTE.test(location.hash)) {
      if (openedHere) history.back();
      else history.replaceState(null, "", location.pathname + location.search);
    }
    openedHere = false;
    // Back to the card it was opened from, for keyboard users.
    const card = imageId && document.querySelector(`.card[data-image-id="${CSS.escape(imageId)}"]`);
    (card || $("grid")).focus();
  },
  onDeleted(imageId) {
    grid.remove(imageId);
    stats.refreshSoon();
  },
});
grid.onRecord = (record) => detail.update(record);

function route(fromNavigation) {
  const match = location.hash.match(DETAIL_ROUTE);
  if (match) {
    const imageId = decodeURIComponent(match[1]);
    if (fromNavigation && detail.openId === null) openedHere = true;
    detail.open(imageId, grid.record(imageId));
  } else {
    detail.close();
  }
}
window.addEventListener("hashchange", () => route(true));

// -- the live stream ---------------------------------------------------------------------------------

const live = $("live");
const LIVE_TEXT = {
  live: "live",
  reconnecting: "reconnecting…",
  off: "paused",
  connecting: "connecting…",
};

const events = new EventStream("/api/events", {
  onState(state) {
    const wasAway = live.dataset.state === "reconnecting";
    live.dataset.state = state;
    live.textContent = LIVE_TEXT[state] || state;
    if (state === "live" && wasAway) {
      // Back: a "cannot be reached" from meanwhile is over, and the figures moved on.
      if (notice.dataset.status === String(api.UNREACHABLE)) clearError();
      stats.refreshSoon();
    }
  },
  onGap() {
    // Reconnected with no event id to resume from: what happened meanwhile is unknown.
    grid.reload();
    stats.refreshSoon();
  },
  onEvent(event) {
    const id = event.image_id;
    switch (event.type) {
      case "image.deleted":
        grid.remove(id);
        if (detail.openId === id) detail.close();
        break;
      case "image.uploaded":
        // Uploads of other tabs and people show up too; this tab's own are already there.
        grid.refresh(id, { add: !grid.has(id) });
        break;
      default:
        // job.started / job.queued / job.done / job.failed / image.ready: the state at once, then
        // the record for what else changed (caption, thumbnail, EXIF).
        // A card still being fetched (its image.uploaded just came) is fetched once more: the
        // answer in flight may predate this event.
        grid.jobEvent(event);
        if (grid.follows(id) || detail.openId === id) grid.refresh(id);
    }
    stats.refreshSoon();
  },
});

// -- keys --------------------------------------------------------------------------------------------

const keyDialog = $("key-dialog");
const keyForm = $("key-form");
const keyInput = $("key-input");
const keyError = $("key-error");
let started = false;

api.onAuthRequired((message) => {
  // The key in use (if any) was refused: forget it and ask again, with the server's reason.
  const hadKey = api.key() !== null;
  api.setKey(null);
  events.stop();
  started = false;
  // Only a refused key has a reason worth showing. A request sent without one while the prompt
  // is up (a click, the stream) would replace why the last key was refused with "a key is
  // required".
  if (hadKey) keyError.textContent = message;
  else if (!keyDialog.open) keyError.textContent = "";
  if (!keyDialog.open) {
    if (detail.openId !== null) detail.close();
    keyDialog.showModal();
  }
  keyInput.select();
});

keyDialog.addEventListener("cancel", (event) => {
  // Nothing can be shown without a key: the prompt stays until one is accepted.
  event.preventDefault();
});
keyDialog.addEventListener("close", () => {
  // Closed without a key all the same (a browser may force a dialog shut on repeated Escape):
  // leave a way back to the prompt.
  if (started) return;
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "Enter an API key";
  again.addEventListener("click", () => {
    clearError();
    keyDialog.showModal();
  });
  showError(new Error("This gallery needs an API key."), again);
});

keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const value = keyInput.value.trim();
  if (!value) return;
  api.setKey(value);
  keyError.textContent = "checking…";
  try {
    await stats.load();
  } catch (error) {
    // A 401 has already put the server's message in the prompt.
    if (!(error instanceof api.AuthRequired)) keyError.textContent = error.message;
    return;
  }
  keyError.textContent = "";
  keyInput.value = "";
  keyDialog.close();
  start();
});

// -- the filter --------------------------------------------------------------------------------------

const failedOnly = $("failed-only");
function filterFromUrl() {
  return new URLSearchParams(location.search).get("status") === "failed" ? "failed" : null;
}
failedOnly.checked = filterFromUrl() === "failed";
failedOnly.addEventListener("change", () => {
  const params = new URLSearchParams(location.search);
  if (failedOnly.checked) params.set("status", "failed");
  else params.delete("status");
  const query = params.toString();
  // In the URL, so that a reload or a shared link keeps the filter.
  history.replaceState(history.state, "", `${location.pathname}${query ? `?${query}` : ""}${location.hash}`);
  grid.reload(failedOnly.checked ? "failed" : null);
});

// -- uploads -----------------------------------------------------------------------------------------

new Uploader({
  input: $("file-input"),
  dropzone: $("dropzone"),
  list: $("uploads"),
  onUploaded(record) {
    grid.upsert(record, "ordered");
    stats.refreshSoon();
  },
});

// -- start -------------------------------------------------------------------------------------------

function start() {
  if (started) return;
  started = true;
  clearError();
  // The stream first: an event that happens while the first page loads is not missed.
  events.start();
  grid.reload(filterFromUrl());
  stats.refreshSoon();
  route(false);
}

async function boot() {
  try {
    await stats.load();
  } catch (error) {
    if (error instanceof api.AuthRequired) return; // the prompt is up; start() follows a key
    showError(error);
  }
  start();
}

boot();
