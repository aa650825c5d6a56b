// Runs before the page paints: apply a remembered theme choice so there is no flash.
// Without a choice ("system") the stylesheet follows prefers-color-scheme.
(function () {
  try {
    var t = localStorage.getItem("hexin.theme");
    if (t === "light" || t === "dark") document.documentElement.dataset.theme = t;
  } catch (e) { /* storage may be disabled */ }
})();
