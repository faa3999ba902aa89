// The header's figures from GET /api/stats, refreshed after events (at most a few times a second).

import { AuthRequired, getJSON } from "./api.js";
import * as fmt from "./format.js";

const MIN_GAP_MS = 400;

export class Stats {
  constructor(root, { onError }) {
    this.root = root;
    this.onError = onError;
    this.timer = null;
    this.inFlight = null;
  }

  set(name, text) {
    const el = this.root.querySelector(`[data-stat="${name}"]`);
    if (el) el.textContent = text;
  }

  /** Loads now; rejects on errors (AuthRequired included) so the caller can tell. */
  async load() {
    const { body } = await getJSON("/api/stats");
    this.set("total", body.total.toLocaleString());
    this.set("failed", body.failed.toLocaleString());
    this.set("success_rate", body.success_rate);
    this.set("average", fmt.seconds(body.average_processing_time_seconds));
    this.set("queued_jobs", body.queued_jobs.toLocaleString());
    return body;
  }

  /** Soon, once for any number of calls meanwhile. */
  refreshSoon() {
    if (this.timer) return;
    this.timer = setTimeout(async () => {
      this.timer = null;
      try {
        await this.load();
      } catch (error) {
        if (!(error instanceof AuthRequired)) this.onError(error);
      }
    }, MIN_GAP_MS);
  }
}
