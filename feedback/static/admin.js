// The researcher page: fetches /api/stats and fills the tables, and browses the tasks
// (/api/tasks, a page at a time) and one task's labels with every edited version
// (/api/tasks/{id}). Text only, never HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 50;
let offset = 0;

const fmt = (v) => (v === null || v === undefined) ? "\u2013" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v));
const when = (t) => (t ? new Date(t * 1000).toLocaleString() : "\u2013");
const promptText = (p) => (typeof p === "string" ? p : p.map((m) => m.role + ": " + m.content).join("\n"));

function fill(id, header, rows, decorate) {
  const t = $(id);
  t.replaceChildren();
  const tr = document.createElement("tr");
  header.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.append(th); });
  t.append(tr);
  rows.forEach((row, i) => {
    const r = document.createElement("tr");
    row.forEach((c) => { const td = document.createElement("td"); td.textContent = fmt(c); r.append(td); });
    if (decorate) decorate(r, i);
    t.append(r);
  });
}

async function getJSON(path) {
  const r = await fetch(path, {credentials: "same-origin"});
  if (r.status === 401) { location.href = "/login"; throw new Error("logged out"); }
  return r.json();
}

async function loadStats() {
  const s = await getJSON("/api/stats");
  const c = s.counts;
  fill("queue", ["tasks", "gold", "complete", "open", "leased now", "labels in the last hour"],
       [[c.tasks, c.gold_tasks, c.complete, c.open, c.leased, s.rates.last_hour]]);
  fill("labelers", ["labeler", "labels", "skips", "labels/hour", "last hour", "median s/label"],
       c.labelers.map((l) => { const rt = s.rates.per_labeler[l.name] || {}; return [l.name + (l.admin ? " (admin)" : ""), l.labels, l.skips, rt.per_hour, rt.last_hour, rt.median_s]; }));
  const a = s.agreement, g = s.gold, names = new Set([...Object.keys(a.per_labeler), ...Object.keys(g.per_labeler)]);
  const rel = s.reliability || {};
  Object.keys(rel).forEach((n) => names.add(n));
  const rows = [["overall", a.pairs, a.agreement, a.tau, g.labels, g.agreement, g.tau, ""]];
  names.forEach((n) => {
    const x = a.per_labeler[n] || {}, y = g.per_labeler[n] || {}, r = rel[n];
    const weight = r === undefined ? "" : r.weight.toFixed(2) + (r.dropped ? " (left out)" : r.gold_pairs ? "" : " (no gold)");
    rows.push([n, x.pairs, x.agreement, x.tau, y.labels, y.agreement, y.tau, weight]);
  });
  fill("agreement", ["", "overlap pairs", "agreement", "tau", "gold labels", "gold agreement", "gold tau", "reliability weight"], rows);
  fill("versions", ["reward model", "fit on labels", "new labels", "labels/min", "held out", "online accuracy", "rl step"],
       (s.versions || []).map((v) => ["v" + v.version, v.labels, v.new_labels, v.labels_per_min, v.heldout, v.online_accuracy, v.policy_step]));
  fill("likert", ["score", "count"], Object.entries(s.distributions.likert));
  fill("flags", ["flag", "responses flagged"], Object.entries(s.distributions.flags));
  fill("skips", ["reason", "count"], Object.entries(s.distributions.skips));
}

async function loadTasks(start) {
  const page = await getJSON("/api/tasks?offset=" + start + "&limit=" + PAGE);
  offset = page.offset;
  $("tasks-range").textContent = page.total ? (offset + 1) + "\u2013" + (offset + page.tasks.length) + " of " + page.total : "no tasks";
  $("tasks-prev").disabled = offset === 0;
  $("tasks-next").disabled = offset + page.tasks.length >= page.total;
  fill("tasks", ["task", "prompt", "K", "wants", "labels", "skips", "edits", "leased", "gold"],
       page.tasks.map((t) => [t.id, promptText(t.prompt), t.k, t.want, t.labels, t.skips, t.edits, t.leased, t.gold ? "yes" : ""]),
       (r, i) => {
         r.children[1].className = "clip";
         const link = document.createElement("button");
         link.type = "button"; link.className = "link"; link.textContent = String(page.tasks[i].id);
         link.addEventListener("click", () => showTask(page.tasks[i].id));
         r.children[0].replaceChildren(link);
       });
}

async function showTask(id) {
  const d = await getJSON("/api/tasks/" + id);
  const t = d.task;
  const why = t.meta ? " - asked by " + Object.entries(t.meta).map(([k, v]) => k + " " + fmt(v)).join(", ") : "";
  $("task-title").textContent = "Task " + t.id + (t.gold ? " (gold)" : "") + ": wants " + t.want + (t.want === 1 ? " label" : " labels") + why;
  $("task-prompt").textContent = promptText(t.prompt);
  fill("task-responses", ["#", "response", "source", "version"].concat(t.gold ? ["gold rank"] : []),
       t.responses.map((r, i) => [i + 1, r.text, r.source, r.version].concat(t.gold ? [t.gold[i] + 1] : [])));
  const header = ["label", "labeler", "sent", "ranks (response 1..K)", "scores", "flags", "comment", "skip", "seconds", "status"];
  fill("task-labels", header, d.labels.map((l) => [
    l.id, l.labeler, when(l.created_at), l.ranking ? l.ranking.map((x) => x + 1).join(" ") : null,
    l.likert ? l.likert.map((x) => (x === null ? "\u2013" : x)).join(" ") : null,
    l.flags ? l.flags.map((f, i) => (f.length ? (i + 1) + ": " + f.join(", ") : "")).filter(Boolean).join("; ") : null,
    l.comment, l.skip_reason, l.seconds === null ? null : Math.round(l.seconds),
    l.superseded_at ? "edited " + when(l.superseded_at) : (l.replaces ? "current (edit of " + l.replaces + ")" : "current")]),
    (r, i) => { if (d.labels[i].superseded_at) r.className = "superseded"; });
  $("task-detail").hidden = false;
  $("task-detail").scrollIntoView();
}

async function load() {
  $("tasks-prev").addEventListener("click", () => loadTasks(Math.max(0, offset - PAGE)));
  $("tasks-next").addEventListener("click", () => loadTasks(offset + PAGE));
  await Promise.all([loadStats(), loadTasks(0)]);
  document.body.dataset.ready = "1";
}
load();
