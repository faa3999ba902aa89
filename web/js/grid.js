// The grid of cards: newest first, pages followed through the Link header as the end of the
// grid scrolls into view, each card kept current from the event stream.

import { AuthRequired, getImage, getJSON, nextLink } from "./api.js";
import { fill, h } from "./dom.js";

const PAGE_SIZE = 48;
const JOB_KINDS = ["thumbnail", "exif", "caption"];
const FAILED_PLACEHOLDER = "/web/failed.svg";
// Wide screens show cards about 220-300 px wide; a phone shows one card across the screen.
const SIZES = "(max-width: 600px) 100vw, 300px";

export function altText(record) {
  const data = record.data;
  return data.metadata?.caption || data.original_name || data.image_id;
}

export function imageHash(imageId) {
  return `#/images/${encodeURIComponent(imageId)}`;
}

/** Job chips: one per kind, its state in data-state (styled, and what the tests read). */
export function jobChips(jobs) {
  return JOB_KINDS.filter((kind) => jobs?.[kind]).map((kind) =>
    h(
      "span",
      {
        class: "job",
        dataset: { kind, state: jobs[kind].state },
        title: jobs[kind].error || null,
      },
      `${kind}: ${jobs[kind].state}`,
    ),
  );
}

function sortKey(record) {
  return `${record.data.processed_at}|${record.data.image_id}`;
}

export class Grid {
  constructor(list, sentinel, status, { onError }) {
    this.list = list;
    this.sentinel = sentinel;
    this.status = status;
    this.onError = onError;
    this.cards = new Map(); // image_id -> {li, card, img, name, caption, error, jobs, record}
    this.filter = null; // null (everything) or "failed"
    this.next = null;
    this.loading = false;
    this.generation = 0; // a reload makes the answers of older page requests stale
    this.refreshing = new Map(); // image_id -> {again: bool}: one request per image at a time
    this.observer = new IntersectionObserver(
      (entries) => {
        if (entries.some((e) => e.isIntersecting)) this.loadMore();
      },
      { rootMargin: "800px 0px" },
    );
    this.observer.observe(sentinel);
  }

  listPath() {
    const query = new URLSearchParams({ limit: String(PAGE_SIZE) });
    if (this.filter) query.set("status", this.filter);
    return `/api/images?${query}`;
  }

  async reload(filter = this.filter) {
    this.generation += 1;
    this.filter = filter;
    this.cards.clear();
    this.list.replaceChildren();
    this.next = this.listPath();
    this.loading = false;
    await this.loadMore();
  }

  async loadMore() {
    if (this.loading || !this.next) return;
    const generation = this.generation;
    this.loading = true;
    this.status.textContent = "Loading…";
    try {
      const { body, res } = await getJSON(this.next);
      if (generation !== this.generation) return;
      for (const record of body) this.upsert(record, "end");
      this.next = nextLink(res);
      this.status.textContent = this.emptyText();
    } catch (error) {
      if (generation !== this.generation) return;
      this.status.textContent = "";
      if (!(error instanceof AuthRequired)) this.onError(error);
      this.next = null;
      return;
    } finally {
      if (generation === this.generation) this.loading = false;
    }
    // The observer fires on changes only: a page that did not fill the screen asks for the next.
    if (this.next && this.sentinelNearby()) this.loadMore();
  }

  sentinelNearby() {
    return this.sentinel.getBoundingClientRect().top < window.innerHeight + 800;
  }

  emptyText() {
    if (this.cards.size > 0) return this.next ? "" : "That is all.";
    return this.filter === "failed" ? "No failed uploads." : "No images yet: drop some above.";
  }

  has(imageId) {
    return this.cards.has(imageId);
  }

  record(imageId) {
    return this.cards.get(imageId)?.record ?? null;
  }

  /** Adds or updates the card of a record: in order (uploads, events) or last (pages). */
  upsert(record, where = "ordered") {
    const id = record.data.image_id;
    if (this.filter === "failed" && record.status !== "failed") return;
    let entry = this.cards.get(id);
    if (!entry) {
      entry = this.create(record);
      if (where === "end") this.list.append(entry.li);
      else if (!this.placeInOrder(entry.li, record)) return;
      this.cards.set(id, entry);
    }
    this.update(entry, record);
    this.status.textContent = this.emptyText();
  }

  /** Puts a new card before the first older one: several uploads at once answer in any order,
   * and the grid keeps the API's order (processed_at, then image_id, newest first). False when
   * the card belongs to a page not loaded yet (that page brings it). */
  placeInOrder(li, record) {
    const key = sortKey(record);
    for (let other = this.list.firstElementChild; other; other = other.nextElementSibling) {
      const card = this.cards.get(other.firstElementChild?.dataset.imageId);
      if (card && sortKey(card.record) < key) {
        this.list.insertBefore(li, other);
        return true;
      }
    }
    if (this.next && !this.loading) return false;
    this.list.append(li);
    return true;
  }

  create(record) {
    const id = record.data.image_id;
    const img = h("img", { alt: "", loading: "lazy", decoding: "async" });
    // A signed URL that expired while the page was open, or a thumbnail not there yet: ask for
    // the record again (fresh URLs) once; after that, the placeholder.
    img.addEventListener("error", () => {
      if (img.dataset.retried) {
        img.removeAttribute("srcset");
        img.src = FAILED_PLACEHOLDER;
        return;
      }
      img.dataset.retried = "1";
      delete img.dataset.src;
      this.refresh(id);
    });
    const name = h("span", { class: "card-name" });
    const caption = h("span", { class: "card-caption" });
    const error = h("span", { class: "card-error" });
    const jobs = h("span", { class: "jobs" });
    const card = h(
      "a",
      { class: "card", href: imageHash(id), dataset: { imageId: id } },
      h("span", { class: "thumb" }, img),
      h("span", { class: "card-meta" }, name, caption, error, jobs),
    );
    const li = h("li", {}, card);
    return { li, card, img, name, caption, error, jobs, record };
  }

  update(entry, record) {
    entry.record = record;
    const data = record.data;
    const failed = record.status === "failed";
    entry.card.dataset.status = record.status;
    entry.name.textContent = data.original_name || data.image_id;
    entry.caption.textContent = data.metadata?.caption || "";
    entry.error.textContent = failed ? record.error || "upload failed" : "";
    entry.img.alt = altText(record);
    this.setImage(entry.img, failed ? null : data.thumbnails);
    fill(entry.jobs, jobChips(data.jobs));
  }

  setImage(img, thumbnails) {
    if (!thumbnails?.small) {
      if (img.dataset.src !== FAILED_PLACEHOLDER) {
        img.removeAttribute("srcset");
        img.src = FAILED_PLACEHOLDER;
        img.dataset.src = FAILED_PLACEHOLDER;
      }
      return;
    }
    // Set once: a signed URL's expiry moves every few minutes, and setting the same image again
    // under a new URL would load it again.
    if (img.dataset.src) return;
    img.sizes = SIZES;
    img.srcset = `${thumbnails.small} 256w, ${thumbnails.medium} 768w`;
    img.src = thumbnails.small;
    img.dataset.src = thumbnails.small;
  }

  /** Shows an event's job state at once; the record follows (refresh). */
  jobEvent(event) {
    const entry = this.cards.get(event.image_id);
    if (!entry || !event.kind) return;
    const chip = entry.jobs.querySelector(`.job[data-kind="${CSS.escape(event.kind)}"]`);
    if (chip) {
      chip.dataset.state = event.state;
      chip.textContent = `${event.kind}: ${event.state}`;
    }
  }

  remove(imageId) {
    const entry = this.cards.get(imageId);
    if (!entry) return;
    const wasFocused = entry.card.contains(document.activeElement);
    const neighbour = entry.li.nextElementSibling || entry.li.previousElementSibling;
    entry.li.remove();
    this.cards.delete(imageId);
    this.status.textContent = this.emptyText();
    // Keyboard users keep their place rather than falling back to the top of the page.
    if (wasFocused) (neighbour?.querySelector(".card") || this.list).focus();
  }

  /** Whether the image's card is shown or on its way (its record is being fetched). */
  follows(imageId) {
    return this.cards.has(imageId) || this.refreshing.has(imageId);
  }

  /** GET the record again (after an event); several calls while one is out make one more. */
  async refresh(imageId, { add = false } = {}) {
    const running = this.refreshing.get(imageId);
    if (running) {
      running.again = true;
      running.add ||= add;
      return;
    }
    const state = { again: false, add };
    this.refreshing.set(imageId, state);
    try {
      do {
        state.again = false;
        const generation = this.generation;
        const record = await getImage(imageId);
        if (generation !== this.generation) continue;
        if (this.has(imageId) || state.add) this.upsert(record, "ordered");
        this.onRecord?.(record);
      } while (state.again);
    } catch (error) {
      if (error.status === 404) this.remove(imageId);
      else if (!(error instanceof AuthRequired)) this.onError(error);
    } finally {
      this.refreshing.delete(imageId);
    }
  }
}
