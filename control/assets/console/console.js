// Tether console: live rows over server-sent events, and small form helpers.
// Loaded from the console's own origin (CSP script-src 'self'); no eval, no inline code.
(function () {
  "use strict";
  var status = document.getElementById("live-status");
  function setStatus(live) {
    if (!status) return;
    status.textContent = live ? "live" : "reconnecting\u2026";
    status.className = live ? "live" : "";
  }
  function fragment(html) {
    var t = document.createElement("template");
    t.innerHTML = html.trim();
    return t.content.firstElementChild;
  }
  function replaceById(html) {
    var el = fragment(html);
    if (!el || !el.id) return;
    var old = document.getElementById(el.id);
    if (!old) return;
    var box = old.querySelector("input[type=checkbox]");
    var nbox = el.querySelector("input[type=checkbox]");
    if (box && nbox) nbox.checked = box.checked;
    old.replaceWith(el);
  }
  var url = document.body.getAttribute("data-live");
  if (url && window.EventSource) {
    var es = null;
    var opened = false;
    var reopen = false;
    var connect = function () {
      es = new EventSource(url);
      es.onopen = function () {
        // A stream the browser gave up on and this script reopened may have missed
        // changes: read the page afresh.
        if (reopen) { window.location.reload(); return; }
        opened = true;
        setStatus(true);
      };
      es.onerror = function () {
        setStatus(false);
        if (es.readyState === EventSource.CLOSED) {
          reopen = opened;
          setTimeout(connect, 2000);
        }
      };
      es.addEventListener("row", function (e) { replaceById(e.data); });
      es.addEventListener("summary", function (e) { replaceById(e.data); });
      // The appliance page: its certificates and tabs follow the change; read it afresh.
      // The revoke form keeps what was typed: only its header is swapped, and it says so
      // when the appliance got revoked from elsewhere meanwhile.
      es.addEventListener("appliance", function (e) {
        if (!document.querySelector("form[data-confirm-id]")) { window.location.reload(); return; }
        replaceById(e.data);
        var head = document.getElementById("appliance-head");
        var note = document.getElementById("revoke-already");
        if (head && note) note.hidden = head.getAttribute("data-status") !== "revoked";
      });
      // The Trust Alerts table, whole.
      es.addEventListener("alerts", function (e) { replaceById(e.data); });
      es.addEventListener("reload", function () { window.location.reload(); });
    };
    setStatus(false);
    connect();
  }
  // Revoke: the button stays disabled until the typed id matches.
  document.querySelectorAll("form[data-confirm-id]").forEach(function (form) {
    var want = form.getAttribute("data-confirm-id");
    var input = form.querySelector("input[name=confirm_id]");
    var reason = form.querySelector("[name=reason]");
    var button = form.querySelector("button[type=submit]");
    function check() { button.disabled = !(input.value === want && reason.value.trim() !== ""); }
    input.addEventListener("input", check);
    reason.addEventListener("input", check);
    check();
  });
  // Fleet: "select all" and the selected count on the bulk buttons.
  var all = document.getElementById("select-all");
  var bulk = document.getElementById("bulk-form");
  if (bulk) {
    var count = function () {
      var n = document.querySelectorAll("input[name=ids]:checked").length;
      document.querySelectorAll("[data-bulk-count]").forEach(function (el) { el.textContent = String(n); });
    };
    if (all) {
      all.addEventListener("change", function () {
        document.querySelectorAll("input[name=ids]").forEach(function (b) { b.checked = all.checked; });
        count();
      });
    }
    document.addEventListener("change", function (e) {
      if (e.target && e.target.name === "ids") count();
    });
    count();
  }
})();
