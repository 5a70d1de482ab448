// Shared by both pages: the bearer token (from the link's #token=..., kept in sessionStorage, never in the URL
// bar or the server's logs) and a JSON fetch that says what went wrong in words.
"use strict";
const align = {
  token() {
    const m = /(?:^|&)token=([^&]+)/.exec(location.hash.slice(1));
    if (m) {
      sessionStorage.setItem("align-token", decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname);
    }
    return sessionStorage.getItem("align-token");
  },
  async api(path, options = {}) {
    const headers = Object.assign({ "Authorization": "Bearer " + (align.token() || "") }, options.headers || {});
    const r = await fetch(path, Object.assign({}, options, { headers }));
    let body = null;
    try { body = await r.json(); } catch (e) { body = { error: "the server sent no JSON (" + r.status + ")" }; }
    if (!r.ok) { const err = new Error(body && body.error ? body.error : "HTTP " + r.status); err.status = r.status; throw err; }
    return body;
  },
  el(tag, text, cls) {  // text goes in as text, never as markup
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  },
  login(onToken) {
    const box = document.getElementById("login");
    box.hidden = false;
    document.getElementById("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      sessionStorage.setItem("align-token", document.getElementById("token").value.trim());
      box.hidden = true;
      onToken();
    });
    document.getElementById("token").focus();
  },
};
