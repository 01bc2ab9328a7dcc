// featurestore web app: a little vanilla JavaScript (no framework, nothing fetched from elsewhere).
"use strict";

// Thumbnails whose file is gone get a placeholder look instead of a broken-image icon.
function markMissing(img) { img.classList.add("missing"); img.alt = img.alt + " (file unavailable)"; }
document.addEventListener("error", (ev) => {
  if (ev.target instanceof HTMLImageElement) markMissing(ev.target);
}, true);

// Filter menus apply on change when picked with the pointer. A menu changed from the keyboard (arrow keys
// step through the options) waits for Enter or the Apply button (WCAG 3.2.2: no change of context on input).
function setupFilters() {
  const form = document.getElementById("filters");
  if (!form) return;
  const keyed = new WeakSet();
  form.addEventListener("keydown", (ev) => {
    const el = ev.target;
    if (el.tagName !== "SELECT") return;
    if (ev.key === "Enter") { ev.preventDefault(); form.requestSubmit(); return; }
    if (ev.key !== "Tab" && ev.key !== "Shift") keyed.add(el);
  });
  form.addEventListener("pointerdown", (ev) => { if (ev.target.tagName === "SELECT") keyed.delete(ev.target); });
  form.addEventListener("change", (ev) => {
    const el = ev.target;
    if (el.name === "run") {
      const runless = el.value === "";
      const option = el.options[el.selectedIndex];
      for (const name of ["predicted", "correct", "below", "held_out", "source", "versus", "outcome"]) {
        const field = form.elements[name];
        // The run's filters carry over to another run (to compare their mistakes); without a run they mean nothing.
        if (field && field.length === undefined && (runless || name === "source" || name === "versus" || name === "outcome")) field.disabled = true;
      }
      const sort = form.elements.sort;
      const below = form.elements.below;
      const needsStored = (below && below.value !== "") || (sort && (sort.value === "confidence" || sort.value === "margin"));
      if (!runless && option && option.dataset.test === "1" && needsStored) {
        const keep = document.createElement("input");
        keep.type = "hidden"; keep.name = "source"; keep.value = "stored";
        form.appendChild(keep); // probabilities live in the stored predictions, not in the test-set ones
      }
      if (runless && sort && (sort.value === "confidence" || sort.value === "margin")) sort.disabled = true;
    }
    if (el.name === "below" || el.type === "text") return;
    if (el.tagName === "SELECT" && keyed.has(el)) {
      form.classList.add("pending");
      const hint = document.getElementById("filters-pending");
      if (hint) hint.hidden = false;
      return;
    }
    form.requestSubmit();
  });
  form.addEventListener("submit", () => {
    for (const el of form.elements) {
      if ((el.tagName === "SELECT" || el.tagName === "INPUT") && el.value === "" && el.name) el.disabled = true;
    }
  });
}

// Keyboard navigation of a grid of links: arrows, Home/End, Enter (native), n/p pages, f filters.
// The tile last opened is focused again when the grid is shown again (the back button, or "back to the grid").
function setupGrid() {
  const grid = document.getElementById("grid");
  if (!grid) return;
  const tiles = () => Array.from(grid.querySelectorAll("a.tile"));
  const memory = "fs-grid-focus:" + location.pathname + location.search;
  const columns = (list) => {
    if (list.length < 2) return 1;
    const top = list[0].offsetTop;
    const n = list.findIndex((t) => t.offsetTop !== top);
    return n === -1 ? list.length : n;
  };
  const focusAt = (list, i) => {
    const t = list[Math.max(0, Math.min(list.length - 1, i))];
    if (t) { t.focus(); t.scrollIntoView({ block: "nearest" }); }
  };
  grid.addEventListener("click", (ev) => {
    const t = ev.target.closest("a.tile");
    if (t) { try { sessionStorage.setItem(memory, t.dataset.id); } catch (e) { /* storage off: no memory */ } }
  });
  let again = grid.querySelector('a.tile[data-focus="1"]');
  if (!again) {
    let id = null;
    try { id = sessionStorage.getItem(memory); } catch (e) { id = null; }
    if (id) again = grid.querySelector('a.tile[data-id="' + CSS.escape(id) + '"]');
  }
  if (again) { again.focus(); again.scrollIntoView({ block: "nearest" }); }
  document.addEventListener("keydown", (ev) => {
    if (ev.altKey || ev.ctrlKey || ev.metaKey) return;
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea" || tag === "button") return;
    const list = tiles();
    const i = list.indexOf(document.activeElement);
    const cols = columns(list);
    const moves = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols };
    if (ev.key in moves) {
      ev.preventDefault();
      focusAt(list, i === -1 ? 0 : i + moves[ev.key]);
    } else if (ev.key === "Home") { ev.preventDefault(); focusAt(list, 0); }
    else if (ev.key === "End") { ev.preventDefault(); focusAt(list, list.length - 1); }
    else if (ev.key === "Enter" && i !== -1) {
      try { sessionStorage.setItem(memory, list[i].dataset.id); } catch (e) { /* no memory */ }
    } else if (ev.key === "n" || ev.key === "p") {
      const link = document.getElementById(ev.key === "n" ? "next-page" : "prev-page");
      if (link) link.click();
    } else if (ev.key === "f") {
      const first = document.querySelector("#filters select");
      if (first) { ev.preventDefault(); first.focus(); }
    }
  });
}

// Image page: arrow keys walk the view the image was opened from, Escape goes back to the grid.
function setupWalk() {
  const walk = document.getElementById("walk");
  if (!walk) return;
  document.addEventListener("keydown", (ev) => {
    if (ev.altKey || ev.ctrlKey || ev.metaKey || ev.shiftKey) return;
    const tag = (ev.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "select" || tag === "textarea") return;
    const link = walk.querySelector('a[data-key="' + ev.key + '"]');
    if (link) { ev.preventDefault(); link.click(); }
  });
}

// Search by photo: drop a file on the zone (or pick one) and the form is sent.
function setupDrop() {
  const drop = document.getElementById("drop");
  const input = document.getElementById("file");
  if (!drop || !input) return;
  const show = () => {
    const label = document.getElementById("drop-name");
    if (label) label.textContent = input.files.length ? input.files[0].name : "";
  };
  input.addEventListener("change", show);
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    if (ev.dataTransfer && ev.dataTransfer.files.length) {
      input.files = ev.dataTransfer.files;
      show();
      document.getElementById("search-form").requestSubmit();
    }
  });
}

// Runs table: exactly two ticked runs enable "compare"; the first ticked is A, the second B.
function setupCompare() {
  const form = document.getElementById("compare-form");
  if (!form) return;
  const button = document.getElementById("compare-button");
  const order = [];
  form.addEventListener("change", (ev) => {
    const box = ev.target;
    if (box.name === "run") {
      const at = order.indexOf(box.value);
      if (box.checked && at === -1) order.push(box.value);
      if (!box.checked && at !== -1) order.splice(at, 1);
    }
    const ticked = form.querySelectorAll('input[name="run"]:checked');
    button.disabled = ticked.length !== 2;
    for (const b of form.querySelectorAll('input[name="run"]')) {
      b.disabled = ticked.length >= 2 && !b.checked;
      const tag = document.getElementById("ab-" + b.value);
      if (tag) tag.textContent = b.checked && order.indexOf(b.value) !== -1 ? ["A", "B"][order.indexOf(b.value)] || "" : "";
    }
  });
  form.addEventListener("submit", (ev) => {
    if (order.length !== 2) return;
    ev.preventDefault();
    window.location.href = form.action + "?run=" + encodeURIComponent(order[0]) + "&run=" + encodeURIComponent(order[1]);
  });
}

// Embedding map: fetch the server-drawn SVG, show the thumbnail on hover, open the image on click.
function setupMap() {
  const box = document.getElementById("map");
  if (!box || !box.dataset.src) return;
  const tip = document.getElementById("tip");
  fetch(box.dataset.src, { credentials: "same-origin" }).then(async (resp) => {
    const html = await resp.text();
    if (!resp.ok) {
      const doc = new DOMParser().parseFromString(html, "text/html");
      const msg = doc.getElementById("error-message");
      box.innerHTML = "";
      const p = document.createElement("p");
      p.className = "error";
      p.id = "map-error";
      p.textContent = msg ? msg.textContent : "the map could not be drawn (HTTP " + resp.status + ")";
      box.appendChild(p);
      return;
    }
    box.innerHTML = html;
    box.dataset.ready = "1";
  }).catch((err) => { box.textContent = "the map could not be loaded: " + err; });
  box.addEventListener("mouseover", (ev) => {
    const c = ev.target.closest("circle[data-id]");
    if (!c || !tip) return;
    const img = tip.querySelector("img");
    img.src = "/v1/images/" + c.dataset.id + "/thumbnail?size=128";
    tip.querySelector("span").textContent = "#" + c.dataset.id + " " + (c.dataset.c || "");
    tip.hidden = false;
  });
  box.addEventListener("mousemove", (ev) => {
    if (!tip || tip.hidden) return;
    tip.style.left = (ev.clientX + 14) + "px";
    tip.style.top = (ev.clientY + 14) + "px";
  });
  box.addEventListener("mouseout", (ev) => {
    if (tip && ev.target.closest("circle[data-id]")) tip.hidden = true;
  });
  box.addEventListener("click", (ev) => {
    const c = ev.target.closest("circle[data-id]");
    if (c) window.location.href = "/ui/images/" + c.dataset.id;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupFilters();
  setupGrid();
  setupWalk();
  setupDrop();
  setupCompare();
  setupMap();
});
