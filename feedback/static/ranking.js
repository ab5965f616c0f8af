// The response list of the labeler page: one item per response, best at the top. An item can
// move (drag its handle, its arrow buttons, or Up/Down when focused), tie with the item above
// it (the = button or key: both share a rank), take a 1-7 score and flags. Model text is only
// ever set with textContent.
"use strict";

const $ = (id) => document.getElementById(id);

export function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

export function items() { return Array.from($("responses").children); }

// Shown ranks: an item tied to the one above shares its rank ("=2"); the first never ties.
export function renumber() {
  let rank = 0;
  items().forEach((li, i) => {
    if (i === 0 && li.dataset.tie === "1") {  // moved to the top: nothing above to tie with
      li.dataset.tie = "";
      li.querySelector(".tie").setAttribute("aria-pressed", "false");
    }
    const tied = i > 0 && li.dataset.tie === "1";
    if (!tied) rank = i + 1;
    li.classList.toggle("tied", tied);
    li.querySelector(".rank").textContent = (tied ? "=" : "") + rank;
    li.querySelector(".tie").disabled = i === 0;
    li.setAttribute("aria-label", "Response ranked " + rank + " of " + items().length + (tied ? ", tied with the one above" : ""));
  });
}

export function move(li, delta) {
  const list = $("responses"), all = items(), i = all.indexOf(li), j = i + delta;
  if (j < 0 || j >= all.length) return;
  if (delta < 0) list.insertBefore(li, all[j]); else list.insertBefore(li, all[j].nextSibling);
  list.dataset.touched = "1";
  renumber();
  li.focus();
}

export function setTie(li, tied) {
  if (items().indexOf(li) === 0) tied = false;
  li.dataset.tie = tied ? "1" : "";
  li.querySelector(".tie").setAttribute("aria-pressed", String(tied));
  $("responses").dataset.touched = "1";
  renumber();
}

export function setLikert(li, value) {
  li.dataset.likert = value === null ? "" : String(value);
  li.querySelectorAll(".likert button").forEach((b) => b.setAttribute("aria-pressed", String(b.value === String(value))));
}

function likertRow(li) {
  const likert = el("div", "likert");
  likert.append(el("span", "hint", "Score:"));
  for (let v = 1; v <= 7; v++) {
    const b = el("button", "", String(v));
    b.type = "button"; b.value = String(v); b.tabIndex = -1;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => setLikert(li, v));
    likert.append(b);
  }
  return likert;
}

function flagBoxes(flags) {
  const box = el("div", "flags");
  flags.forEach((f) => {
    const lab = el("label"), input = el("input");
    input.type = "checkbox"; input.value = f; input.tabIndex = -1;
    lab.append(input, document.createTextNode(f));
    box.append(lab);
  });
  return box;
}

// One response item; `me` gives the flags and the Likert mode (required, optional, off).
export function responseItem(r, me) {
  const li = el("li", "resp");
  li.tabIndex = 0;
  li.dataset.slot = String(r.slot);
  li.dataset.likert = "";
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
  const controls = el("div", "controls");
  if (me.likert !== "off") controls.append(likertRow(li));
  const tie = el("button", "tie", "= tie with above");
  tie.type = "button"; tie.tabIndex = -1; tie.title = "as good as the response above (key =)";
  tie.setAttribute("aria-pressed", "false");
  tie.addEventListener("click", () => setTie(li, li.dataset.tie !== "1"));
  controls.append(tie, flagBoxes(me.flags));
  body.append(controls);
  li.append(side, body);
  li.addEventListener("keydown", (e) => {
    if (e.target !== li || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "ArrowUp" || e.key === "ArrowDown") { e.preventDefault(); move(li, e.key === "ArrowUp" ? -1 : 1); }
    else if (e.key >= "1" && e.key <= "7" && me.likert !== "off") { e.preventDefault(); setLikert(li, Number(e.key)); }
    else if (e.key === "=") { e.preventDefault(); setTie(li, li.dataset.tie !== "1"); }
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
      list.dataset.touched = "1";
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

// The list as a submission: order (slots best first), tie per position, likert and flags by slot.
export function state() {
  const all = items(), bySlot = all.slice().sort((a, b) => a.dataset.slot - b.dataset.slot);
  return {
    order: all.map((li) => Number(li.dataset.slot)),
    tie: all.map((li, i) => i > 0 && li.dataset.tie === "1"),
    likert: bySlot.map((li) => (li.dataset.likert ? Number(li.dataset.likert) : null)),
    flags: bySlot.map((li) => Array.from(li.querySelectorAll(".flags input:checked"), (b) => b.value)),
  };
}

// Puts a stored label (as GET /api/labels/{id} gives it, by slot) back on the list.
export function restore(label) {
  const list = $("responses"), bySlot = new Map(items().map((li) => [Number(li.dataset.slot), li]));
  if (!label.order) return;
  label.order.forEach((slot, p) => {
    const li = bySlot.get(slot);
    list.append(li);
    li.dataset.tie = label.tie[p] ? "1" : "";
    li.querySelector(".tie").setAttribute("aria-pressed", String(Boolean(label.tie[p])));
  });
  bySlot.forEach((li, slot) => {
    if (label.likert) setLikert(li, label.likert[slot]);
    const flags = new Set((label.flags || [])[slot] || []);
    li.querySelectorAll(".flags input").forEach((b) => { b.checked = flags.has(b.value); });
  });
  list.dataset.touched = "1";
  renumber();
}

// Things worth a second look before sending (a warning, never a block): the shuffled order
// sent untouched, or a response ranked above another with a lower score.
export function warnings(s, k) {
  const out = [];
  if ($("responses").dataset.touched !== "1") {
    out.push("You kept the order the responses came in, which is random.");
  }
  const score = (p) => s.likert[s.order[p]];
  for (let p = 0; p < k; p++) {
    for (let q = p + 1; q < k; q++) {
      const tiedBetween = s.tie.slice(p + 1, q + 1).every(Boolean);
      if (!tiedBetween && score(p) !== null && score(q) !== null && score(p) < score(q)) {
        out.push("The response ranked " + rankAt(s, p) + " has a lower score (" + score(p) + ") than the one ranked "
                 + rankAt(s, q) + " (" + score(q) + ").");
        return out;
      }
    }
  }
  return out;
}

function rankAt(s, p) {
  let r = p;
  while (r > 0 && s.tie[r]) r--;
  return r + 1;
}
