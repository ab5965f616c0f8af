// The researcher page: fetches /api/stats and fills the tables (text only, never HTML).
"use strict";
(function () {
  const fmt = (v) => (v === null || v === undefined) ? "\u2013" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v));

  function fill(id, header, rows) {
    const t = document.getElementById(id);
    t.replaceChildren();
    const tr = document.createElement("tr");
    header.forEach((h) => { const th = document.createElement("th"); th.textContent = h; tr.append(th); });
    t.append(tr);
    rows.forEach((row) => {
      const r = document.createElement("tr");
      row.forEach((c) => { const td = document.createElement("td"); td.textContent = fmt(c); r.append(td); });
      t.append(r);
    });
  }

  async function load() {
    const r = await fetch("/api/stats", {credentials: "same-origin"});
    if (r.status === 401) { location.href = "/login"; return; }
    const s = await r.json();
    const c = s.counts;
    fill("queue", ["tasks", "gold", "complete", "open", "leased now", "labels in the last hour"],
         [[c.tasks, c.gold_tasks, c.complete, c.open, c.leased, s.rates.last_hour]]);
    fill("labelers", ["labeler", "labels", "skips", "labels/hour", "last hour"],
         c.labelers.map((l) => { const rt = s.rates.per_labeler[l.name] || {}; return [l.name + (l.admin ? " (admin)" : ""), l.labels, l.skips, rt.per_hour, rt.last_hour]; }));
    const a = s.agreement, g = s.gold, names = new Set([...Object.keys(a.per_labeler), ...Object.keys(g.per_labeler)]);
    const rows = [["overall", a.pairs, a.agreement, a.tau, g.labels, g.agreement, g.tau]];
    names.forEach((n) => { const x = a.per_labeler[n] || {}, y = g.per_labeler[n] || {}; rows.push([n, x.pairs, x.agreement, x.tau, y.labels, y.agreement, y.tau]); });
    fill("agreement", ["", "overlap pairs", "agreement", "tau", "gold labels", "gold agreement", "gold tau"], rows);
    fill("likert", ["score", "count"], Object.entries(s.distributions.likert));
    fill("flags", ["flag", "responses flagged"], Object.entries(s.distributions.flags));
    fill("skips", ["reason", "count"], Object.entries(s.distributions.skips));
    document.body.dataset.ready = "1";
  }
  load();
})();
