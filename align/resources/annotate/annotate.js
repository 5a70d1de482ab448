// The annotator's page: one prompt, its responses in the order the server drew; the annotator orders them best to
// worst (keyboard or drag and drop), may tie neighbours, flag a response and leave a note, and submits. Every
// string from the server is inserted with textContent (align.el), never as markup.
"use strict";
const state = { task: null, items: [], focus: 0, busy: false, shownAt: null };
window.alignTimings = [];  // ms from navigation start (first) or from submit (later) to the prompt being shown

function tiers() {
  const out = [];
  state.items.forEach((it, i) => {
    if (i > 0 && it.tied) out[out.length - 1].push(it.id); else out.push([it.id]);
  });
  return out;
}

function render() {
  const list = document.getElementById("responses");
  list.replaceChildren();
  let place = 0;
  state.items.forEach((it, i) => {
    if (i === 0 || !it.tied) place = i + 1;
    const li = align.el("li");
    li.tabIndex = 0;
    li.draggable = true;
    li.dataset.index = String(i);
    li.dataset.id = it.id;
    if (i > 0 && it.tied) li.classList.add("tied");
    const bar = align.el("div", null, "bar");
    bar.append(align.el("span", (i > 0 && it.tied ? "= " : "#") + place, "place"));
    const tie = align.el("button", i > 0 && it.tied ? "untie (t)" : "tie with above (t)");
    tie.type = "button"; tie.disabled = i === 0; tie.tabIndex = -1;
    tie.addEventListener("click", () => { toggleTie(i); });
    bar.append(tie);
    for (const [what, key] of [["unsafe", "u"], ["nonsense", "n"]]) {
      const b = align.el("button", (it.flag === what ? "unflag " : "flag ") + what + " (" + key + ")");
      b.type = "button"; b.tabIndex = -1;
      b.addEventListener("click", () => { toggleFlag(i, what); });
      bar.append(b);
    }
    if (it.flag) bar.append(align.el("span", "flagged: " + it.flag, "flag"));
    li.append(bar, align.el("div", it.text, "text"));
    li.setAttribute("aria-label", "place " + place + (it.flag ? ", flagged " + it.flag : ""));
    li.addEventListener("focus", () => { state.focus = i; });
    li.addEventListener("dragstart", (ev) => { ev.dataTransfer.setData("text/plain", String(i)); li.classList.add("dragging"); });
    li.addEventListener("dragend", () => li.classList.remove("dragging"));
    li.addEventListener("dragover", (ev) => ev.preventDefault());
    li.addEventListener("drop", (ev) => { ev.preventDefault(); move(Number(ev.dataTransfer.getData("text/plain")), i); });
    list.append(li);
  });
  focusItem(state.focus);
}

function focusItem(i) {
  const lis = document.querySelectorAll("#responses li");
  if (!lis.length) return;
  state.focus = Math.max(0, Math.min(lis.length - 1, i));
  lis[state.focus].focus();
}
function move(from, to) {
  to = Math.max(0, Math.min(state.items.length - 1, to));
  if (from === to) return;
  const [it] = state.items.splice(from, 1);
  state.items.splice(to, 0, it);
  state.items[0].tied = false;
  state.focus = to;
  render();
}
function toggleTie(i) { if (i > 0) { state.items[i].tied = !state.items[i].tied; state.focus = i; render(); } }
function toggleFlag(i, what) { const it = state.items[i]; it.flag = it.flag === what ? null : what; state.focus = i; render(); }

function showMessage(text, isError) {
  const m = document.getElementById("message");
  m.textContent = text; m.hidden = false; m.className = isError ? "error" : "";
  document.getElementById("task").hidden = true;
}
function showProgress(p) {
  document.getElementById("progress").textContent =
    p.done + " of " + p.assigned + " done · " + p.samples_ready + " of " + p.prompts + " prompts sampled";
}

async function next(startedAt) {
  let t;
  try { t = await align.api("/api/next"); }
  catch (e) { if (e.status === 401) { align.login(() => next(performance.now())); return; } showMessage(e.message, true); return; }
  showProgress(t.progress);
  if (t.state === "waiting") { showMessage("Waiting for the sampler to finish the next prompt…"); setTimeout(() => next(startedAt), 1500); return; }
  if (t.state === "done") { showMessage("All done: nothing is left for you. Thank you."); return; }
  state.task = t;
  state.items = t.responses.map((r) => ({ id: r.id, text: r.text, tied: false, flag: null }));
  state.focus = 0;
  const prompt = document.getElementById("prompt");
  prompt.replaceChildren();
  for (const m of t.prompt) {
    const div = align.el("div", null, "msg");
    div.append(align.el("span", m.role, "role"), document.createTextNode(m.content));
    prompt.append(div);
  }
  document.getElementById("note").value = "";
  document.getElementById("status").textContent = "";
  document.getElementById("message").hidden = true;
  document.getElementById("task").hidden = false;
  document.body.dataset.promptId = t.prompt_id;
  render();
  window.alignTimings.push(performance.now() - startedAt);
}

async function submit() {
  if (!state.task || state.busy) return;
  state.busy = true;
  const status = document.getElementById("status");
  status.className = ""; status.textContent = "saving…";
  const flags = {};
  for (const it of state.items) if (it.flag) flags[it.id] = it.flag;
  const ranking = tiers().map((t) => (t.length === 1 ? t[0] : t));
  const note = document.getElementById("note").value.trim();
  const startedAt = performance.now();
  try {
    await align.api("/api/judgments", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt_id: state.task.prompt_id, ranking, flags, note: note || null }),
    });
    state.task = null;
    await next(startedAt);
  } catch (e) {
    status.className = "error"; status.textContent = e.message;
    if (e.status === 409) { state.task = null; await next(startedAt); }
  } finally { state.busy = false; }
}

document.addEventListener("keydown", (ev) => {
  if ((ev.ctrlKey || ev.metaKey) && ev.key === "Enter") { ev.preventDefault(); submit(); return; }
  const tag = (ev.target && ev.target.tagName) || "";
  if (tag === "TEXTAREA" || tag === "INPUT" || !state.task || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const i = state.focus, k = ev.key;
  if (ev.shiftKey && (k === "ArrowUp" || k === "K")) move(i, i - 1);
  else if (ev.shiftKey && (k === "ArrowDown" || k === "J")) move(i, i + 1);
  else if (k === "ArrowUp" || k === "k") focusItem(i - 1);
  else if (k === "ArrowDown" || k === "j") focusItem(i + 1);
  else if (/^[1-9]$/.test(k)) move(i, Number(k) - 1);
  else if (k === "t") toggleTie(i);
  else if (k === "u") toggleFlag(i, "unsafe");
  else if (k === "n") toggleFlag(i, "nonsense");
  else return;
  ev.preventDefault();
});
document.getElementById("submit").addEventListener("click", submit);
if (align.token()) next(0); else align.login(() => next(performance.now()));
