// pipeline's page: live updates over server-sent events, with no reload.
//
// Data never goes through innerHTML: a page's live regions ([data-live]) are fetched again
// from the server, which renders and escapes them, and swapped in as parsed nodes; log lines
// are added with textContent. A server that restarts is waited for: EventSource reconnects
// (resuming after the last event it saw) and the regions are fetched again when it is back.
// Streams are closed when the page is left (and opened again if it comes back from the
// back/forward cache): a browser keeps six HTTP/1.1 connections per server, and streams of
// pages left behind would hold them.
"use strict";

(function () {
  const streams = [];
  function open(url) {
    const s = new EventSource(url);
    streams.push(s);
    return s;
  }
  window.addEventListener("pagehide", () => { for (const s of streams) s.close(); });
  window.addEventListener("pageshow", (e) => { if (e.persisted) location.reload(); });

  const regions = Array.from(document.querySelectorAll("[data-live]"));
  const dot = document.getElementById("live-dot");
  let timer = null;
  let busy = false;
  let again = false;

  function setLive(on) {
    if (dot) dot.classList.toggle("off", !on);
  }

  async function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const resp = await fetch(location.href, { headers: { "Accept": "text/html" }, credentials: "same-origin" });
      if (resp.redirected && new URL(resp.url).pathname === "/login") { location.href = resp.url; return; }
      if (!resp.ok) return;
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      for (const region of regions) {
        const fresh = doc.getElementById(region.id);
        if (fresh) region.replaceChildren(...Array.from(fresh.childNodes).map((n) => document.importNode(n, true)));
      }
    } catch (e) {
      // The server is away: the event stream's reconnection brings us back.
    } finally {
      busy = false;
      if (again) { again = false; schedule(); }
    }
  }

  function schedule() {
    if (timer) return;
    timer = setTimeout(() => { timer = null; refresh(); }, 200);
  }

  function relevant(data) {
    return regions.some((r) => r.dataset.follow === "all" || !r.dataset.task || r.dataset.task === data.id);
  }

  if (regions.length > 0) {
    const events = open("/events");
    let lost = false;
    events.addEventListener("task", (e) => {
      try { if (relevant(JSON.parse(e.data))) schedule(); } catch (err) { schedule(); }
    });
    // Runners, landing, the queue and trains change what the lists show (not a task's page).
    for (const topic of ["runner", "landing", "queue", "train"]) {
      events.addEventListener(topic, () => { if (regions.some((r) => !r.dataset.task)) schedule(); });
    }
    events.addEventListener("open", () => { setLive(true); if (lost) { lost = false; schedule(); } });
    events.addEventListener("error", () => { lost = true; setLive(false); });
  }

  // A task's live log: each line as text, coloured by its stream, following the tail.
  const log = document.getElementById("log");
  if (log) {
    const task = log.dataset.task;
    const follow = () => log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    const stream = open("/tasks/" + encodeURIComponent(task) + "/log");
    stream.addEventListener("run", (e) => {
      const run = JSON.parse(e.data);
      const head = document.createElement("div");
      head.className = "run-head";
      head.textContent = "── " + run.phase + " · attempt " + run.attempt + " · " + (run.runner || "server") + " ──";
      log.appendChild(head);
    });
    stream.addEventListener("line", (e) => {
      const line = JSON.parse(e.data);
      const tail = follow();
      const row = document.createElement("div");
      row.className = "line s-" + line.stream;
      const at = document.createElement("span");
      at.className = "at";
      at.textContent = line.at.slice(11, 19);
      const kind = document.createElement("span");
      kind.className = "stream";
      kind.textContent = line.stream;
      const text = document.createElement("span");
      text.className = "text";
      text.textContent = line.text;
      row.append(at, kind, text);
      log.appendChild(row);
      if (tail) log.scrollTop = log.scrollHeight;
    });
    stream.addEventListener("status", (e) => {
      const s = JSON.parse(e.data).status;
      if (s === "done" || s === "needs_help" || s === "cancelled") {
        stream.close();
        const end = document.createElement("div");
        end.className = "run-head end";
        end.textContent = "── " + s + " ──";
        log.appendChild(end);
      }
    });
  }
})();
