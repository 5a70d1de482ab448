// The organiser's page: progress per annotator and live agreement, refreshed every 5 seconds (text only).
"use strict";
function fmt(x) { return x === null || x === undefined ? "–" : (typeof x === "number" && !Number.isInteger(x) ? x.toFixed(3) : String(x)); }
function row(cells, tag) { const tr = align.el("tr"); for (const c of cells) tr.append(align.el(tag || "td", fmt(c))); return tr; }

async function refresh() {
  let s;
  try { s = await align.api("/api/stats"); }
  catch (e) {
    if (e.status === 401 || e.status === 403) { if (e.status === 403) sessionStorage.removeItem("align-token"); align.login(refresh); return; }
    document.getElementById("updated").textContent = "error: " + e.message; setTimeout(refresh, 5000); return;
  }
  const a = s.agreement || {};
  const sm = s.sampling || {};
  const overall = document.querySelector("#overall tbody");
  overall.replaceChildren(
    row(["judgments", s.judgments + " of " + s.wanted + " wanted (overlap " + s.settings.overlap + ")"], "td"),
    row(["prompts sampled", fmt(sm.ready) + " of " + fmt(sm.total) + (sm.engine ? " (" + sm.engine + ")" : "") + (sm.error ? " – sampler error: " + sm.error : "")]),
    row(["sampling throughput", sm.responses_per_s ? fmt(sm.responses_per_s) + " responses/s, " + fmt(sm.tokens_per_s) + " tokens/s" : "–"]),
    row(["multiply-judged prompts", a.multiply_annotated_prompts]),
    row(["Kendall's W (mean per prompt)", a.kendalls_w_mean]),
    row(["Krippendorff's alpha (ordinal)", a.krippendorff_alpha_ordinal]),
    row(["flags", Object.entries(s.flags).map(([k, v]) => k + " " + v).join(", ")]),
    row(["annotators below τ 0.2", (a.flagged_annotators || []).join(", ") || "none"]),
  );
  const people = document.querySelector("#people tbody");
  people.replaceChildren();
  for (const [name, p] of Object.entries(s.annotators)) {
    const ag = (a.per_annotator || {})[name] || {};
    people.append(row([name, p.done, p.assigned, ag.shared_prompts, ag.mean_tau_vs_consensus]));
  }
  document.getElementById("board").hidden = false;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  setTimeout(refresh, 5000);
}
if (align.token()) refresh(); else align.login(refresh);
