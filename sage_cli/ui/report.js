/* sage explain --html: the theme toggle and the tooltips of the chain's words.
   Text from the trace reaches the DOM through textContent only, never as markup. */
(function () {
  "use strict";
  var root = document.documentElement;
  var dark = window.matchMedia ? window.matchMedia("(prefers-color-scheme: dark)") : null;
  var button = document.getElementById("theme");

  function scheme() {
    var chosen = root.getAttribute("data-theme");
    if (chosen === "light" || chosen === "dark") return chosen;
    return dark && dark.matches ? "dark" : "light";
  }
  function sync() {
    var s = scheme();
    root.setAttribute("data-scheme", s);
    if (button) {
      button.textContent = s === "dark" ? "\u2600 Light" : "\u263e Dark";
      button.setAttribute("aria-label", "Switch to the " + (s === "dark" ? "light" : "dark") + " theme");
    }
  }
  try {
    var saved = window.localStorage.getItem("sage-theme");
    if (saved === "light" || saved === "dark") root.setAttribute("data-theme", saved);
  } catch (e) { /* storage refused (file pages in some browsers): the system theme applies */ }
  if (button) {
    button.hidden = false;
    button.addEventListener("click", function () {
      var next = scheme() === "dark" ? "light" : "dark";
      root.setAttribute("data-theme", next);
      try { window.localStorage.setItem("sage-theme", next); } catch (e) { /* not kept */ }
      sync();
    });
  }
  if (dark && dark.addEventListener) dark.addEventListener("change", sync);
  sync();

  /* tooltips: data-tip holds [[token, p, [[alternative, p, width, chosen], ...]], ...] */
  var tip = document.createElement("div");
  tip.id = "tip";
  tip.setAttribute("role", "tooltip");
  tip.hidden = true;
  document.body.appendChild(tip);

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function barCell(share) {
    var cell = el("td");
    var bar = el("span", "bar");
    bar.style.width = Math.max(1, Math.round(80 * share)) + "px";
    cell.appendChild(bar);
    return cell;
  }
  function fill(word) {
    var data;
    try { data = JSON.parse(word.getAttribute("data-tip")); } catch (e) { return false; }
    while (tip.firstChild) tip.removeChild(tip.firstChild);
    var table = el("table");
    data.forEach(function (tok, i) {
      /* the token the model wrote, then the other likely ones at that place */
      var head = el("tr", "chosen" + (i ? " next" : ""));
      head.appendChild(el("td", "tok", tok[0]));
      head.appendChild(el("td", "p", tok[1]));
      var own = tok[2].filter(function (alt) { return alt[3]; })[0];
      head.appendChild(barCell(own ? own[2] : Number(tok[1]) || 0));
      table.appendChild(head);
      tok[2].forEach(function (alt) {
        if (alt[3]) return;
        var row = el("tr");
        row.appendChild(el("td", "tok", alt[0]));
        row.appendChild(el("td", "p", alt[1]));
        row.appendChild(barCell(alt[2]));
        table.appendChild(row);
      });
    });
    tip.appendChild(table);
    tip.appendChild(el("div", "note", data.length > 1
      ? "bold: the word's tokens as the model wrote them; under each, what else it found likely there"
      : "bold: the token the model wrote; under it, what else it found likely there"));
    return true;
  }
  function place(word) {
    var r = word.getBoundingClientRect();
    var w = tip.offsetWidth, h = tip.offsetHeight;
    var x = Math.max(8, Math.min(r.left, window.innerWidth - w - 8));
    var y = r.bottom + 6;
    if (y + h > window.innerHeight - 8) y = Math.max(8, r.top - h - 6);
    tip.style.left = x + "px";
    tip.style.top = y + "px";
  }
  var current = null;
  function show(word) {
    if (word === current) return;
    if (!fill(word)) return;
    current = word;
    tip.hidden = false;
    word.setAttribute("aria-describedby", "tip");
    place(word);
  }
  function hide() {
    if (current) current.removeAttribute("aria-describedby");
    current = null;
    tip.hidden = true;
  }
  function wordOf(target) {
    return target && target.closest ? target.closest(".w[data-tip]") : null;
  }
  var words = document.querySelectorAll(".w[data-tip]");
  Array.prototype.forEach.call(words, function (w) {
    /* the title is the tooltip without this script; with it, one tooltip is enough */
    w.removeAttribute("title");
  });
  document.addEventListener("mouseover", function (ev) {
    var w = wordOf(ev.target);
    if (w) show(w); else if (current && !current.contains(ev.target)) hide();
  });
  document.addEventListener("focusin", function (ev) {
    var w = wordOf(ev.target);
    if (w) show(w); else hide();
  });
  document.addEventListener("focusout", function (ev) { if (wordOf(ev.target) === current) hide(); });
  document.addEventListener("keydown", function (ev) { if (ev.key === "Escape") hide(); });
  window.addEventListener("scroll", function () { if (current) place(current); }, { passive: true });

  root.setAttribute("data-words", String(words.length));
  root.setAttribute("data-ready", "1");
})();
