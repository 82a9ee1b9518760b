// Tether console sign-in: the link's secret is in the URL fragment, which the browser
// never sends. Ask control whose link it is (spending nothing), show "Continue as …",
// and post the secret only when the operator continues.
(function () {
  "use strict";
  var form = document.getElementById("login-form");
  var who = document.getElementById("login-who");
  var error = document.getElementById("login-error");
  var secret = window.location.hash.replace(/^#/, "");
  // Drop the secret from the address bar and history.
  if (secret) history.replaceState(null, "", window.location.pathname);
  function fail(message) {
    error.textContent = message;
    error.classList.remove("hidden");
  }
  if (!secret) {
    fail("This link has no secret. Run `tether console` again and open the whole link.");
    return;
  }
  var body = new URLSearchParams();
  body.set("secret", secret);
  fetch(form.getAttribute("data-preview"), {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: body.toString(),
    credentials: "same-origin",
  }).then(function (r) {
    return r.json().then(function (j) { return { ok: r.ok, body: j }; });
  }).then(function (r) {
    if (!r.ok) { fail(r.body.message || "This link cannot be used."); return; }
    who.textContent = "Continue as " + r.body.operator + " (role " + r.body.role + ")?";
    form.querySelector("input[name=secret]").value = secret;
    form.classList.remove("hidden");
  }).catch(function () { fail("Control cannot be reached."); });
})();
