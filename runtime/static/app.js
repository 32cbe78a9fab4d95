// The kiosk page: sliders -> z -> decode and nearest, answered by an engine: the server's
// JSON API (`vae-run serve`), or the page itself (engine.js, in a static folder made by
// `vae-run export-web`). No framework and nothing fetched from elsewhere: kiosks are often
// offline. qrcode.js (a vendored encoder) draws QR codes locally.
"use strict";

(() => {
  // While z changes, one view request (decode and nearest) is in flight at a time and the
  // newest z wins; this floor keeps a fast server from being asked more than ~25 times a second.
  const MIN_INTERVAL_MS = 40;
  const MORPH_MS = 2500;
  const REQUEST_TIMEOUT_MS = 10000;
  const RETRY_FIRST_MS = 500;
  const RETRY_MAX_MS = 5000;
  // Slider previews wait until z rests this long: 2d decodes per z are not worth it mid-drag.
  const ENDS_DELAY_MS = 250;
  // After a finger lifts from the results, the list stays put this long so its tap lands.
  const HOLD_AFTER_TOUCH_MS = 350;
  const STATUS_MS = 3000;
  // Attract mode walks from item to unseen neighbour, which stays in one class for hours;
  // every ATTRACT_JUMP-th step it jumps to the item nearest a random design instead.
  const ATTRACT_JUMP = 4;

  const $ = (id) => document.getElementById(id);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  const state = {
    info: null,
    z: [],
    inputs: [],
    ends: [],            // per slider: [low preview img, high preview img]
    endsKey: null,       // the z (as JSON) the previews show
    endsTimer: null,
    // Every action that sets z (slider, tap, surprise, start over, morph, idle reset) takes
    // the next number; an answer that arrives for an older number is dropped: newest wins.
    intent: 0,
    // The same per blend slot: a later press of A (or B), or start over, wins over an
    // earlier press whose answer is still on its way.
    picks: { a: 0, b: 0 },
    slots: { a: null, b: null },
    morphFrame: null,
    inFlight: false,
    dirty: false,
    listHeld: false,     // a finger is on the results: their list is not rebuilt under it
    heldNear: null,
    releaseTimer: null,
    idleTimer: null,
    attractTimer: null,
    shown: new Set(),    // items attract mode has shown since it started
    attractSteps: 0,
  };

  let engine = null;

  class ApiFailure extends Error {
    constructor(message, retry) {
      super(message);
      this.retry = retry; // the server was unreachable or failed: the same request may work later
    }
  }

  async function api(path, body) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    const options = { signal: controller.signal, cache: "no-store" };
    if (body !== undefined) {
      Object.assign(options, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    }
    let response;
    let payload = null;
    try {
      response = await fetch(path, options);
      payload = await response.json();
    } catch (err) {
      if (!response) throw new ApiFailure("the kiosk server is not answering", true);
      throw new ApiFailure(`HTTP ${response.status}`, response.status >= 500);
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) {
      const message = payload && payload.error ? payload.error : `HTTP ${response.status}`;
      throw new ApiFailure(message, response.status >= 500 || response.status === 408);
    }
    return payload;
  }

  // The engine over the server's API. Its failures may carry retry (the server was away);
  // the in-page engine's never do.
  const serverEngine = {
    kind: "server",
    info: () => api("/api/info"),
    sample: () => api("/api/sample"),
    decode: (z) => api("/api/decode", { z }),
    ends: (z) => api("/api/ends", { z }),
    nearest: (z, k, by) => api("/api/nearest", { z, k, by }),
    // One page update: the decoded garment and its matches, in one request.
    view: (z, k, by) => api("/api/view", { z, k, by }),
    item: (id) => api(itemPath(id)),
  };

  // The server's API (`vae-run serve`), or where the page comes from a folder made by
  // `vae-run export-web`, the in-page engine: there api/info is a file whose "site" names
  // the files the engine loads, each checked against its sha256 first. A served page whose
  // server is not up yet keeps to the server and waits for it.
  async function chooseEngine() {
    let info = null;
    try {
      const response = await fetch("api/info", { cache: "no-cache" });
      if (response.ok) info = await response.json();
    } catch (err) {
      // the kiosk server is not up yet
    }
    if (!info || !info.site) return serverEngine;
    const site = info.site;
    delete info.site;
    const loaded = await VaeEngine.PageEngine.load(info, site,
      new URL(".", window.location.href));
    loaded.kind = "page";
    // Every file is cached on this first load, so the kiosk keeps working offline.
    if ("serviceWorker" in navigator) {
      navigator.serviceWorker.register("sw.js").then(() => navigator.serviceWorker.ready)
        .then(() => { document.body.dataset.offlineReady = "true"; })
        .catch((err) => showStatus(`Offline use is not available: ${err.message}`, true));
    }
    return loaded;
  }

  // Errors stay until the next success; other messages fade. Only actions write here, never
  // a slider's every step, so a screen reader is not flooded.
  let statusTimer = null;
  function showStatus(message, isError) {
    const box = $("status");
    clearTimeout(statusTimer);
    box.textContent = message;
    box.classList.toggle("error", Boolean(isError));
    box.hidden = !message;
    if (message && !isError) statusTimer = setTimeout(() => showStatus("", false), STATUS_MS);
  }

  const percent = (p) => (p >= 0.001 ? `${(100 * p).toFixed(1)}%` : "<0.1%");
  // p(x|z) is an item's share of the match among the catalog's items, not a similarity:
  // shoppers get words for how the items compare with each other, and the page says
  // separately whether the garment is near the catalog at all.
  const standing = (p) => (p >= 0.5 ? "Clear favourite" : p >= 0.1 ? "Close contender"
    : "Also similar");
  const metadataOf = (item) => (item.metadata && typeof item.metadata === "object"
    ? item.metadata : {});
  const nameOf = (item) => metadataOf(item).name || item.label || `Item ${item.id}`;
  const itemPath = (id) => `/api/item/${encodeURIComponent(String(id))}`;
  const sameZ = (a, b) => a.length === b.length && a.every((v, i) => v === b[i]);

  function act() {
    state.intent += 1;
    stopMorph();
    return state.intent;
  }

  // ---- sliders -----------------------------------------------------------------------
  function sliderWords(i) {
    const ends = (state.info.slider_ends || [])[i] || ["", ""];
    const [low, high] = ends;
    return low && high && low !== high ? { low, high } : null;
  }

  function buildSliders() {
    const { latent_dim: d, range } = state.info;
    const box = $("sliders");
    box.textContent = "";
    box.style.setProperty("--dims", String(d));
    for (let i = 0; i < d; i++) {
      const words = sliderWords(i);
      const row = document.createElement("div");
      row.className = "slider";
      const low = document.createElement("img");
      const high = document.createElement("img");
      low.className = "end low";
      high.className = "end high";
      low.alt = high.alt = "";
      const middle = document.createElement("label");
      middle.className = "track";
      const caption = document.createElement("span");
      caption.className = "ends";
      const lowWord = document.createElement("span");
      const highWord = document.createElement("span");
      lowWord.textContent = words ? words.low : `Shape ${i + 1}`;
      highWord.textContent = words ? words.high : "";
      caption.append(lowWord, highWord);
      const input = document.createElement("input");
      input.type = "range";
      input.min = String(-range);
      input.max = String(range);
      input.step = "0.01";
      input.value = "0";
      input.dataset.dim = String(i);
      input.setAttribute("aria-label", words
        ? `Shape ${i + 1}: towards ${words.low} or towards ${words.high}` : `Shape ${i + 1}`);
      input.addEventListener("input", () => {
        act();
        state.z[i] = Number(input.value);
        publishZ();
        scheduleUpdate();
      });
      middle.append(caption, input);
      row.append(low, middle, high);
      box.append(row);
      state.inputs.push(input);
      state.ends.push([low, high]);
    }
    state.z = new Array(d).fill(0);
  }

  // Sliders show z clamped to their range; z itself keeps an item's exact mu.
  function setZ(z) {
    const range = state.info.range;
    state.z = z.slice();
    state.z.forEach((value, i) => {
      state.inputs[i].value = String(Math.max(-range, Math.min(range, value)));
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
    clearTimeout(state.endsTimer);
    if (!state.inFlight) pump();
  }

  // Sends the newest z until the picture and the list show it. A failure the server may get
  // over (unreachable, 5xx) is retried with the newest z, with growing pauses, until it
  // answers: nobody has to touch the screen for the page to recover.
  async function pump() {
    state.inFlight = true;
    document.body.dataset.busy = "true";
    let retryMs = RETRY_FIRST_MS;
    while (state.dirty) {
      state.dirty = false;
      const z = state.z.slice();
      const started = performance.now();
      try {
        const view = await engine.view(z, state.info.k, "decoded");
        setOnline(true);
        retryMs = RETRY_FIRST_MS;
        renderGarment(view.decoded);
        renderMatches(view.nearest);
        if ($("status").classList.contains("error")) showStatus("", false);
      } catch (err) {
        if (err.retry) {
          setOnline(false);
          state.dirty = true;
          await sleep(retryMs);
          retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
          continue;
        }
        showStatus(`Could not update: ${err.message}`, true);
        checkServer();
      }
      const wait = MIN_INTERVAL_MS - (performance.now() - started);
      if (wait > 0) await sleep(wait);
    }
    state.inFlight = false;
    document.body.dataset.busy = "false";
    clearTimeout(state.endsTimer);
    state.endsTimer = setTimeout(refreshEnds, ENDS_DELAY_MS);
  }

  // While the server is away the picture is marked stale, so it never passes for the
  // garment the sliders now describe.
  function setOnline(online) {
    const was = document.body.dataset.offline === "true";
    document.body.dataset.offline = online ? "false" : "true";
    if (!online && !was) showStatus("Reconnecting to the kiosk server\u2026", true);
    if (online && was) {
      showStatus("", false);
      checkServer();
    }
  }

  // An action (tap, Surprise me, A/B) that failed because the server was away is not
  // repeated, but the page must not keep its error once the server is back: the pump
  // re-sends the z on screen until it is answered, shows "Reconnecting" meanwhile and
  // clears the error when the server answers.
  function healLater(err) {
    if (err && err.retry) scheduleUpdate();
  }

  // A server restarted with another bundle (a new model or catalog) answers differently from
  // the one this page was built for: the page starts afresh rather than showing sliders,
  // ranges and items that no longer exist.
  async function checkServer() {
    if (engine.kind !== "server") return;
    try {
      const info = await api("/api/info");
      if (JSON.stringify(info) !== JSON.stringify(state.info)) window.location.reload();
    } catch (err) {
      // unreachable: the pump keeps trying and checks again when it is back
    }
  }

  function renderGarment(decoded) {
    const img = $("garment");
    img.src = decoded.image;
    img.dataset.z = JSON.stringify(decoded.z);
  }

  async function refreshEnds() {
    const z = state.z.slice();
    const key = JSON.stringify(z);
    if (key === state.endsKey || state.inFlight) return;
    try {
      const answer = await engine.ends(z);
      if (!sameZ(z, state.z)) return; // z moved on: the pump schedules the next previews
      answer.ends.forEach(([low, high], i) => {
        state.ends[i][0].src = low;
        state.ends[i][1].src = high;
      });
      state.endsKey = key;
      $("sliders").dataset.endsZ = key;
    } catch (err) {
      // Previews are a hint: an outage is reported, and healed, by the pump.
    }
  }

  // ---- results -------------------------------------------------------------------------
  // The link as a QR code, or null where it is longer than a QR code holds (about 2,300
  // bytes): that item then shows no code rather than stopping the whole list.
  function qrCode(text) {
    const code = qrcode(0, "M");
    code.addData(text);
    try {
      code.make();
    } catch (err) {
      return null;
    }
    const count = code.getModuleCount();
    const quiet = 4;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `${-quiet} ${-quiet} ${count + 2 * quiet} ${count + 2 * quiet}`);
    svg.setAttribute("shape-rendering", "crispEdges");
    svg.setAttribute("role", "img");
    const back = document.createElementNS(ns, "rect");
    for (const [name, value] of [["x", -quiet], ["y", -quiet], ["width", count + 2 * quiet],
      ["height", count + 2 * quiet], ["fill", "#fff"]]) back.setAttribute(name, String(value));
    let path = "";
    for (let row = 0; row < count; row++) {
      for (let col = 0; col < count; col++) {
        if (code.isDark(row, col)) path += `M${col} ${row}h1v1h-1z`;
      }
    }
    const dark = document.createElementNS(ns, "path");
    dark.setAttribute("d", path);
    dark.setAttribute("fill", "#000");
    svg.append(back, dark);
    return svg;
  }

  function buildMatch() {
    const li = document.createElement("li");
    li.className = "match";
    const open = document.createElement("button");
    open.type = "button";
    open.className = "item";
    const img = document.createElement("img");
    img.alt = "";
    img.addEventListener("load", () => img.classList.toggle("pixels", img.naturalWidth <= 64));
    const name = document.createElement("span");
    name.className = "name";
    const price = document.createElement("span");
    price.className = "price";
    const sure = document.createElement("span");
    sure.className = "sure";
    open.append(img, name, price, sure);
    const qr = document.createElement("div");
    qr.className = "qr";
    const pick = document.createElement("div");
    pick.className = "pick";
    for (const slot of ["a", "b"]) {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.slot = slot;
      button.textContent = slot.toUpperCase();
      pick.append(button);
    }
    li.append(open, qr, pick);
    return li;
  }

  function fillMatch(li, item, far) {
    const metadata = metadataOf(item);
    const name = nameOf(item);
    li.item = item;
    li.dataset.id = String(item.id);
    const open = li.querySelector(".item");
    open.dataset.id = String(item.id);
    open.setAttribute("aria-label", `${name}${metadata.price ? `, ${metadata.price}` : ""}: `
      + "load it into the sliders");
    open.title = `log-likelihood ${item.log_likelihood.toFixed(2)}, `
      + `${percent(item.probability)} of the match among catalog items`;
    const img = open.querySelector("img");
    if (img.getAttribute("src") !== item.image) img.src = item.image;
    open.querySelector(".name").textContent = name;
    const price = open.querySelector(".price");
    price.textContent = metadata.price || "";
    price.hidden = !metadata.price;
    open.querySelector(".sure").textContent = far ? "Nearest we have" : standing(item.probability);
    const qr = li.querySelector(".qr");
    const url = typeof metadata.url === "string" && /^https?:\/\//i.test(metadata.url)
      ? metadata.url : "";
    if (qr.dataset.url !== url) {
      qr.textContent = "";
      qr.dataset.url = url;
      const svg = url ? qrCode(url) : null;
      if (svg) {
        svg.setAttribute("aria-label", `QR code: ${name} in the online shop`);
        qr.append(svg);
      }
    }
    qr.hidden = !qr.firstChild;
    for (const button of li.querySelectorAll(".pick button")) {
      const slot = button.dataset.slot.toUpperCase();
      button.setAttribute("aria-label", `Use ${name} as blend ${slot}`);
    }
  }

  // Items that stay in the list keep their elements, so a focused result keeps its focus
  // (after Enter, say) and its picture does not reload.
  function renderMatches(near) {
    if (state.listHeld) {
      state.heldNear = near;
      return;
    }
    const list = $("matches");
    const active = document.activeElement;
    const focused = active && list.contains(active)
      ? { id: active.closest("li").dataset.id, slot: active.dataset.slot || null } : null;
    const previous = new Map([...list.children].map((li) => [li.dataset.id, li]));
    const items = near.results.map((item) => {
      const li = previous.get(String(item.id)) || buildMatch();
      fillMatch(li, item, near.far);
      return li;
    });
    items.forEach((li, position) => {
      if (list.children[position] !== li) list.insertBefore(li, list.children[position] || null);
    });
    while (list.children.length > items.length) list.lastElementChild.remove();
    if (focused && !list.contains(document.activeElement)) {
      const li = items.find((each) => each.dataset.id === focused.id) || items[0];
      if (li) {
        const target = focused.slot ? li.querySelector(`[data-slot='${focused.slot}']`)
          : li.querySelector(".item");
        target.focus({ preventScroll: true });
      }
    }
    list.dataset.z = JSON.stringify(near.z);
    const fit = $("fit");
    fit.textContent = near.far
      ? "Nothing in our catalog looks much like this design. These are the nearest pieces we have."
      : "These pieces look most like your design. Tap one to try it.";
    fit.classList.toggle("far", near.far);
    fit.dataset.distance = String(near.distance);
  }

  function holdList() {
    clearTimeout(state.releaseTimer);
    state.listHeld = true;
  }

  function releaseListSoon() {
    if (!state.listHeld) return;
    clearTimeout(state.releaseTimer);
    state.releaseTimer = setTimeout(() => {
      state.listHeld = false;
      const near = state.heldNear;
      state.heldNear = null;
      if (near) renderMatches(near);
    }, HOLD_AFTER_TOUCH_MS);
  }

  function onResultClick(event) {
    const button = event.target.closest("button");
    const li = button && button.closest("li.match");
    if (!li || !li.item) return;
    if (button.dataset.slot) chooseSlot(button.dataset.slot, li.item);
    else loadItem(li.item);
  }

  // ---- actions -------------------------------------------------------------------------
  async function loadItem(item, quiet = false) {
    const ticket = act();
    try {
      const full = await engine.item(item.id);
      if (ticket !== state.intent) return;
      setZ(full.mu);
      document.body.dataset.loaded = String(item.id);
      if (!quiet) showStatus(`Loaded ${nameOf(item)}`, false);
    } catch (err) {
      if (ticket === state.intent && !quiet) {
        showStatus(`Could not load ${nameOf(item)}: ${err.message}`, true);
      }
      healLater(err);
    }
  }

  async function surprise() {
    const ticket = act();
    try {
      const sample = await engine.sample();
      if (ticket === state.intent) setZ(sample.z);
    } catch (err) {
      if (ticket === state.intent) showStatus(`Could not surprise you: ${err.message}`, true);
      healLater(err);
    }
  }

  function clearSlots() {
    state.picks.a += 1;
    state.picks.b += 1;
    state.slots = { a: null, b: null };
    for (const slot of ["a", "b"]) {
      const figure = $(`slot-${slot}`);
      figure.querySelector("img").removeAttribute("src");
      figure.querySelector("img").alt = "";
      figure.querySelector("figcaption").textContent = "none";
      delete figure.dataset.id;
    }
    $("morph-t").value = "0";
    $("morph-t").disabled = true;
    $("morph-play").disabled = true;
    $("morph-hint").textContent = "Press A under one piece and B under another.";
  }

  // The state a shopper walking up finds: the opening garment, nothing picked, at the top.
  function startOver() {
    act();
    clearSlots();
    setZ(state.info.opening_z);
  }

  async function chooseSlot(slot, item) {
    const ticket = ++state.picks[slot];
    try {
      const full = await engine.item(item.id);
      if (ticket !== state.picks[slot]) return;
      state.slots[slot] = full;
      const figure = $(`slot-${slot}`);
      figure.querySelector("img").src = item.image;
      figure.querySelector("img").alt = nameOf(item);
      figure.querySelector("figcaption").textContent = nameOf(item);
      figure.dataset.id = String(item.id);
      const ready = Boolean(state.slots.a && state.slots.b);
      $("morph-t").disabled = !ready;
      $("morph-play").disabled = !ready;
      $("morph-hint").textContent = ready
        ? "Drag the blend slider, or press Blend."
        : `Now press ${state.slots.a ? "B" : "A"} under another piece.`;
    } catch (err) {
      showStatus(`Could not choose ${nameOf(item)}: ${err.message}`, true);
      healLater(err);
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
    act();
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

  // ---- the kiosk around the page ---------------------------------------------------------
  function lockDown() {
    const refuse = (event) => event.preventDefault();
    document.addEventListener("contextmenu", refuse);
    document.addEventListener("dragstart", refuse);
    document.addEventListener("selectstart", refuse);
    document.addEventListener("gesturestart", refuse); // Safari's pinch
    // Two fingers never zoom, even where touch-action is not honoured.
    document.addEventListener("touchmove", (event) => {
      if (event.touches.length > 1) event.preventDefault();
    }, { passive: false });
    document.addEventListener("wheel", (event) => {
      if (event.ctrlKey) event.preventDefault();
    }, { passive: false });
    document.addEventListener("keydown", (event) => {
      if ((event.ctrlKey || event.metaKey) && ["+", "-", "=", "0"].includes(event.key)) {
        event.preventDefault();
      }
    });
  }

  // Attract mode walks from garment to garment through the catalog: each step loads the
  // best result of the garment on screen that it has not shown yet, or, every
  // ATTRACT_JUMP-th step, the item nearest a random design (GET /api/sample).
  async function attractStep() {
    state.attractSteps += 1;
    let next;
    if (state.attractSteps % ATTRACT_JUMP === 0) {
      try {
        const sample = await engine.sample();
        const near = await engine.nearest(sample.z, 1, "decoded");
        if (state.attractTimer === null) return; // a touch ended attract mode meanwhile
        next = near.results[0];
      } catch (err) {
        return; // an outage: the pump reports it and heals
      }
    } else {
      next = [...$("matches").children].map((li) => li.item)
        .find((item) => item && !state.shown.has(String(item.id)));
    }
    if (next) {
      state.shown.add(String(next.id));
      loadItem(next, true);
    } else {
      state.shown.clear();
    }
  }

  function stopAttract() {
    clearInterval(state.attractTimer);
    state.attractTimer = null;
    state.attractSteps = 0;
    state.shown.clear();
    document.body.dataset.attract = "false";
  }

  function watchIdle() {
    const seconds = Number(state.info.idle_reset) || 0;
    const attract = Number(state.info.attract) || 0;
    if (seconds <= 0) return;
    const restart = () => {
      stopAttract();
      clearTimeout(state.idleTimer);
      state.idleTimer = setTimeout(() => {
        if (document.activeElement) document.activeElement.blur();
        window.scrollTo(0, 0);
        $("matches").scrollTop = 0;
        checkServer();
        showStatus("", false);
        startOver();
        document.body.dataset.idleResets = String(Number(document.body.dataset.idleResets || 0) + 1);
        if (attract > 0) {
          document.body.dataset.attract = "true";
          state.attractTimer = setInterval(attractStep, attract * 1000);
        }
      }, seconds * 1000);
    };
    for (const type of ["pointerdown", "keydown", "input", "wheel"]) {
      document.addEventListener(type, restart, { capture: true, passive: true });
    }
    restart();
  }

  async function start() {
    lockDown();
    showStatus("Loading\u2026", false);
    try {
      engine = await chooseEngine();
    } catch (err) {
      // A site whose files fail their hashes, or that cannot run here: no answers at all.
      showStatus(`This kiosk cannot start: ${err.message}`, true);
      document.body.dataset.failed = "true";
      return;
    }
    let retryMs = RETRY_FIRST_MS;
    // A kiosk's browser often starts before its server: keep asking until it answers.
    for (;;) {
      try {
        state.info = await engine.info();
        break;
      } catch (err) {
        showStatus("Waiting for the kiosk server\u2026", true);
        await sleep(retryMs);
        retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
      }
    }
    showStatus("", false);
    buildSliders();
    $("surprise").addEventListener("click", surprise);
    $("reset").addEventListener("click", startOver);
    $("morph-t").addEventListener("input", (event) => {
      act();
      morphTo(Number(event.target.value));
    });
    $("morph-play").addEventListener("click", playMorph);
    const list = $("matches");
    list.addEventListener("click", onResultClick);
    list.addEventListener("pointerdown", holdList);
    for (const type of ["pointerup", "pointercancel"]) {
      window.addEventListener(type, releaseListSoon);
    }
    watchIdle();
    document.body.dataset.ready = "true";
    setZ(state.info.opening_z || state.z);
  }

  start();
})();
