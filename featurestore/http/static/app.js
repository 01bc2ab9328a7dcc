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

// Embedding map: fetch the server-drawn SVG (a long t-SNE answers 202 with its progress: poll, then fetch
// again), show the thumbnail on hover, open the image on click; zoom, pan, legend toggles, lasso -> grid.
function showMapError(box, html, status) {
  const doc = new DOMParser().parseFromString(html, "text/html");
  const msg = doc.getElementById("error-message");
  box.innerHTML = "";
  const p = document.createElement("p");
  p.className = "error";
  p.id = "map-error";
  p.textContent = msg ? msg.textContent : "the map could not be drawn (HTTP " + status + ")";
  box.appendChild(p);
}

function loadMap(box) {
  fetch(box.dataset.src, { credentials: "same-origin" }).then(async (resp) => {
    const html = await resp.text();
    if (!resp.ok) { showMapError(box, html, resp.status); return; }
    box.innerHTML = html;
    if (resp.status === 202) { followProgress(box); return; }
    box.dataset.ready = "1";
    setupMapTools(box);
  }).catch((err) => { box.textContent = "the map could not be loaded: " + err; });
}

function followProgress(box) {
  const panel = document.getElementById("map-progress");
  if (!panel) return;
  const cancel = document.getElementById("map-cancel");
  let stopped = false;
  if (cancel) {
    cancel.addEventListener("click", () => {
      stopped = true;
      const params = new URLSearchParams(box.dataset.src.split("?")[1] || "");
      const body = new URLSearchParams();
      for (const k of ["features", "method", "n"]) if (params.get(k)) body.set(k, params.get(k));
      fetch("/ui/map/cancel", { method: "POST", credentials: "same-origin", body: body }).then(() => {
        panel.innerHTML = '<p class="note" id="map-cancelled">Cancelled. Draw again to restart it.</p>';
      });
    });
  }
  const tick = () => {
    if (stopped) return;
    fetch(panel.dataset.status, { credentials: "same-origin" }).then((r) => r.json()).then((st) => {
      if (st.state === "running") {
        const el = document.getElementById("map-elapsed");
        if (el) el.textContent = Math.round(st.seconds);
        const bar = document.getElementById("map-bar");
        if (bar && st.estimate) { bar.max = st.estimate; bar.value = Math.min(st.seconds, st.estimate); }
        setTimeout(tick, 1000);
      } else if (st.state === "done") {
        loadMap(box);
      } else if (st.state !== "cancelled") {
        panel.innerHTML = "";
        const p = document.createElement("p");
        p.className = "error"; p.id = "map-error";
        p.textContent = "the map could not be computed: " + (st.message || st.state);
        panel.appendChild(p);
      }
    });
  };
  setTimeout(tick, 500);
}

function setupMapTools(box) {
  const svg = box.querySelector("svg.map");
  if (!svg) return;
  const full = svg.viewBox.baseVal;
  const home = { x: full.x, y: full.y, w: full.width, h: full.height };
  let view = Object.assign({}, home);
  const apply = () => svg.setAttribute("viewBox", view.x + " " + view.y + " " + view.w + " " + view.h);
  const toSvg = (ev) => {
    const rect = svg.getBoundingClientRect();
    return { x: view.x + (ev.clientX - rect.left) / rect.width * view.w,
             y: view.y + (ev.clientY - rect.top) / rect.height * view.h };
  };
  const zoom = (factor, cx, cy) => {
    const w = Math.min(home.w, Math.max(home.w / 50, view.w * factor));
    const h = w * home.h / home.w;
    cx = cx === undefined ? view.x + view.w / 2 : cx;
    cy = cy === undefined ? view.y + view.h / 2 : cy;
    view = { x: cx - (cx - view.x) * w / view.w, y: cy - (cy - view.y) * h / view.h, w: w, h: h };
    apply();
  };
  svg.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const p = toSvg(ev);
    zoom(ev.deltaY > 0 ? 1.25 : 0.8, p.x, p.y);
  }, { passive: false });
  for (const b of box.querySelectorAll("[data-zoom]")) {
    b.addEventListener("click", () => {
      if (b.dataset.zoom === "in") zoom(0.8);
      else if (b.dataset.zoom === "out") zoom(1.25);
      else { view = Object.assign({}, home); apply(); }
    });
  }
  svg.tabIndex = 0;
  svg.addEventListener("keydown", (ev) => {
    const step = view.w / 10;
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (ev.key === "+" || ev.key === "=") { ev.preventDefault(); zoom(0.8); }
    else if (ev.key === "-") { ev.preventDefault(); zoom(1.25); }
    else if (ev.key in moves) { ev.preventDefault(); view.x += moves[ev.key][0]; view.y += moves[ev.key][1]; apply(); }
  });
  // Legend toggles: hide or show the points of one legend entry.
  for (const b of box.querySelectorAll("button.legend-toggle")) {
    b.addEventListener("click", () => {
      const on = b.getAttribute("aria-pressed") !== "true";
      b.setAttribute("aria-pressed", on ? "true" : "false");
      for (const c of svg.querySelectorAll('circle[data-g="' + b.dataset.g + '"]')) c.classList.toggle("off", !on);
    });
  }
  // Pan by dragging; lasso by dragging with Shift or with the Lasso button on.
  const lassoButton = document.getElementById("lasso-toggle");
  const form = document.getElementById("lasso-form");
  let lassoOn = false;
  if (lassoButton) lassoButton.addEventListener("click", () => {
    lassoOn = !lassoOn;
    lassoButton.setAttribute("aria-pressed", lassoOn ? "true" : "false");
  });
  let drag = null;
  let path = null;
  svg.addEventListener("pointerdown", (ev) => {
    if (ev.button !== 0) return;
    const lasso = lassoOn || ev.shiftKey;
    drag = { lasso: lasso, start: toSvg(ev), moved: false, points: [toSvg(ev)], view: Object.assign({}, view) };
    if (lasso) {
      path = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
      path.setAttribute("class", "lasso");
      svg.appendChild(path);
    }
  });
  svg.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const p = toSvg(ev);
    if (!drag.moved && Math.abs(p.x - drag.start.x) + Math.abs(p.y - drag.start.y) > view.w / 200) {
      drag.moved = true;
      svg.setPointerCapture(ev.pointerId); // only once it is a drag, so a plain click still reaches its point
    }
    if (drag.lasso) {
      drag.points.push(p);
      path.setAttribute("points", drag.points.map((q) => q.x + "," + q.y).join(" "));
    } else if (drag.moved) {
      const rect = svg.getBoundingClientRect();
      view.x = drag.view.x - (ev.clientX - rect.left) / rect.width * view.w + (drag.start.x - drag.view.x);
      view.y = drag.view.y - (ev.clientY - rect.top) / rect.height * view.h + (drag.start.y - drag.view.y);
      apply();
    }
  });
  svg.addEventListener("pointerup", () => {
    if (!drag) return;
    const done = drag;
    drag = null;
    if (done.lasso && done.points.length > 2) {
      const inside = (x, y, poly) => {
        let hit = false;
        for (let i = 0, j = poly.length - 1; i < poly.length; j = i++) {
          const a = poly[i], b = poly[j];
          if ((a.y > y) !== (b.y > y) && x < (b.x - a.x) * (y - a.y) / (b.y - a.y) + a.x) hit = !hit;
        }
        return hit;
      };
      const ids = [];
      for (const c of svg.querySelectorAll("circle[data-id]:not(.off)")) {
        if (inside(c.cx.baseVal.value, c.cy.baseVal.value, done.points)) { ids.push(c.dataset.id); c.classList.add("picked"); }
      }
      if (form) {
        document.getElementById("lasso-ids").value = ids.join(",");
        document.getElementById("lasso-count").textContent = ids.length + " image" + (ids.length === 1 ? "" : "s") + " selected.";
        form.hidden = ids.length === 0;
      }
    }
    if (done.moved) box.dataset.dragged = "1";
  });
  const clear = document.getElementById("lasso-clear");
  if (clear) clear.addEventListener("click", () => {
    for (const c of svg.querySelectorAll("circle.picked")) c.classList.remove("picked");
    for (const l of svg.querySelectorAll("polyline.lasso")) l.remove();
    form.hidden = true;
  });
}

function setupMap() {
  const box = document.getElementById("map");
  if (!box || !box.dataset.src) return;
  const tip = document.getElementById("tip");
  loadMap(box);
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
    if (box.dataset.dragged) { delete box.dataset.dragged; return; } // the end of a pan or a lasso
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
