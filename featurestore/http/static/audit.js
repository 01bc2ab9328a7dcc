// Keys of the label review queue (/ui/audit): a accept, p pick another label, r label is right, s skip.
(function () {
  "use strict";
  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    var target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA")) {
      if (event.key === "Enter" && target.id === "pick-label") {
        event.preventDefault();
        document.getElementById("pick").click();
      }
      return;
    }
    var ids = { a: "accept", r: "right", s: "skip" };
    if (event.key === "p") {
      var select = document.getElementById("pick-label");
      if (select) { event.preventDefault(); select.focus(); }
      return;
    }
    var element = ids[event.key] && document.getElementById(ids[event.key]);
    if (element) {
      event.preventDefault();
      element.click();
    }
  });
}());
