// The detail view of one image, in a modal <dialog> (focus stays inside; Escape closes it). It is
// opened by the URL (#/images/<id>), so it can be linked to and the back button closes it.

import { AuthRequired, deleteImage, getImage, retryJob } from "./api.js";
import { fill, h } from "./dom.js";
import * as fmt from "./format.js";
import { altText } from "./grid.js";

const RETRYABLE = new Set(["failed", "skipped", "unavailable"]);
const JOB_KINDS = ["thumbnail", "exif", "caption"];

function shown(record) {
  const { metadata, jobs } = record.data;
  return JSON.stringify([record.status, record.error, metadata, jobs]);
}

export class Detail {
  constructor(dialog, { onClosed, onDeleted }) {
    this.dialog = dialog;
    this.title = dialog.querySelector("#detail-title");
    this.body = dialog.querySelector("#detail-body");
    this.onClosed = onClosed;
    this.onDeleted = onDeleted;
    this.imageId = null;
    this.record = null;
    dialog.querySelector("#detail-close").addEventListener("click", () => dialog.close());
    // Escape, the close button and a click on the backdrop all end here; main.js then fixes the
    // URL (back, or replace when the page was opened on this image's link).
    dialog.addEventListener("close", () => {
      const id = this.imageId;
      this.imageId = null;
      this.record = null;
      this.onClosed(id);
    });
    dialog.addEventListener("click", (event) => {
      if (event.target === dialog) dialog.close(); // the backdrop
    });
  }

  get openId() {
    return this.imageId;
  }

  async open(imageId, known = null) {
    if (this.imageId === imageId && this.dialog.open) return;
    this.imageId = imageId;
    this.record = null;
    this.preview = null;
    this.zone = null;
    this.title.textContent = known?.data.original_name || "Image";
    fill(this.body, h("p", { class: "loading" }, "Loading…"));
    if (!this.dialog.open) this.dialog.showModal();
    if (known) this.render(known);
    try {
      const record = await getImage(imageId);
      if (this.imageId === imageId) this.render(record);
    } catch (error) {
      if (this.imageId !== imageId || error instanceof AuthRequired) return;
      const message = error.status === 404 ? "There is no image with this id." : error.message;
      fill(this.body, h("p", { class: "action-error", role: "alert" }, message));
    }
  }

  close() {
    if (this.dialog.open) this.dialog.close();
  }

  /** A newer record of the open image (from the event stream). */
  update(record) {
    if (!this.dialog.open || record.data.image_id !== this.imageId) return;
    // Only what the view shows: signed URLs change every few minutes without anything else.
    if (this.record && shown(this.record) === shown(record)) return;
    this.render(record);
  }

  render(record) {
    // Re-rendering keeps the preview (no reload, no flicker), the delete confirmation if one is
    // open, the scroll position and, where its element went away, keyboard focus in the dialog.
    const scroll = this.dialog.scrollTop;
    const hadFocus = this.body.contains(document.activeElement);
    const previous = this.record;
    const same = previous?.data.image_id === record.data.image_id;
    this.record = record;
    const data = record.data;
    this.title.textContent = data.original_name || data.image_id;
    const failed = record.status === "failed";
    const left = h("div", { class: "preview" });
    const right = h("div", { class: "info" });
    if (failed) {
      left.append(
        h("img", { src: "/web/failed.svg", alt: altText(record), width: 256, height: 192 }),
      );
      right.append(
        h("h3", {}, "Upload failed"),
        h("p", { class: "action-error" }, record.error || "upload failed"),
        this.facts(record),
      );
    } else {
      if (!same || !this.preview) this.preview = this.previewImage(record);
      this.preview.alt = altText(record);
      left.append(this.preview, this.links(record));
      right.append(this.facts(record), this.location(record), this.jobs(record), this.exif(record));
    }
    if (!same || !this.zone) this.zone = this.deleteZone(record);
    right.append(this.zone);
    fill(this.body, left, right);
    this.dialog.scrollTop = scroll;
    if (hadFocus && !this.body.contains(document.activeElement)) {
      this.dialog.querySelector("#detail-close").focus();
    }
  }

  previewImage(record) {
    const m = record.data.metadata;
    return h("img", {
      src: record.data.thumbnails.medium,
      alt: altText(record),
      // The shown size, scaled into the medium box: the space is kept while it loads.
      width: m.display_width,
      height: m.display_height,
      decoding: "async",
    });
  }

  links(record) {
    const data = record.data;
    return h(
      "p",
      { class: "links" },
      h("a", { href: data.original, download: data.original_name || "" }, "Download original"),
      h("a", { href: data.original, target: "_blank", rel: "noopener" }, "Open original"),
    );
  }

  facts(record) {
    const data = record.data;
    const m = data.metadata || {};
    const rows = [];
    const add = (label, value, attrs = {}) => {
      if (value === null || value === undefined || value === "") return;
      rows.push(h("dt", {}, label), h("dd", attrs, value));
    };
    if (record.status !== "failed") {
      const captionJob = data.jobs?.caption?.state;
      const pending = captionJob === "queued" || captionJob === "running";
      add("Caption", m.caption || (pending ? "(not yet)" : "(none)"), {
        dataset: { fact: "caption" },
      });
      add("Dimensions", `${m.display_width} × ${m.display_height} px`, {
        dataset: { fact: "dimensions" },
      });
      add("Format", (m.format || "").toUpperCase() + (m.frames > 1 ? `, ${m.frames} frames` : ""));
      add("Size", `${fmt.bytes(m.size_bytes)} (${m.size_bytes?.toLocaleString()} bytes)`);
    }
    add(
      "Uploaded",
      h("time", { datetime: data.processed_at }, fmt.dateTime(data.processed_at)),
    );
    add("Image id", h("code", {}, data.image_id));
    if (m.sha256) add("SHA-256", h("code", {}, m.sha256));
    return h("dl", { class: "facts" }, rows);
  }

  location(record) {
    const exif = record.data.metadata?.exif;
    const lat = exif?.latitude;
    const lon = exif?.longitude;
    if (typeof lat !== "number" || typeof lon !== "number") return null;
    return h(
      "section",
      { class: "location", "aria-labelledby": "location-title" },
      h("h3", { id: "location-title" }, "Location"),
      h(
        "p",
        {},
        `${fmt.coordinate(lat, "N", "S")}, ${fmt.coordinate(lon, "E", "W")} `,
        h(
          "a",
          {
            class: "osm-link",
            href: fmt.osmUrl(lat, lon),
            target: "_blank",
            rel: "noopener noreferrer",
          },
          "Show on OpenStreetMap",
        ),
      ),
    );
  }

  jobs(record) {
    const jobs = record.data.jobs || {};
    const rows = JOB_KINDS.filter((kind) => jobs[kind]).map((kind) => {
      const job = jobs[kind];
      const message = h("span", { class: "action-error", role: "status" });
      const retry = RETRYABLE.has(job.state)
        ? h(
            "button",
            {
              type: "button",
              class: "retry",
              dataset: { kind },
              onclick: async (event) => {
                const button = event.currentTarget;
                button.disabled = true;
                message.textContent = "";
                try {
                  await retryJob(record.data.image_id, kind);
                  message.textContent = "";
                  button.textContent = "Queued";
                } catch (error) {
                  button.disabled = false;
                  if (!(error instanceof AuthRequired)) message.textContent = error.message;
                }
              },
            },
            "Retry",
          )
        : null;
      return h(
        "tr",
        { dataset: { kind, state: job.state } },
        h("th", { scope: "row" }, kind),
        h("td", { class: "state" }, job.state),
        // A failure in the error colour; why a job was skipped or is unavailable, plainly.
        h("td", { class: job.state === "failed" ? "error" : "reason" }, job.error || ""),
        h("td", {}, retry, message),
      );
    });
    if (rows.length === 0) return null;
    return h(
      "section",
      { "aria-labelledby": "jobs-title" },
      h("h3", { id: "jobs-title" }, "Processing"),
      h(
        "table",
        { class: "jobs-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", { scope: "col" }, "Job"),
            h("th", { scope: "col" }, "State"),
            h("th", { scope: "col" }, "Error"),
            h("td", {}),
          ),
        ),
        h("tbody", {}, rows),
      ),
    );
  }

  exif(record) {
    const exif = record.data.metadata?.exif;
    const section = h(
      "section",
      { "aria-labelledby": "exif-title" },
      h("h3", { id: "exif-title" }, "EXIF"),
    );
    if (!exif || Object.keys(exif).length === 0) {
      const state = record.data.jobs?.exif?.state;
      section.append(
        h("p", {}, state === "done" || !state ? "No EXIF data." : `EXIF: ${state}…`),
      );
      return section;
    }
    const row = (tag, value, label = fmt.exifLabel(tag)) =>
      h(
        "tr",
        { dataset: { tag } },
        h("th", { scope: "row", title: tag }, label),
        h("td", {}, fmt.exifValue(tag, value)),
      );
    const groups = [h("tbody", {}, fmt.orderedExif(exif).map(([tag, v]) => row(tag, v)))];
    const gps = exif.GPSInfo;
    if (gps && typeof gps === "object" && !Array.isArray(gps)) {
      groups.push(
        h(
          "tbody",
          { class: "exif-group" },
          h("tr", {}, h("th", { colspan: 2, scope: "colgroup" }, "GPS")),
          Object.keys(gps)
            .sort((a, b) => a.localeCompare(b))
            .map((tag) => row(tag, gps[tag])),
        ),
      );
    }
    section.append(h("table", { class: "exif-table" }, groups));
    return section;
  }

  deleteZone(record) {
    const id = record.data.image_id;
    const zone = h("div", { class: "danger-zone" });
    const message = h("p", { class: "action-error", role: "alert" });
    const ask = h(
      "button",
      {
        type: "button",
        class: "delete",
        onclick: () => {
          const name = record.data.original_name || id;
          const confirmButton = h(
            "button",
            {
              type: "button",
              class: "danger confirm-delete",
              onclick: async () => {
                confirmButton.disabled = true;
                try {
                  await deleteImage(id);
                  this.onDeleted(id);
                  this.close();
                } catch (error) {
                  confirmButton.disabled = false;
                  if (error.status === 404) {
                    this.onDeleted(id);
                    this.close();
                  } else if (!(error instanceof AuthRequired)) {
                    message.textContent = error.message;
                  }
                }
              },
            },
            "Delete",
          );
          const keep = h(
            "button",
            { type: "button", onclick: () => fill(zone, ask, message) },
            "Keep it",
          );
          fill(
            zone,
            h(
              "div",
              { class: "confirm", role: "group", "aria-label": "Confirm delete" },
              h("p", {}, `Delete “${name}” for good? Its original and thumbnails go with it.`),
              confirmButton,
              keep,
            ),
            message,
          );
          keep.focus();
        },
      },
      "Delete…",
    );
    zone.append(ask, message);
    return zone;
  }
}
