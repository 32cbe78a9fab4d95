// The kiosk page: sliders -> z -> /api/decode and /api/nearest on the same server.
// No framework and no external file: kiosks are often offline.
"use strict";

(() => {
  // While a slider moves, one update is in flight at a time and the newest z wins; this
  // floor keeps a fast server from being asked more than ~25 times a second.
  const MIN_INTERVAL_MS = 40;
  const MORPH_MS = 2500;

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  const state = {
    info: null,
    z: [],
    inputs: [],
    readouts: [],
    slots: { a: null, b: null },
    morphFrame: null,
    inFlight: false,
    dirty: false,
  };

  async function api(path, body) {
    const options = body === undefined ? {} : {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    };
    const response = await fetch(path, options);
    let payload = null;
    try {
      payload = await response.json();
    } catch (err) {
      throw new Error(`${path}: HTTP ${response.status}`);
    }
    if (!response.ok) {
      throw new Error(payload && payload.error ? payload.error : `HTTP ${response.status}`);
    }
    return payload;
  }

  // Errors stay until an update succeeds; other messages fade after a few seconds.
  let statusTimer = null;
  function showStatus(message, isError) {
    const box = $("status");
    clearTimeout(statusTimer);
    box.textContent = message;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = !message;
    if (message && !isError) statusTimer = setTimeout(() => showStatus("", false), 3000);
  }

  const signed = (v) => (v < 0 ? "\u2212" : "+") + Math.abs(v).toFixed(2);
  const percent = (p) => (p >= 0.001 ? `${(100 * p).toFixed(1)}%` : "<0.1%");
  // p(x|z) is an item's share of the match among the catalog's items, not a similarity:
  // 99% means "far likelier than the others", even for a garment nothing resembles. Shoppers
  // get words for how the items compare with each other, and the page says separately
  // whether the garment is near the catalog at all.
  const standing = (p) => (p >= 0.5 ? "Clear favourite" : p >= 0.1 ? "Close contender"
    : "Also similar");

  // ---- sliders -----------------------------------------------------------------------
  function buildSliders() {
    const { latent_dim: d, range } = state.info;
    const box = $("sliders");
    box.textContent = "";
    for (let i = 0; i < d; i++) {
      const row = document.createElement("label");
      row.className = "slider";
      const name = document.createElement("span");
      name.className = "dim";
      name.textContent = `${i + 1}`;
      const input = document.createElement("input");
      input.type = "range";
      input.min = String(-range);
      input.max = String(range);
      input.step = "0.01";
      input.value = "0";
      input.dataset.dim = String(i);
      input.setAttribute("aria-label", `Latent dimension ${i + 1}`);
      const readout = document.createElement("output");
      readout.textContent = signed(0);
      input.addEventListener("input", () => {
        stopMorph();
        state.z[i] = Number(input.value);
        readout.textContent = signed(state.z[i]);
        publishZ();
        scheduleUpdate();
      });
      row.append(name, input, readout);
      box.append(row);
      state.inputs.push(input);
      state.readouts.push(readout);
    }
    state.z = new Array(d).fill(0);
  }

  // Sliders show z clamped to their range; z itself keeps an item's exact mu.
  function setZ(z) {
    const range = state.info.range;
    state.z = z.slice();
    state.z.forEach((value, i) => {
      state.inputs[i].value = String(Math.max(-range, Math.min(range, value)));
      state.readouts[i].textContent = signed(value);
    });
    publishZ();
    scheduleUpdate();
  }

  // The z the sliders stand for, readable by tests and by anyone inspecting the page.
  function publishZ() {
    $("sliders").dataset.z = JSON.stringify(state.z);
  }

  // ---- live updates --------------------------------------------------------------------
  function scheduleUpdate() {
    state.dirty = true;
    if (!state.inFlight) pump();
  }

  async function pump() {
    state.inFlight = true;
    document.body.dataset.busy = "true";
    while (state.dirty) {
      state.dirty = false;
      const z = state.z.slice();
      const started = performance.now();
      try {
        const [decoded, near] = await Promise.all([
          api("/api/decode", { z }),
          api("/api/nearest", { z, k: state.info.k, by: "decoded" }),
        ]);
        renderGarment(decoded);
        renderMatches(near);
        if ($("status").classList.contains("error")) showStatus("", false);
      } catch (err) {
        showStatus(`Could not update: ${err.message}`, true);
      }
      const wait = MIN_INTERVAL_MS - (performance.now() - started);
      if (wait > 0) await sleep(wait);
    }
    state.inFlight = false;
    document.body.dataset.busy = "false";
  }

  function renderGarment(decoded) {
    const img = $("garment");
    img.src = decoded.image;
    img.dataset.z = JSON.stringify(decoded.z);
  }

  function renderMatches(near) {
    const list = $("matches");
    list.textContent = "";
    for (const item of near.results) {
      const li = document.createElement("li");
      li.className = "match";

      const open = document.createElement("button");
      open.type = "button";
      open.className = "item";
      open.dataset.id = String(item.id);
      open.setAttribute("aria-label", `Load ${item.label} #${item.id} into the sliders`);
      open.title = `catalog #${item.id}, log q(z|x) = ${item.log_likelihood.toFixed(2)}`;
      const img = document.createElement("img");
      img.src = item.image;
      img.alt = item.label;
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = item.label;
      const sure = document.createElement("span");
      sure.className = "sure";
      sure.textContent = near.far ? "Nearest we have" : standing(item.probability);
      sure.title = `${percent(item.probability)} of the match among catalog items`;
      open.append(img, label, sure);
      open.addEventListener("click", () => loadItem(item.id));

      const pick = document.createElement("div");
      pick.className = "pick";
      for (const slot of ["a", "b"]) {
        const button = document.createElement("button");
        button.type = "button";
        button.dataset.slot = slot;
        button.textContent = slot.toUpperCase();
        button.setAttribute("aria-label", `Use ${item.label} #${item.id} as morph ${slot.toUpperCase()}`);
        button.addEventListener("click", () => chooseSlot(slot, item.id));
        pick.append(button);
      }
      li.append(open, pick);
      list.append(li);
    }
    list.dataset.z = JSON.stringify(near.z);
    const fit = $("fit");
    fit.textContent = near.far
      ? "Nothing in our catalog looks much like this design. These are the nearest pieces we have."
      : "These pieces look most like your design.";
    fit.classList.toggle("far", near.far);
    fit.dataset.distance = String(near.distance);
  }

  // ---- actions -------------------------------------------------------------------------
  async function loadItem(id) {
    stopMorph();
    try {
      const item = await api(`/api/item/${encodeURIComponent(id)}`);
      setZ(item.mu);
      showStatus(`Loaded ${item.label} #${item.id}`, false);
    } catch (err) {
      showStatus(`Could not load item ${id}: ${err.message}`, true);
    }
  }

  async function surprise() {
    stopMorph();
    try {
      setZ((await api("/api/sample")).z);
    } catch (err) {
      showStatus(`Could not sample: ${err.message}`, true);
    }
  }

  function reset() {
    stopMorph();
    setZ(new Array(state.info.latent_dim).fill(0));
  }

  async function chooseSlot(slot, id) {
    try {
      const item = await api(`/api/item/${encodeURIComponent(id)}`);
      state.slots[slot] = item;
      const figure = $(`slot-${slot}`);
      figure.querySelector("img").src = item.image;
      figure.querySelector("img").alt = item.label;
      figure.querySelector("figcaption").textContent = item.label;
      figure.title = `${item.label} #${item.id}`;
      figure.dataset.id = String(item.id);
      const ready = Boolean(state.slots.a && state.slots.b);
      $("morph-t").disabled = !ready;
      $("morph-play").disabled = !ready;
      $("morph-hint").textContent = ready
        ? "Drag the morph slider, or press Morph."
        : `Now choose ${state.slots.a ? "B" : "A"}.`;
    } catch (err) {
      showStatus(`Could not choose item ${id}: ${err.message}`, true);
    }
  }

  function morphTo(t) {
    const a = state.slots.a.mu;
    const b = state.slots.b.mu;
    setZ(a.map((value, i) => (1 - t) * value + t * b[i]));
  }

  function stopMorph() {
    if (state.morphFrame !== null) {
      cancelAnimationFrame(state.morphFrame);
      state.morphFrame = null;
      document.body.dataset.morphing = "false";
    }
  }

  function playMorph() {
    stopMorph();
    const slider = $("morph-t");
    const start = performance.now();
    document.body.dataset.morphing = "true";
    const step = (now) => {
      const t = Math.min(1, (now - start) / MORPH_MS);
      const eased = t < 1 ? 0.5 - 0.5 * Math.cos(Math.PI * t) : 1;
      slider.value = String(eased);
      morphTo(eased);
      if (t < 1) {
        state.morphFrame = requestAnimationFrame(step);
      } else {
        state.morphFrame = null;
        document.body.dataset.morphing = "false";
      }
    };
    state.morphFrame = requestAnimationFrame(step);
  }

  async function start() {
    showStatus("Loading\u2026", false);
    try {
      state.info = await api("/api/info");
    } catch (err) {
      showStatus(`The kiosk server did not answer: ${err.message}`, true);
      return;
    }
    showStatus("", false);
    buildSliders();
    $("surprise").addEventListener("click", surprise);
    $("reset").addEventListener("click", reset);
    $("morph-t").addEventListener("input", (event) => {
      stopMorph();
      morphTo(Number(event.target.value));
    });
    $("morph-play").addEventListener("click", playMorph);
    document.body.dataset.ready = "true";
    setZ(state.z);
  }

  start();
})();
