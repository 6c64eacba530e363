// Keyboard shortcuts for the labelling page (no inline script: the Content-Security-Policy forbids it).
// pairwise: 1/2 pick A/B, t tie, b both bad, s cycles strength; rating: digits rate the highlighted criterion,
// arrows move, Enter submits; edit: e focuses the text, Ctrl+Enter submits, Esc leaves it; everywhere: g tags,
// c comment, n skip. Keys typed into a text field are left alone (except Ctrl+Enter and Esc).
(function () {
  "use strict";
  function $(sel) { return document.querySelector(sel); }

  document.addEventListener("DOMContentLoaded", function () {
    var form = $("#label-form");
    if (!form) return;
    var kind = form.dataset.kind;
    var submitted = false;
    form.addEventListener("submit", function (e) {
      if (submitted) { e.preventDefault(); return; }  // double submit: the client_key would dedupe it anyway
      submitted = true;
    });
    function click(sel) { var b = $(sel); if (b) b.click(); }

    var criteria = Array.prototype.slice.call(document.querySelectorAll("fieldset.criterion"));
    var current = 0;
    function highlight() {
      criteria.forEach(function (f, i) { f.classList.toggle("current", i === current); });
    }
    if (criteria.length) highlight();

    document.addEventListener("keydown", function (e) {
      var el = document.activeElement;
      var typing = el && (el.tagName === "TEXTAREA" || (el.tagName === "INPUT" && el.type !== "radio"));
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        if (kind === "pairwise") return;  // pick with 1/2/t/b
        click("#submit");
        return;
      }
      if (typing) {
        if (e.key === "Escape") el.blur();
        return;
      }
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      var k = e.key;
      if (k === "g") { e.preventDefault(); $("#tags").focus(); return; }
      if (k === "c") { e.preventDefault(); $("#comment").focus(); return; }
      if (k === "n") { e.preventDefault(); click("#skip"); return; }
      if (kind === "pairwise") {
        var picks = { "1": "#pick-a", "2": "#pick-b", "t": "#pick-tie", "b": "#pick-both-bad" };
        if (picks[k]) { e.preventDefault(); click(picks[k]); return; }
        if (k === "s") {
          var radios = Array.prototype.slice.call(document.querySelectorAll("input[name=strength]"));
          var at = radios.findIndex(function (r) { return r.checked; });
          radios[(at + 1) % radios.length].checked = true;
          e.preventDefault();
        }
      } else if (kind === "rating") {
        if (k === "ArrowDown" || k === "ArrowUp") {
          current = Math.max(0, Math.min(criteria.length - 1, current + (k === "ArrowDown" ? 1 : -1)));
          highlight(); e.preventDefault(); return;
        }
        if (/^[0-9]$/.test(k) && criteria.length) {
          var box = criteria[current].querySelector("input[value='" + k + "']");
          if (box) {
            box.checked = true;
            if (current < criteria.length - 1) { current += 1; highlight(); }
            e.preventDefault();
          }
          return;
        }
        if (k === "Enter") { e.preventDefault(); click("#submit"); }
      } else if (kind === "edit") {
        if (k === "e") { e.preventDefault(); var t = $("#edited"); t.focus(); t.setSelectionRange(t.value.length, t.value.length); }
      }
    });
  });
})();
