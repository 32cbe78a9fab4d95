// The kiosk's in-page engine: what `vae-run serve` computes, done by the page itself from a
// static folder (`vae-run export-web`). The graphs run in onnxruntime-web (WASM, one thread)
// and the ranking is exact, in float64 over the float16 index, as runtime/search.py ranks:
// the same ids, scores within 1e-9 relative (docs/kiosk.md). app.js talks to this engine
// and to the server's API through the same methods: info, sample, decode, ends, nearest, item.
"use strict";

(function (root) {
  const LOG_2PI = Math.log(2 * Math.PI);

  // ---- the index, read from .npy files ----------------------------------------------------
  // float16 bits -> float64, exact (every float16 is a float64), by one table of 65,536.
  let halfTable = null;
  function halfToDouble(bits) {
    if (!halfTable) {
      halfTable = new Float64Array(65536);
      for (let h = 0; h < 65536; h++) {
        const sign = h & 0x8000 ? -1 : 1;
        const exponent = (h >> 10) & 0x1f;
        const fraction = h & 0x3ff;
        halfTable[h] = exponent === 0 ? sign * fraction * 2 ** -24
          : exponent === 31 ? (fraction ? NaN : sign * Infinity)
            : sign * (1024 + fraction) * 2 ** (exponent - 25);
      }
    }
    const out = new Float64Array(bits.length);
    for (let i = 0; i < bits.length; i++) out[i] = halfTable[bits[i]];
    return out;
  }

  const NPY_TYPES = {
    "<f2": [Uint16Array, 2], "<f4": [Float32Array, 4], "<f8": [Float64Array, 8],
    "<i4": [Int32Array, 4], "<i8": [BigInt64Array, 8], "|u1": [Uint8Array, 1],
  };

  // A C-ordered little-endian .npy file -> {dtype, shape, data}; float16 comes back as float64.
  function parseNpy(buffer, name) {
    const bytes = new Uint8Array(buffer);
    const magic = String.fromCharCode(...bytes.subarray(0, 6));
    if (magic !== "\x93NUMPY") throw new Error(`${name}: not a .npy file`);
    const major = bytes[6];
    const view = new DataView(buffer);
    const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
    const start = major === 1 ? 10 : 12;
    const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLength));
    const descr = /'descr':\s*'([^']+)'/.exec(header);
    const order = /'fortran_order':\s*(True|False)/.exec(header);
    const shapeText = /'shape':\s*\(([^)]*)\)/.exec(header);
    if (!descr || !order || !shapeText || order[1] !== "False" || !NPY_TYPES[descr[1]]) {
      throw new Error(`${name}: expected a C-ordered little-endian array, got ${header.trim()}`);
    }
    const shape = shapeText[1].split(",").filter((s) => s.trim()).map(Number);
    const count = shape.reduce((a, b) => a * b, 1);
    const [Kind, size] = NPY_TYPES[descr[1]];
    const offset = start + headerLength;
    if (buffer.byteLength !== offset + count * size) {
      throw new Error(`${name}: ${buffer.byteLength} bytes, expected ${offset + count * size}`);
    }
    const data = new Kind(buffer.slice(offset));
    return { dtype: descr[1], shape, data: descr[1] === "<f2" ? halfToDouble(data) : data };
  }

  // ---- the rankings --------------------------------------------------------------------------
  // Per item, what the direct formulas need in float64: mu, 1/sigma and sigma (d each) and
  // c = -sum log sigma - (d/2) log 2pi, so that
  //   log q(z|x) = c - 1/2 sum ((z - mu) / sigma)^2
  // and for a Gaussian query N(m, s^2) the expected log-likelihood is
  //   c - 1/2 sum ((m - mu)^2 + s^2) / sigma^2,
  // and its 2-Wasserstein score (runtime/search.py, WassersteinSearch), tau^2 the site's
  //   -(|m - mu|^2 + |s - sigma|^2) / (2 tau^2).
  function itemTable(mu, logSigma, d, tau2) {
    const n = mu.length / d;
    const inverse = new Float64Array(mu.length);
    const sigma = new Float64Array(mu.length);
    const constant = new Float64Array(n);
    for (let row = 0; row < n; row++) {
      let sum = 0;
      for (let i = row * d; i < row * d + d; i++) {
        sigma[i] = Math.exp(logSigma[i]);
        inverse[i] = 1 / sigma[i];
        sum += logSigma[i];
      }
      constant[row] = -sum - 0.5 * d * LOG_2PI;
    }
    return { n, d, mu, inverse, sigma, constant, tau2 };
  }

  // Every item's log q (expected log-likelihood) for a query centre m (d) and variance s^2
  // (d, or null for a point z): a Float64Array(n).
  function likelihoodScores(table, centre, variance) {
    const { n, d, mu, inverse, constant } = table;
    const scores = new Float64Array(n);
    for (let row = 0, base = 0; row < n; row++, base += d) {
      let sum = 0;
      if (variance === null) {
        for (let i = 0; i < d; i++) {
          const t = (mu[base + i] - centre[i]) * inverse[base + i];
          sum += t * t;
        }
      } else {
        for (let i = 0; i < d; i++) {
          const diff = mu[base + i] - centre[i];
          const a = inverse[base + i];
          sum += (diff * diff + variance[i]) * a * a;
        }
      }
      scores[row] = constant[row] - 0.5 * sum;
    }
    return scores;
  }

  // Every item's 2-Wasserstein score for a query N(m, s^2), m = centre and s = spread (d each):
  // a Float64Array(n).
  function wassersteinScores(table, centre, spread) {
    const { n, d, mu, sigma, tau2 } = table;
    const scores = new Float64Array(n);
    const scale = -0.5 / tau2;
    for (let row = 0, base = 0; row < n; row++, base += d) {
      let means = 0;
      let spreads = 0;
      for (let i = 0; i < d; i++) {
        const a = mu[base + i] - centre[i];
        const b = sigma[base + i] - spread[i];
        means += a * a;
        spreads += b * b;
      }
      scores[row] = (means + spreads) * scale;
    }
    return scores;
  }

  // ranking name -> (table, centre, second) -> scores; second: the query's variance for
  // "likelihood" (null: a point z), its standard deviations for "wasserstein".
  const RANKINGS = { likelihood: likelihoodScores, wasserstein: wassersteinScores };

  // The k best rows, best first, ties to the lower row (as runtime/search.py), and the log of
  // the sum of exp(scores) over the catalog, for p(x|z).
  function topK(scores, k) {
    const n = scores.length;
    k = Math.min(k, n);
    const rows = [];
    let best = -Infinity;
    for (let row = 0; row < n; row++) {
      const s = scores[row];
      if (s > best) best = s;
      if (rows.length === k && !(s > scores[rows[k - 1]])) continue;
      // Insert after every kept row scoring >= s: rows arrive in ascending order.
      let at = rows.length;
      while (at > 0 && scores[rows[at - 1]] < s) at--;
      rows.splice(at, 0, row);
      if (rows.length > k) rows.pop();
    }
    let total = 0;
    for (let row = 0; row < n; row++) total += Math.exp(scores[row] - best);
    return { rows, scores: rows.map((row) => scores[row]), logTotal: best + Math.log(total) };
  }

  function rank(table, ranking, centre, second, k) {
    const score = RANKINGS[ranking];
    if (!score) throw new Error(`no ranking ${ranking}`);
    return topK(score(table, centre, second), k);
  }

  // ---- match modes ----------------------------------------------------------------------------
  // A mode turns z into the query the items are ranked by (a ranking of RANKINGS and its
  // arguments), and z's distance from the catalog, |z - mu(decode(z))| (Runtime.nearest with
  // with_distance=True). A new mode is one more entry.
  const MODES = {
    // log q(z|x): the point z itself.
    async latent(engine, z) {
      const { mu } = await engine.roundtrip(z);
      return { ranking: "likelihood", centre: z, second: null, distance: distance(z, mu) };
    },
    // The decoded garment encoded again: the 2-Wasserstein score of its posterior, as
    // photos are ranked (Runtime.nearest_image).
    async decoded(engine, z) {
      const { mu, logSigma } = await engine.roundtrip(z);
      return { ranking: "wasserstein", centre: mu, second: logSigma.map(Math.exp),
        distance: distance(z, mu) };
    },
  };

  function distance(a, b) {
    let sum = 0;
    for (let i = 0; i < a.length; i++) sum += (a[i] - b[i]) ** 2;
    return Math.sqrt(sum);
  }

  // ---- files and their hashes -------------------------------------------------------------------
  class SiteError extends Error {}

  function hex(buffer) {
    return [...new Uint8Array(buffer)].map((b) => b.toString(16).padStart(2, "0")).join("");
  }

  // A file stored as byte planes (runtime/web.py, _write_planes) back in its own order.
  function fromPlanes(buffer, spec, name) {
    const planes = spec.planes;
    const words = Math.ceil(spec.bytes / planes);
    if (buffer.byteLength !== words * planes) {
      throw new SiteError(`${name} has ${buffer.byteLength} bytes, expected ${words * planes}: `
        + "the kiosk's files do not match their manifest");
    }
    const stored = new Uint8Array(buffer);
    const out = new Uint8Array(words * planes);
    for (let j = 0; j < planes; j++) {
      const plane = stored.subarray(j * words, (j + 1) * words);
      for (let w = 0; w < words; w++) out[w * planes + j] = plane[w];
    }
    return out.buffer.slice(0, spec.bytes);
  }

  // A site file's bytes, refused unless its size and sha256 are the ones the site lists.
  async function verifiedFile(base, name, spec) {
    let response;
    try {
      response = await fetch(new URL(name, base));
    } catch (err) {
      throw new SiteError(`${name} could not be loaded (${err.message})`);
    }
    if (!response.ok) throw new SiteError(`${name} could not be loaded (HTTP ${response.status})`);
    const stored = await response.arrayBuffer();
    const buffer = spec.planes ? fromPlanes(stored, spec, name) : stored;
    if (buffer.byteLength !== spec.bytes) {
      throw new SiteError(`${name} has ${buffer.byteLength} bytes, expected ${spec.bytes}: `
        + "the kiosk's files do not match their manifest");
    }
    if (!(root.crypto && root.crypto.subtle)) {
      throw new SiteError("this page must be opened over https or from localhost (the browser "
        + "offers no hashing to check its files elsewhere)");
    }
    const digest = hex(await root.crypto.subtle.digest("SHA-256", buffer));
    if (digest !== spec.sha256) {
      throw new SiteError(`${name} sha256 is ${digest.slice(0, 12)}…, expected `
        + `${spec.sha256.slice(0, 12)}…: the kiosk's files do not match their manifest`);
    }
    return { stored, buffer };
  }

  // ---- pictures ---------------------------------------------------------------------------------
  // One (C, H, W) float image in [0, 1] as a PNG data URL, rounded as images.to_uint8 rounds.
  function imageUrl(pixels, offset, shape) {
    const [channels, height, width] = shape;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const image = context.createImageData(width, height);
    const plane = height * width;
    for (let p = 0; p < plane; p++) {
      for (let c = 0; c < 3; c++) {
        const value = pixels[offset + (channels === 1 ? 0 : c) * plane + p];
        image.data[4 * p + c] = Math.min(255, Math.max(0, roundHalfEven(value * 255)));
      }
      image.data[4 * p + 3] = 255;
    }
    context.putImageData(image, 0, 0);
    return canvas.toDataURL("image/png");
  }

  function roundHalfEven(x) { // numpy's rint
    const r = Math.round(x);
    return r - x === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  function base64(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  }

  // ---- the engine --------------------------------------------------------------------------------
  const ITEM_PICTURES = 4096; // decoded pictures of items kept, as the server's cache

  class PageEngine {
    // info: what /api/info answers; site: the files (runtime/web.py); base: the site's URL.
    // Loads and checks every file, then the graphs.
    static async load(info, site, base) {
      const files = {};
      const stored = {};
      await Promise.all(Object.entries(site.verify).map(async ([name, spec]) => {
        ({ stored: stored[name], buffer: files[name] } = await verifiedFile(base, name, spec));
      }));
      // The checked files go straight into the service worker's cache (sw.js adds the rest),
      // so the first load fetches each once.
      if (root.caches) {
        const cache = await root.caches.open(`vae-kiosk-${site.version}`);
        await Promise.all(Object.keys(stored).map(async (name) => {
          const url = new URL(name, base);
          if (!(await cache.match(url))) await cache.put(url, new Response(stored[name]));
        }));
      }
      const names = site.files;
      const ort = await import(new URL(names.ort_module, base).href);
      ort.env.wasm.numThreads = 1;
      ort.env.wasm.proxy = false;
      ort.env.wasm.wasmBinary = files[names.ort_wasm];
      const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
      const sessions = [];
      for (const role of ["decoder", "encoder"]) {
        try {
          sessions.push(await ort.InferenceSession.create(new Uint8Array(files[names[role]]),
            options));
        } catch (err) {
          throw new SiteError(`${names[role]}: onnxruntime-web cannot load it (${err.message})`);
        }
      }
      const mu = parseNpy(files[names.mu], names.mu);
      const logSigma = parseNpy(files[names.log_sigma], names.log_sigma);
      const labels = parseNpy(files[names.labels], names.labels);
      const items = JSON.parse(new TextDecoder().decode(files[names.items]));
      let thumbnails = null;
      if (names.thumbnails) {
        const offsets = parseNpy(files[names.thumbnail_offsets], names.thumbnail_offsets);
        thumbnails = { bytes: new Uint8Array(files[names.thumbnails]),
          offsets: Array.from(offsets.data, Number) };
      }
      return new PageEngine(ort, info, sessions[0], sessions[1], mu.data, logSigma.data,
        labels.data, items, thumbnails, site.wasserstein_tau2);
    }

    constructor(ort, info, decoder, encoder, mu, logSigma, labels, items, thumbnails, tau2) {
      this.ort = ort;
      this.site = info;
      this.decoder = decoder;
      this.encoder = encoder;
      this.d = info.latent_dim;
      this.shape = info.image_shape;
      this.table = itemTable(mu, logSigma, this.d, tau2);
      this.mu = mu;
      this.logSigma = logSigma;
      this.labels = labels;
      this.items = items;
      this.rows = new Map(items.ids.map((id, row) => [id, row]));
      this.thumbnails = thumbnails;
      this.pictures = new Map();
      this.queue = Promise.resolve(); // one graph run at a time: WASM runs one session call
    }

    run(session, data, dims) {
      const go = () => session.run({ [session.inputNames[0]]: new this.ort.Tensor("float32",
        data, dims) });
      const result = this.queue.then(go, go);
      this.queue = result.catch(() => {});
      return result;
    }

    // z rows (B x d, float64) -> float32 images (B x C x H x W) clipped to [0, 1], as
    // Runtime.decode gives them.
    async decodeRows(rows) {
      const data = Float32Array.from(rows.flat());
      const out = await this.run(this.decoder, data, [rows.length, this.d]);
      const images = out[this.decoder.outputNames[0]].data;
      for (let i = 0; i < images.length; i++) images[i] = Math.min(1, Math.max(0, images[i]));
      return images;
    }

    // encode(decode(z)): the posterior of the decoded garment, log sigma = log_var / 2 in
    // float32 as Runtime._encode computes it.
    async roundtrip(z) {
      const images = await this.decodeRows([z]);
      const out = await this.run(this.encoder, images, [1, ...this.shape]);
      const mu = Array.from(out.mu.data);
      const logSigma = Array.from(out.log_var.data, (v) => Math.fround(0.5 * v));
      return { mu, logSigma };
    }

    async info() {
      return this.site;
    }

    async sample() {
      const z = [];
      while (z.length < this.d) { // Box-Muller
        const u = 1 - Math.random();
        const v = Math.random();
        const r = Math.sqrt(-2 * Math.log(u));
        z.push(r * Math.cos(2 * Math.PI * v), r * Math.sin(2 * Math.PI * v));
      }
      return { z: z.slice(0, this.d), seed: null };
    }

    async decode(z) {
      const images = await this.decodeRows([z]);
      return { z, image: imageUrl(images, 0, this.shape) };
    }

    async ends(z) {
      const range = this.site.range;
      const grid = [];
      for (let i = 0; i < this.d; i++) {
        for (const end of [-range, range]) {
          const row = z.slice();
          row[i] = end;
          grid.push(row);
        }
      }
      const images = await this.decodeRows(grid);
      const size = this.shape.reduce((a, b) => a * b, 1);
      const urls = grid.map((_, i) => imageUrl(images, i * size, this.shape));
      return { z, range, ends: Array.from({ length: this.d }, (_, i) => urls.slice(2 * i,
        2 * i + 2)) };
    }

    // The ranking alone (a name of RANKINGS and its query): {rows, scores, logTotal}.
    // Exposed for the tests that hold it against Runtime.nearest and nearest_image.
    rank(ranking, centre, second, k) {
      return rank(this.table, ranking, centre, second, k);
    }

    async nearest(z, k, by) {
      const mode = MODES[by];
      if (!mode) throw new Error(`by must be one of ${Object.keys(MODES).join(", ")}, got ${by}`);
      const query = await mode(this, z);
      const found = this.rank(query.ranking, query.centre, query.second, k);
      const images = await this.pictureUrls(found.rows);
      const results = found.rows.map((row, position) => ({
        ...this.describe(row),
        rank: position + 1,
        log_likelihood: found.scores[position],
        probability: Math.exp(found.scores[position] - found.logTotal),
        image: images[position],
      }));
      return { z, by, k: results.length, distance: query.distance,
        far: query.distance > this.site.far_distance, results };
    }

    // One page update, as the server's /api/view: the decoded garment and its matches.
    async view(z, k, by) {
      const [decoded, nearest] = await Promise.all([this.decode(z), this.nearest(z, k, by)]);
      return { decoded, nearest };
    }

    describe(row) {
      const label = this.labels[row];
      const columns = this.items.columns;
      const metadata = {};
      columns.forEach((name, c) => { metadata[name] = this.items.metadata[c][row]; });
      return { id: this.items.ids[row], row, label: this.site.label_names[label],
        label_id: label, metadata };
    }

    rowOf(id) {
      const row = this.rows.get(String(id));
      if (row === undefined) throw new Error(`no catalog item with id ${JSON.stringify(id)}`);
      return row;
    }

    async item(id) {
      const row = this.rowOf(id);
      const d = this.d;
      const [image] = await this.pictureUrls([row]);
      return { ...this.describe(row), mu: Array.from(this.mu.subarray(row * d, row * d + d)),
        log_sigma: Array.from(this.logSigma.subarray(row * d, row * d + d)), image };
    }

    // The items' pictures: the catalog photo's thumbnail where the bundle has them, else the
    // decoder's view of mu (as the server's /api/item/<id>/image).
    async pictureUrls(rows) {
      if (this.thumbnails) {
        const { bytes, offsets } = this.thumbnails;
        return rows.map((row) => `data:image/webp;base64,${base64(bytes.subarray(offsets[row],
          offsets[row + 1]))}`);
      }
      const missing = [...new Set(rows.filter((row) => !this.pictures.has(row)))];
      if (missing.length) {
        const d = this.d;
        const images = await this.decodeRows(missing.map((row) => Array.from(
          this.mu.subarray(row * d, row * d + d))));
        const size = this.shape.reduce((a, b) => a * b, 1);
        missing.forEach((row, i) => {
          if (this.pictures.size >= ITEM_PICTURES) {
            this.pictures.delete(this.pictures.keys().next().value);
          }
          this.pictures.set(row, imageUrl(images, i * size, this.shape));
        });
      }
      return rows.map((row) => this.pictures.get(row));
    }
  }

  root.VaeEngine = { PageEngine, SiteError, MODES, RANKINGS, parseNpy, itemTable, rank };
})(typeof window !== "undefined" ? window : globalThis);
