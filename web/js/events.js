// GET /api/events read with fetch() and a stream parser rather than EventSource: EventSource
// cannot send the Authorization header that keys mode needs. One code path for both modes; it
// resumes with Last-Event-ID after a drop, as EventSource would.

import { AuthRequired, authHeaders, errorText, unauthorized } from "./api.js";

const MAX_DELAY_MS = 30000;

/** Parses the event-stream format (WHATWG HTML, "Server-sent events") from text chunks. */
export class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.pending = "";
    this.data = [];
    this.type = "";
    this.lastId = null; // the id the stream gave last (kept across events, as the spec says)
    this.retry = null;
  }

  push(chunk) {
    let text = this.pending + chunk;
    // A chunk may end between the \r and \n of one line break: keep the \r for the next one.
    let held = "";
    if (text.endsWith("\r")) {
      held = "\r";
      text = text.slice(0, -1);
    }
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    this.pending = lines.pop() + held;
    for (const line of lines) this.line(line);
  }

  line(line) {
    if (line === "") {
      this.dispatch();
      return;
    }
    if (line.startsWith(":")) return; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") this.type = value;
    else if (field === "data") this.data.push(value);
    else if (field === "id" && !value.includes("\0")) this.lastId = value;
    else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
  }

  dispatch() {
    if (this.data.length === 0) {
      this.type = "";
      return;
    }
    const event = { type: this.type || "message", data: this.data.join("\n"), id: this.lastId };
    this.data = [];
    this.type = "";
    this.onEvent(event);
  }
}

/**
 * The live stream: calls onEvent(parsed JSON) for each event, onState("live" | "reconnecting" |
 * "off"), and onGap() after a reconnect that could not resume (no event id yet), so the caller
 * can reload what it shows.
 */
export class EventStream {
  constructor(url, { onEvent, onState = () => {}, onGap = () => {} }) {
    this.url = url;
    this.onEvent = onEvent;
    this.onState = onState;
    this.onGap = onGap;
    this.lastId = null;
    this.controller = null;
    this.running = false;
    this.run = 0; // which start() a loop belongs to: a stop and a start must not leave two
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.run += 1;
    this.loop(this.run);
  }

  stop() {
    this.running = false;
    this.run += 1;
    this.controller?.abort();
    this.onState("off");
  }

  async loop(run) {
    let delay = 2000;
    let connectedBefore = false;
    const current = () => this.run === run;
    while (current()) {
      const controller = new AbortController();
      this.controller = controller;
      const parser = new SseParser((event) => this.deliver(event));
      try {
        const headers = { Accept: "text/event-stream", ...authHeaders() };
        if (this.lastId !== null) headers["Last-Event-ID"] = this.lastId;
        const res = await fetch(this.url, { headers, signal: controller.signal, cache: "no-store" });
        if (res.status === 401) {
          const message = await errorText(res);
          unauthorized(message);
          throw new AuthRequired(message);
        }
        if (!res.ok || !res.body) throw new Error(`events: HTTP ${res.status}`);
        if (connectedBefore && this.lastId === null) this.onGap();
        connectedBefore = true;
        this.onState("live");
        delay = 2000;
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          parser.push(value);
          if (parser.retry !== null) delay = parser.retry;
        }
      } catch (error) {
        if (!current()) return;
        if (error instanceof AuthRequired) {
          // The prompt is up; the stream waits for a key (main.js starts it again).
          this.stop();
          return;
        }
      }
      if (!current()) return;
      this.onState("reconnecting");
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, MAX_DELAY_MS);
    }
  }

  deliver(event) {
    if (event.id !== null) this.lastId = event.id;
    let data;
    try {
      data = JSON.parse(event.data);
    } catch {
      return; // not ours to understand
    }
    this.onEvent(data);
  }
}
