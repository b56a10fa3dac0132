// The console's own script: a confirmation before every action, and the live boots
// table kept current from the server's events. No framework; no third-party code.
"use strict";
document.addEventListener("submit", (e) => {
  const ask = e.target.getAttribute("data-confirm");
  if (ask && !window.confirm(ask)) {
    e.preventDefault();
  }
});
document.addEventListener("DOMContentLoaded", () => {
  const live = document.querySelector("[data-events]");
  if (live && window.EventSource) {
    const events = new EventSource(live.getAttribute("data-events"));
    events.onmessage = (m) => {
      // The server renders (and escapes) the fragment; it comes from this origin only.
      live.innerHTML = m.data;
      live.setAttribute("data-updated", String(Date.now()));
    };
  }
});
