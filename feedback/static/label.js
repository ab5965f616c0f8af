// The labeler page. Model text is only ever set with textContent: never parsed as HTML.
"use strict";
(function () {
  const $ = (id) => document.getElementById(id);
  let me = null, task = null, submissionId = null, sending = false;

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
    if (!r.ok) throw new Error(data.error || ("HTTP " + r.status));
    return data;
  }

  function showProgress(p) {
    $("progress").textContent = "Labeled " + p.done + " \u00b7 " + p.open + " open in the queue";
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function promptText(p) {
    if (typeof p === "string") return p;
    return p.map((m) => m.role + ": " + m.content).join("\n\n");
  }

  function items() { return Array.from($("responses").children); }

  function renumber() {
    items().forEach((li, i) => {
      li.querySelector(".rank").textContent = String(i + 1);
      li.setAttribute("aria-label", "Response ranked " + (i + 1) + " of " + items().length);
    });
  }

  function move(li, delta) {
    const list = $("responses"), all = items(), i = all.indexOf(li), j = i + delta;
    if (j < 0 || j >= all.length) return;
    if (delta < 0) list.insertBefore(li, all[j]); else list.insertBefore(li, all[j].nextSibling);
    renumber();
    li.focus();
  }

  function setLikert(li, value) {
    li.dataset.likert = String(value);
    li.querySelectorAll(".likert button").forEach((b) => b.setAttribute("aria-pressed", String(b.value === String(value))));
  }

  function responseItem(r) {
    const li = el("li", "resp");
    li.tabIndex = 0;
    li.dataset.slot = String(r.slot);
    const side = el("div", "side");
    const up = el("button", "move", "\u25b2"), down = el("button", "move", "\u25bc");
    up.type = down.type = "button";
    up.title = "move up"; down.title = "move down";
    up.tabIndex = down.tabIndex = -1;
    up.addEventListener("click", () => move(li, -1));
    down.addEventListener("click", () => move(li, 1));
    const handle = el("span", "handle", "\u2261");
    handle.title = "drag to reorder";
    side.append(el("span", "rank"), up, handle, down);
    const body = el("div", "body");
    body.append(el("div", "text", r.text));
    const likert = el("div", "likert");
    likert.append(el("span", "hint", "Score:"));
    for (let v = 1; v <= 7; v++) {
      const b = el("button", "", String(v));
      b.type = "button"; b.value = String(v); b.tabIndex = -1;
      b.setAttribute("aria-pressed", "false");
      b.addEventListener("click", () => setLikert(li, v));
      likert.append(b);
    }
    const flags = el("div", "flags");
    me.flags.forEach((f) => {
      const lab = el("label"), box = el("input");
      box.type = "checkbox"; box.value = f; box.tabIndex = -1;
      lab.append(box, document.createTextNode(f));
      flags.append(lab);
    });
    body.append(likert, flags);
    li.append(side, body);
    li.addEventListener("keydown", (e) => {
      if (e.target !== li) return;
      if (e.key === "ArrowUp" || e.key === "ArrowDown") { e.preventDefault(); move(li, e.key === "ArrowUp" ? -1 : 1); }
      else if (e.key >= "1" && e.key <= "7") { e.preventDefault(); setLikert(li, Number(e.key)); }
    });
    dragWith(handle, li);
    return li;
  }

  // Dragging with pointer events (mouse, pen and touch alike): the item follows the pointer's
  // vertical position among its siblings while the button is held.
  function dragWith(handle, li) {
    handle.addEventListener("pointerdown", (e) => {
      e.preventDefault();
      handle.setPointerCapture(e.pointerId);
      li.classList.add("dragging");
      const onMove = (ev) => {
        const list = $("responses");
        const others = items().filter((x) => x !== li);
        const after = others.find((x) => { const b = x.getBoundingClientRect(); return ev.clientY < b.top + b.height / 2; });
        if (after) { if (after !== li.nextSibling) list.insertBefore(li, after); }
        else if (li !== list.lastElementChild) list.append(li);
        renumber();
      };
      const onUp = () => {
        li.classList.remove("dragging");
        handle.removeEventListener("pointermove", onMove);
        handle.removeEventListener("pointerup", onUp);
        handle.removeEventListener("pointercancel", onUp);
        li.focus();
      };
      handle.addEventListener("pointermove", onMove);
      handle.addEventListener("pointerup", onUp);
      handle.addEventListener("pointercancel", onUp);
    });
  }

  function render(data) {
    showProgress(data.progress);
    task = data.task;
    $("message").textContent = "";
    if (!task) { $("task").hidden = true; $("empty").hidden = false; return; }
    submissionId = newId();
    $("prompt").textContent = promptText(task.prompt);
    $("responses").replaceChildren(...task.responses.map(responseItem));
    $("comment").value = "";
    $("skip-reason").value = "";
    renumber();
    $("empty").hidden = true; $("task").hidden = false;
  }

  async function send(body) {
    if (sending) return;  // the same submission id would make a repeat harmless; this avoids the noise
    sending = true;
    $("submit").disabled = $("skip").disabled = true;
    try {
      for (let attempt = 0; ; attempt++) {
        try { await api("/api/submit", body); break; }
        catch (err) {
          if (err instanceof TypeError && attempt < 4) {  // network error: retry with the same id
            $("message").textContent = "Connection problem, retrying\u2026";
            await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
            continue;
          }
          throw err;
        }
      }
      render(await api("/api/next"));
    } catch (err) {
      $("message").textContent = String(err.message || err);
    } finally {
      sending = false;
      $("submit").disabled = $("skip").disabled = false;
    }
  }

  function submit() {
    const all = items(), bySlot = all.slice().sort((a, b) => a.dataset.slot - b.dataset.slot);
    const missing = all.findIndex((li) => !li.dataset.likert);
    if (missing >= 0) {
      $("message").textContent = "Give response " + (missing + 1) + " a score from 1 to 7.";
      all[missing].focus();
      return;
    }
    send({submission_id: submissionId, task_id: task.id,
          order: all.map((li) => Number(li.dataset.slot)),
          likert: bySlot.map((li) => Number(li.dataset.likert)),
          flags: bySlot.map((li) => Array.from(li.querySelectorAll(".flags input:checked"), (b) => b.value)),
          comment: $("comment").value});
  }

  function skip() {
    const reason = $("skip-reason").value;
    if (!reason) { $("message").textContent = "Choose why you skip this task."; return; }
    send({submission_id: submissionId, task_id: task.id, skip_reason: reason});
  }

  async function start() {
    try {
      const r = await fetch("/api/me", {credentials: "same-origin"});
      if (r.status === 401) { location.href = "/login"; return; }
      me = await r.json();
      $("logout-csrf").value = me.csrf;
      $("submit").addEventListener("click", submit);
      $("skip").addEventListener("click", skip);
      render(await api("/api/next"));
      document.body.dataset.ready = "1";
    } catch (err) {
      $("message").textContent = String(err.message || err);
    }
  }
  start();
})();
