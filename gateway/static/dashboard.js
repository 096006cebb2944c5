// millrace dashboard: a few views over the gateway's JSON routes, polled while shown.
// The API key lives in this tab's sessionStorage and goes out as a Bearer header.
"use strict";

const KEY = "millrace.key";
const $ = (sel) => document.querySelector(sel);
let timer = null;
let chart = null;
let me = null;

async function api(method, path) {
  const answer = await fetch("/dashboard/api" + path, {
    method, headers: { Authorization: "Bearer " + sessionStorage.getItem(KEY) },
  });
  const body = await answer.json();
  if (!answer.ok) {
    if (answer.status === 401) signOut();
    throw new Error((body.error && body.error.message) || answer.statusText);
  }
  return body;
}

function el(tag, text, attrs = {}) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function row(cells) {
  const tr = el("tr");
  for (const cell of cells) {
    const td = el("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell ?? "";
    tr.appendChild(td);
  }
  return tr;
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
  return Math.floor(s / 3600) + "h " + Math.floor((s % 3600) / 60) + "m";
}

function when(t) {
  return new Date(t * 1000).toLocaleString();
}

function bar(counts, big) {
  const total = Math.max(counts.total, 1);
  const node = el("div", null, { class: big ? "bar big" : "bar" });
  const done = el("span", null, { class: "done" });
  const failed = el("span", null, { class: "failed" });
  done.style.width = (100 * counts.completed / total) + "%";
  failed.style.width = (100 * counts.failed / total) + "%";
  node.append(done, failed);
  return node;
}

function setBar(node, counts) {
  const total = Math.max(counts.total, 1);
  node.querySelector(".done").style.width = (100 * counts.completed / total) + "%";
  node.querySelector(".failed").style.width = (100 * counts.failed / total) + "%";
}

// --- views ----------------------------------------------------------------------------------
async function showBatches() {
  const status = $("#status-filter").value;
  const page = await api("GET", "/batches" + (status ? "?status=" + status : ""));
  fill($("#batches-table tbody"), page.data.map((b) => {
    const c = b.request_counts;
    const tr = row([el("a", b.id, { href: "#/batch/" + b.id }), b.project,
      el("span", b.status, { class: "status " + b.status }), bar(c, false),
      `${c.completed + c.failed} / ${c.total}`, c.failed,
      b.rate ? b.rate.toFixed(1) + "/s" : "", duration(b.eta_s), duration(b.age_s)]);
    tr.children[1].classList.add("admin-only");
    tr.dataset.id = b.id;
    tr.dataset.status = b.status;
    tr.dataset.done = c.completed + c.failed;
    return tr;
  }));
  $("#batches-empty").hidden = page.data.length > 0;
}

let downloadsOf = null;

async function showBatch(id) {
  const b = await api("GET", "/batches/" + id);
  const c = b.request_counts;
  $("#batch-id").textContent = b.id;
  const status = $("#batch-status");
  status.textContent = b.status;
  status.className = "status " + b.status;
  setBar($("#batch-bar"), c);
  $("#batch-bar").dataset.done = c.completed + c.failed;
  $("#batch-counts").textContent = `${c.completed} completed, ${c.failed} failed of ${c.total}` +
    (b.rate ? ` · ${b.rate.toFixed(1)} lines/s` : "") + (b.eta_s ? ` · ETA ${duration(b.eta_s)}` : "");
  $("#cancel-button").disabled = !["validating", "in_progress"].includes(b.status);
  $("#retry-button").disabled = !(["completed", "expired", "cancelled"].includes(b.status) && c.failed > 0);
  fill($("#timeline"), b.timeline.map((t) => el("li", `${t.event.replace("_", " ")}: ${when(t.at)}`)));
  const usage = b.usage || {};
  const details = [["endpoint", b.endpoint], ["model", b.model], ["project", b.project],
    ["window", b.completion_window], ["priority", String(b.priority ?? 0)],
    ["queue", b.queue ? `position ${b.queue.position}, ${b.queue.tokens_ahead} tokens ahead` +
      (b.queue.eta_s !== null ? ` · ETA ${duration(b.queue.eta_s)}` : "") : ""],
    ["estimate", b.estimate ? `${b.estimate.prompt_tokens} prompt + ≤${b.estimate.max_output_tokens} output tokens` : ""],
    ["input file", b.input_file_id],
    ["tokens in / out", usage.input_tokens !== undefined ? `${usage.input_tokens} / ${usage.output_tokens}` : ""],
    ["metadata", b.metadata ? JSON.stringify(b.metadata) : ""]];
  $("#details").replaceChildren(...details.flatMap(([k, v]) => [el("dt", k), el("dd", v ?? "")]));
  const invalid = (b.errors && b.errors.data) || [];
  fill($("#validation-errors tbody"), invalid.map((e) => row([e.line, e.code, e.message])));
  const lines = b.line_errors;
  fill($("#line-errors tbody"), Object.entries(lines.by_code).map(([code, n]) => row([code, n])));
  fill($("#line-examples tbody"), lines.examples.map((e) => row([e.custom_id, e.code, e.message])));
  if (downloadsOf !== b.id + b.status) {  // signed once per state: links work for minutes
    downloadsOf = b.id + b.status;
    for (const kind of ["output", "error"]) {
      const link = $("#download-" + kind);
      const fileId = b[kind + "_file_id"];
      link.hidden = !fileId;
      if (fileId) {
        const signed = await api("GET", `/batches/${b.id}/files/${kind}`);
        link.href = signed.url;
        link.download = `${b.id}_${kind}.jsonl`;
      }
    }
  }
}

async function showWorkers() {
  const w = await api("GET", "/workers");
  fill($("#models-table tbody"), w.models.map((m) =>
    row([m.model, m.workers, m.running, m.waiting, m.lag, m.queue])));
  fill($("#workers-table tbody"), w.workers.map((x) => {
    const tr = row([x.worker, x.models.join(", "), x.running, x.waiting, x.requests_per_s,
      x.tokens_per_s, x.finished, x.failed, duration(x.up_s)]);
    tr.dataset.worker = x.worker;
    return tr;
  }));
  const data = [w.throughput.map((p) => p[0]), w.throughput.map((p) => p[1]),
    w.throughput.map((p) => p[2])];
  if (!chart) {
    chart = new uPlot({
      width: Math.min(900, document.body.clientWidth - 60), height: 240,
      scales: {  // the last ten minutes, rates from zero
        x: { time: true, range: () => { const now = Date.now() / 1000; return [now - 600, now]; } },
        r: { range: (u, min, max) => [0, Math.max(max, 1)] },
        t: { range: (u, min, max) => [0, Math.max(max, 1)] },
      },
      series: [{}, { label: "requests/s", stroke: "#2f9e5b", scale: "r" },
        { label: "tokens/s", stroke: "#2d6cdf", scale: "t" }],
      axes: [{}, { scale: "r", label: "requests/s" }, { scale: "t", side: 1, label: "tokens/s" }],
    }, data, $("#throughput-chart"));
  } else {
    chart.setData(data);
  }
  $("#throughput-chart").dataset.points = w.throughput.length;
}

// --- routing --------------------------------------------------------------------------------
const VIEWS = ["signin", "batches", "batch", "workers"];

function show(view) {
  for (const v of VIEWS) $("#" + v).hidden = v !== view;
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", a.dataset.view === view || (view === "batch" && a.dataset.view === "batches"));
  }
}

function poll(fn, every) {
  clearTimeout(timer);
  const tick = async () => {
    try {
      await fn();
      $("#batch-message").textContent = "";
    } catch (err) {
      $("#batch-message").textContent = err.message;
    }
    timer = setTimeout(tick, every);
  };
  tick();
}

async function route() {
  if (!sessionStorage.getItem(KEY)) {
    clearTimeout(timer);
    show("signin");
    $("#nav").hidden = true;
    $("#signout-button").hidden = true;
    $("#who").textContent = "";
    return;
  }
  if (!me) {
    try {
      me = await api("GET", "/me");
    } catch (err) {
      return;
    }
  }
  document.body.classList.toggle("admin", me.admin);
  $("#who").textContent = me.admin ? `admin · every project` : `project ${me.project}`;
  $("#nav").hidden = false;
  $("#signout-button").hidden = false;
  const hash = location.hash || "#/batches";
  if (hash.startsWith("#/batch/")) {
    const id = hash.slice("#/batch/".length);
    downloadsOf = null;
    show("batch");
    poll(() => showBatch(id), 1000);
  } else if (hash === "#/workers") {
    show("workers");
    poll(showWorkers, 2000);
  } else {
    show("batches");
    poll(showBatches, 1000);
  }
}

function signOut() {
  sessionStorage.removeItem(KEY);
  me = null;
  route();
}

$("#signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("#signin-key").value.trim());
  try {
    me = await api("GET", "/me");
    $("#signin-error").textContent = "";
    $("#signin-key").value = "";
    route();
  } catch (err) {
    sessionStorage.removeItem(KEY);
    $("#signin-error").textContent = "That key was not accepted: " + err.message;
  }
});
$("#signout-button").addEventListener("click", signOut);
$("#status-filter").addEventListener("change", () => poll(showBatches, 1000));
$("#cancel-button").addEventListener("click", async () => {
  const id = $("#batch-id").textContent;
  if (!confirm(`Cancel ${id}? Lines not yet run become batch_cancelled errors.`)) return;
  await api("POST", `/batches/${id}/cancel`);
});
$("#retry-button").addEventListener("click", async () => {
  const id = $("#batch-id").textContent;
  const retried = await api("POST", `/batches/${id}/retry`);
  location.hash = "#/batch/" + retried.id;
});
window.addEventListener("hashchange", route);
route();
