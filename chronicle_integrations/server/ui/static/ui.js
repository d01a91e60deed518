// Chronicle's web view: refresh a page while it shows live runs (the only script).
// The server marks such a page with <body data-refresh="SECONDS">. Every SECONDS this
// re-fetches the page and swaps its <main data-live>; it stops once the fresh page is no
// longer live. Without JavaScript the pages work the same, minus the refresh.
(function () {
  "use strict";
  var every = Number(document.body.getAttribute("data-refresh"));
  if (!(every > 0)) return;
  var delay = Math.max(every, 0.5) * 1000;

  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html");
    var next = fresh.querySelector("main[data-live]");
    var current = document.querySelector("main[data-live]");
    if (!next || !current) return false;
    current.replaceWith(document.adoptNode(next));
    var live = fresh.body.getAttribute("data-refresh");
    if (live) document.body.setAttribute("data-refresh", live);
    else document.body.removeAttribute("data-refresh");
    return Boolean(live);
  }

  function tick() {
    if (document.hidden) { setTimeout(tick, delay); return; }
    fetch(location.href, { credentials: "same-origin", headers: { "X-Chronicle-Refresh": "1" } })
      .then(function (r) {
        if (!r.ok || r.redirected) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (html) { if (swap(html)) setTimeout(tick, delay); })
      .catch(function () { setTimeout(tick, delay * 2); });  // server away: try again later
  }
  setTimeout(tick, delay);
})();
