// mesh ui: keep the page live. Every second, fetch this same address asking for its
// main part alone (X-Mesh-Partial: 1) and put it in place. Without this script every
// page still reads as rendered by the server; reload it to update.
(function () {
  "use strict";
  var main = document.getElementById("live");
  var status = document.getElementById("live-status");
  if (!main || main.getAttribute("data-live") !== "1") return;
  var last = null;
  var busy = false;
  var pressed = false;
  document.addEventListener("pointerdown", function () { pressed = true; }, true);
  document.addEventListener("pointerup", function () { pressed = false; }, true);

  function say(text, on) {
    if (!status) return;
    status.textContent = text;
    status.className = on ? "live on" : "live off";
    status.title = on ? "updates every second" : "not updating";
  }

  function editing() {
    var el = document.activeElement;
    return el && main.contains(el) && /^(INPUT|SELECT|TEXTAREA)$/.test(el.tagName);
  }

  function tick() {
    if (busy || pressed || document.hidden || editing()) return;
    busy = true;
    fetch(window.location.href, {
      headers: { "X-Mesh-Partial": "1" },
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (response) {
      if (response.status === 401) { window.location.reload(); return null; }
      if (!response.ok && response.status !== 404 && response.status !== 409) {
        say("live: " + response.status, false);
        return null;
      }
      return response.text();
    }).then(function (html) {
      if (html === null || html === undefined) return;
      if (html !== last) {
        main.innerHTML = html;
        last = html;
      }
      main.setAttribute("data-updated", String(Date.now()));
      say("live", true);
    }).catch(function () {
      say("live: no answer", false);
    }).then(function () { busy = false; });
  }

  say("live", true);
  window.setInterval(tick, 1000);
})();
