// durable-tiers dashboard: the page's live part (#live) is fetched again every 2 s
// (the server renders only that part when asked with X-Tiers-Live) and swapped in;
// open <details> stay open. Forms with data-confirm ask first. No dependencies.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var form = event.target;
    if (form.dataset && form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });
  document.addEventListener("DOMContentLoaded", function () {
    var live = document.getElementById("live");
    var status = document.getElementById("live-status");
    if (!live || !window.fetch) { return; }
    var every = parseInt(live.dataset.live || "2000", 10);
    var busy = false;
    function show(text, ok) {
      if (status) { status.textContent = text; status.className = "live-status " + (ok ? "ok" : "bad"); }
    }
    function tick() {
      if (busy || document.hidden) { return; }
      busy = true;
      fetch(window.location.href, { headers: { "X-Tiers-Live": "1" }, credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) { throw new Error("HTTP " + response.status); }
          return response.text();
        })
        .then(function (html) {
          var open = [];
          live.querySelectorAll("details[open][id]").forEach(function (d) { open.push(d.id); });
          live.innerHTML = html;
          open.forEach(function (id) {
            var d = document.getElementById(id);
            if (d) { d.open = true; }
          });
          live.dispatchEvent(new CustomEvent("tiers:updated", { bubbles: true }));
          show("live", true);
        })
        .catch(function () { show("disconnected", false); })
        .then(function () { busy = false; });
    }
    show("live", true);
    window.setInterval(tick, every);
  });
})();
