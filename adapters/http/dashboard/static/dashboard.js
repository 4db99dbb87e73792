// The dashboard's live parts; every page reads without them. Served from the package (the CSP allows no inline script).
"use strict";

function overview() {
  const box = document.getElementById("overview");
  if (!box) return;
  const source = new EventSource(box.dataset.stream);
  // The daemon renders the overview's body (status and rates, as GET /admin/status and /admin/rates give them).
  source.addEventListener("overview", (e) => { box.innerHTML = e.data; });
}

const MAX_ROWS = 500;

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function tail() {
  const state = document.getElementById("tail-state");
  if (!state) return;
  const body = document.querySelector("#tail tbody");
  const pause = document.getElementById("pause");
  const withData = document.querySelectorAll("#tail th").length > 7;
  let paused = false, held = [], dropped = 0;
  const show = (ev) => {
    const row = body.insertRow(0);
    row.dataset.id = ev.id;
    cell(row, ev.time || "");
    cell(row, ev.type, "type");
    cell(row, ev.source);
    cell(row, ev.id, "id");
    cell(row, ev.inbound);
    cell(row, ev.dead_reason ? "dead letter: " + ev.dead_reason : ev.routes.join(", ") + (ev.duplicate ? " (duplicate)" : ""));
    cell(row, ev.size + " B");
    if (withData) cell(row, ev.data !== undefined ? ev.data : (ev.data_base64 ? "base64 " + ev.data_base64 : ""), "data");
    while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  };
  const source = new EventSource(state.dataset.stream);
  source.addEventListener("ready", () => { state.textContent = "streaming"; pause.disabled = false; });
  source.addEventListener("passed", (e) => {
    const ev = JSON.parse(e.data);
    if (ev.dropped_before) dropped += ev.dropped_before;
    if (paused) { held.push(ev); if (held.length > MAX_ROWS) held.shift(); state.textContent = "paused (" + held.length + " held)"; return; }
    show(ev);
    if (dropped) state.textContent = "streaming (" + dropped + " not shown: the page fell behind)";
  });
  source.onerror = () => { state.textContent = "disconnected; reconnecting"; };
  pause.addEventListener("click", () => {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    state.textContent = paused ? "paused" : "streaming";
    if (!paused) { held.forEach(show); held = []; }
  });
}

document.addEventListener("DOMContentLoaded", () => { overview(); tail(); });
