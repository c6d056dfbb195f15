// bluebatch console: live updates and copy buttons. No framework, nothing fetched but this site.
"use strict";
(function () {
  const main = document.getElementById("main");

  // Copy buttons: the command's text to the clipboard.
  document.addEventListener("click", function (ev) {
    const b = ev.target.closest("button.copy");
    if (!b || !navigator.clipboard) return;
    navigator.clipboard.writeText(b.dataset.copy || "").then(function () {
      const was = b.textContent;
      b.textContent = "Copied";
      setTimeout(function () { b.textContent = was; }, 1200);
    });
  });

  if (!main || !main.dataset.events || !window.EventSource) return;

  // While someone types in a form, the page is not swapped under them.
  function busy() {
    const a = document.activeElement;
    return a && main.contains(a) && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName) &&
      a.type !== "checkbox" && a.value !== "" ;
  }

  let pending = false;
  let lastClock = null;
  function refresh() {
    if (busy()) { pending = true; return; }
    pending = false;
    const url = new URL(window.location.href);
    url.searchParams.set("fragment", "main");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.redirected || r.status === 303) { window.location.reload(); return null; }
        lastClock = r.headers.get("X-Console-Clock");
        return r.text();
      })
      .then(function (html) {
        if (html === null) return;
        const clock = document.getElementById("clock-text");
        if (clock && lastClock) clock.textContent = lastClock;
        // Keep focus on the same control (by id or name) across the swap.
        const a = document.activeElement;
        const key = a && main.contains(a) ? (a.id || a.name || a.textContent) : null;
        main.innerHTML = html;
        if (key) {
          const again = document.getElementById(key) ||
            main.querySelector("[name='" + CSS.escape(key) + "']");
          if (again) again.focus();
        }
      })
      .catch(function () {});
  }

  document.addEventListener("focusout", function () { if (pending) setTimeout(refresh, 0); });
  const es = new EventSource(main.dataset.events);
  es.addEventListener("changed", refresh);
})();
