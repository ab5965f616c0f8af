// The labeler page: fetches a task, sends a ranking (or a skip), lets the labeler edit a label
// sent in this tab while the folder's edit window is open. Model text is only ever set with
// textContent: never parsed as HTML. The response list: ranking.js; keys: keys.js.
"use strict";

import { bindKeys, fillLegend, togglePanel } from "./keys.js";
import { renderMarkdown } from "./markdown.js";
import { items, renumber, responseItem, restore, state, warnings } from "./ranking.js";

const $ = (id) => document.getElementById(id);
const HISTORY = "tidal-label-history";  // [{id, until}] of labels sent from this tab, newest last
let me = null, task = null, submissionId = null, sending = false, shownAt = 0, editing = null, confirmed = null;

function newId() {  // made once per shown task, so a double click or a retry reuses it
  if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
  const b = new Uint8Array(16); crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", body: JSON.stringify(body),
    headers: {"Content-Type": "application/json", "X-CSRF-Token": me.csrf}};
  const r = await fetch(path, {credentials: "same-origin", ...opts});
  if (r.status === 401) { location.href = "/login"; throw new Error("logged out"); }
  const data = await r.json();
  if (!r.ok) { const err = new Error(data.error || ("HTTP " + r.status)); err.status = r.status; throw err; }
  return data;
}

function showProgress(p) {
  $("progress").textContent = "Labeled " + p.done + " \u00b7 " + p.open + " open in the queue";
  const s = p.session;
  if (!s) return;
  const pace = s.seconds_per_label === null ? "" : " \u00b7 " + Math.round(s.seconds_per_label) + " s per label";
  $("session-progress").textContent = "This session: " + s.labels + (s.labels === 1 ? " label" : " labels") + pace;
}

function history() {
  try { return JSON.parse(sessionStorage.getItem(HISTORY) || "[]"); } catch (e) { return []; }
}

function remember(id, until, replaced) {
  const h = history().filter((x) => x.id !== replaced);
  if (until) h.push({id: id, until: until});
  sessionStorage.setItem(HISTORY, JSON.stringify(h.slice(-20)));
  showUndo();
}

function lastEditable() {
  const h = history();
  const last = h[h.length - 1];
  return last && last.until * 1000 > Date.now() && (!editing || editing.id !== last.id) ? last : null;
}

function showUndo() { $("undo").hidden = !lastEditable(); }

function promptText(p) {
  if (typeof p === "string") return p;
  return p.map((m) => m.role + ": " + m.content).join("\n\n");
}

function say(message, warning) {
  $("message").textContent = message || "";
  $("warning").textContent = warning || "";
  $("warning").hidden = !warning;
}

function render(data, edit) {
  if (data.progress) showProgress(data.progress);
  task = data.task;
  editing = edit || null;
  confirmed = null;
  say("");
  $("submit").textContent = "Submit ranking";
  if (!task) { $("task").hidden = true; $("empty").hidden = false; showUndo(); return; }
  submissionId = newId();
  shownAt = Date.now();
  $("prompt").textContent = promptText(task.prompt);
  $("responses").replaceChildren(...task.responses.map((r) => responseItem(r, me)));
  delete $("responses").dataset.touched;
  $("comment").value = edit ? edit.comment : "";
  $("skip-reason").value = edit && edit.skip_reason ? edit.skip_reason : "";
  $("skip-box").open = Boolean(edit && edit.skip_reason);
  if (edit) restore(edit);
  renumber();
  $("editing").hidden = !edit;
  if (edit) $("editing-until").textContent = "(until " + new Date(data.editable_until * 1000).toLocaleTimeString() + ")";
  $("empty").hidden = true; $("task").hidden = false;
  showUndo();
}

async function send(body) {
  if (sending) return;  // the same submission id would make a repeat harmless; this avoids the noise
  sending = true;
  $("submit").disabled = $("skip").disabled = true;
  try {
    if (editing) body.replaces = editing.id;
    body.seconds = Math.min((Date.now() - shownAt) / 1000, 86400);
    let sent;
    for (let attempt = 0; ; attempt++) {
      try { sent = await api("/api/submit", body); break; }
      catch (err) {
        if (err instanceof TypeError && attempt < 4) {  // network error: retry with the same id
          say("Connection problem, retrying\u2026");
          await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
          continue;
        }
        throw err;
      }
    }
    remember(sent.label_id, sent.editable_until, editing ? editing.id : null);
    render(await api("/api/next"));
  } catch (err) {
    say(String(err.message || err));
    if (err.status === 409 && !editing) setTimeout(async () => render(await api("/api/next")), 2500);  // lease lost
  } finally {
    sending = false;
    $("submit").disabled = $("skip").disabled = false;
  }
}

function submit() {
  if (!task || sending) return;
  const s = state(), k = s.order.length;
  const missing = items().findIndex((li) => !li.dataset.likert);
  if (me.likert === "required" && missing >= 0) {
    say("Give response " + (missing + 1) + " a score from 1 to 7.");
    items()[missing].focus();
    return;
  }
  const key = JSON.stringify(s);
  const warn = warnings(s, k);
  if (warn.length && confirmed !== key) {  // a second press with nothing changed sends it
    confirmed = key;
    say("", warn.join(" ") + " Press Submit again to send it as it is.");
    $("submit").textContent = "Submit anyway";
    return;
  }
  send({submission_id: submissionId, task_id: task.id, order: s.order, tie: s.tie,
        likert: me.likert === "off" ? null : s.likert, flags: s.flags, comment: $("comment").value});
}

function skip() {
  const reason = $("skip-reason").value;
  if (!reason) { say("Choose why you skip this task."); $("skip-reason").focus(); return; }
  send({submission_id: submissionId, task_id: task.id, skip_reason: reason});
}

async function undo() {
  const last = lastEditable();
  if (!last || sending) return;
  try {
    const data = await api("/api/labels/" + last.id);
    if (!data.editable_until) { remember(null, null, last.id); say("That label can no longer be edited."); return; }
    render({task: data.task, editable_until: data.editable_until}, data.label);
  } catch (err) {
    say(String(err.message || err));
  }
}

function showGuidelines() {
  const text = (me.guidelines || "").trim();
  $("guidelines-toggle").hidden = !text;
  if (!text) return;
  renderMarkdown(text, $("guidelines"));
  togglePanel("guidelines-panel", "guidelines-toggle", window.innerWidth >= 1000);  // beside the task when it fits
}

async function start() {
  try {
    const r = await fetch("/api/me", {credentials: "same-origin"});
    if (r.status === 401) { location.href = "/login"; return; }
    me = await r.json();
    $("logout-csrf").value = me.csrf;
    document.body.dataset.likert = me.likert;
    fillLegend();
    showGuidelines();
    $("submit").addEventListener("click", submit);
    $("skip").addEventListener("click", skip);
    $("skip-reason").addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); skip(); } });
    $("undo").addEventListener("click", undo);
    $("cancel-edit").addEventListener("click", async () => render(await api("/api/next")));
    $("keys-toggle").addEventListener("click", () => togglePanel("keys", "keys-toggle"));
    $("guidelines-toggle").addEventListener("click", () => togglePanel("guidelines-panel", "guidelines-toggle"));
    bindKeys({submit: submit, undo: undo, hasGuidelines: () => Boolean((me.guidelines || "").trim())});
    render(await api("/api/next"));
    document.body.dataset.ready = "1";
  } catch (err) {
    say(String(err.message || err));
  }
}
start();
