// The labeler page's keyboard: page-wide keys (submit, skip, next/previous response, edit the
// last label, panels) on top of the focused response's own keys (ranking.js). `?` shows the
// legend, which lists them all. Keys are off while typing in the comment or choosing a reason,
// except Ctrl+Enter (submit) and Escape (leave the field).
"use strict";

import { items } from "./ranking.js";

const $ = (id) => document.getElementById(id);

export const LEGEND = [
  ["\u2191 / \u2193", "move the focused response up / down"],
  ["j / k", "focus the next / previous response"],
  ["1 \u2013 7", "score the focused response"],
  ["=", "tie the focused response with the one above"],
  ["Ctrl + Enter", "submit the ranking"],
  ["s", "skip: choose a reason, then Skip"],
  ["u", "edit your last label (while its edit window is open)"],
  ["g", "show / hide the guidelines"],
  ["?", "show / hide these keys"],
  ["Esc", "leave the comment box, close this list"],
];

export function fillLegend() {
  const dl = $("keys-list");
  dl.replaceChildren();
  LEGEND.forEach(([key, what]) => {
    const dt = document.createElement("dt"), kbd = document.createElement("kbd"), dd = document.createElement("dd");
    kbd.textContent = key; dt.append(kbd); dd.textContent = what;
    dl.append(dt, dd);
  });
}

export function togglePanel(id, button, show) {
  const panel = $(id);
  panel.hidden = show === undefined ? !panel.hidden : !show;
  if (button) $(button).setAttribute("aria-expanded", String(!panel.hidden));
  document.querySelector(".layout").classList.toggle("with-side", !$("keys").hidden || !$("guidelines-panel").hidden);
}

function focusStep(delta) {
  const all = items();
  if (!all.length) return;
  const i = all.indexOf(document.activeElement);
  const j = i < 0 ? (delta > 0 ? 0 : all.length - 1) : Math.min(all.length - 1, Math.max(0, i + delta));
  all[j].focus();
}

// actions: {submit, skip, undo, hasGuidelines}
export function bindKeys(actions) {
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); actions.submit(); return; }
    const typing = e.target.closest && e.target.closest("textarea, input, select");
    if (e.key === "Escape") {
      if (typing) e.target.blur();
      togglePanel("keys", "keys-toggle", false);
      return;
    }
    if (typing || e.ctrlKey || e.metaKey || e.altKey || $("task").hidden && e.key !== "?") return;
    const act = {
      "?": () => togglePanel("keys", "keys-toggle"),
      "g": () => actions.hasGuidelines() && togglePanel("guidelines-panel", "guidelines-toggle"),
      "j": () => focusStep(1),
      "k": () => focusStep(-1),
      "s": () => { $("skip-box").open = true; $("skip-reason").focus(); },
      "u": () => actions.undo(),
    }[e.key];
    if (act) { e.preventDefault(); act(); }
  });
}
