"""`vae-run export-web`: the kiosk as a static folder, run in real headless Chromium from a
plain static file server, then with that server gone (the service worker's cache), against
the Runtime's own answers."""

from __future__ import annotations

import base64
import functools
import gzip
import io
import json
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tests.test_browser import K, Kiosk, browser  # noqa: F401  (browser: a fixture)
from vae_edge.runtime import Runtime
from vae_edge.runtime.cli import main as run_main
from vae_edge.runtime.images import to_uint8
from vae_edge.runtime.server import KioskApp


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class StaticServer:
    """A plain static file server (Python's http.server) over one folder, on 127.0.0.1."""

    def __init__(self, folder: Path):
        handler = functools.partial(QuietHandler, directory=str(folder))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def export(bundle, out: Path, *options) -> Path:
    result = CliRunner().invoke(run_main, ["export-web", "--bundle", str(bundle), "-o", str(out),
                                           "-k", str(K), *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tiny_site(tmp_path_factory, tiny_bundle):
    return export(tiny_bundle, tmp_path_factory.mktemp("web") / "site")


class SiteKiosk(Kiosk):
    """The exported page, and what it shows, against the Runtime. Its graphs run in
    onnxruntime-web, whose float32 kernels are not the native ones: the picture agrees
    within one grey level, and the ranking of the decoded garment (by the page's own
    encoding of it) has the runtime's ids, where two items' scores differ by less than
    NEAR_TIE relative in either order."""

    NEAR_TIE = 1e-4

    def check_consistent(self):
        z = self.z
        picture = self.picture()  # RGBA from a canvas
        expected = to_uint8(self.runtime.decode(z))
        shown = picture[..., 0] if expected.ndim == 2 else picture[..., :3].transpose(2, 0, 1)
        assert np.abs(shown.astype(int) - expected).max() <= 1
        matches = self.runtime.nearest(z, k=K + 4, by="decoded")
        scores = dict(zip(matches.ids.tolist(), matches.log_likelihoods.tolist()))
        shown_ids = self.shown_ids()
        assert len(shown_ids) == min(K, len(self.runtime.index))
        for got, want in zip(shown_ids, matches.ids.tolist()):
            assert got == want or (got in scores and abs(scores[got] - scores[want])
                                   <= self.NEAR_TIE * abs(scores[want])), (shown_ids, matches.ids)
        far = float(matches.distances) > self.far_distance
        assert ("far" in self.page.locator("#fit").get_attribute("class").split()) == far
        return z

    def wait_offline_ready(self):
        self.page.wait_for_function("document.body.dataset.offlineReady === 'true'",
                                    timeout=60_000)

    def reload_offline(self, server):
        """Stop the site's server once the page is ready offline, reload the page (from the
        service worker's cache) and check that it still computes what the runtime does."""
        self.wait_offline_ready()
        server.stop()
        self.page.reload()
        self.settle()
        self.check_consistent()


def check_slider_ends(view: SiteKiosk, z_range: float = 3.0):
    """Each slider's two previews: the garment with that slider at -range and +range."""
    view.page.wait_for_function("document.querySelector('#sliders').dataset.endsZ === "
                                "document.querySelector('#sliders').dataset.z")
    z = view.z
    sources = view.page.eval_on_selector_all("#sliders .end", "ends => ends.map(e => e.src)")
    d = view.runtime.latent_dim
    grid = np.repeat(z[None], 2 * d, axis=0)
    grid[2 * np.arange(d), np.arange(d)] = -z_range
    grid[2 * np.arange(d) + 1, np.arange(d)] = z_range
    assert len(sources) == 2 * d
    for source, image in zip(sources, view.runtime.decode(grid)):
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as png:
            shown = np.asarray(png)[..., 0]
        assert np.abs(shown.astype(int) - to_uint8(image)).max() <= 1


def blend(view: SiteKiosk):
    """A and B chosen from the results; the blend slider puts z on the line between their mu."""
    first, second = view.shown_ids()[:2]
    for slot, item_id in (("a", first), ("b", second)):
        view.page.locator(f"#matches .match[data-id='{item_id}'] [data-slot='{slot}']").tap()
        view.page.wait_for_function(
            f"document.querySelector('#slot-{slot}').dataset.id === '{item_id}'")
    view.drag("#morph-t", 0.5)
    view.settle()
    t = float(view.page.locator("#morph-t").input_value())
    assert 0.1 < t < 0.9
    np.testing.assert_allclose(view.check_consistent(),
                               (1 - t) * view.mu(first) + t * view.mu(second), rtol=0, atol=1e-12)


def drag_and_tap(view: SiteKiosk):
    np.testing.assert_array_equal(view.z, view.opening_z)
    view.check_consistent()
    before = view.shown_ids()
    view.drag("#sliders input[data-dim='0']", 0.9)
    view.settle()
    assert view.check_consistent()[0] > 1.0
    assert view.shown_ids() != before
    item_id = view.shown_ids()[2]
    view.page.locator(f"#matches .item[data-id='{item_id}']").tap()
    view.wait_for_z(view.mu(item_id).tolist())
    view.check_consistent()


def test_export_web_writes_a_site_that_names_and_hashes_its_files(tiny_site, tiny_bundle,
                                                                  runtime):
    info = json.loads((tiny_site / "api" / "info").read_text())
    site = info.pop("site")
    assert info == json.loads(json.dumps(KioskApp(runtime, k=K).info()))
    assert (tiny_site / "index.html").read_bytes() == (
        Path(run_main.callback.__globals__["__file__"]).parent / "static" / "index.html"
    ).read_bytes()
    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    for role, name in (("decoder", "decoder.onnx"), ("mu", "index_mu.npy")):
        spec = site["verify"][site["files"][role]]
        assert spec["sha256"] == manifest["files"][name]["sha256"]
        assert spec["bytes"] == manifest["files"][name]["bytes"]
    for name in site["cache"]:
        assert (tiny_site / name).is_file()
    assert 'const VERSION = "' + site["version"] + '";' in (tiny_site / "sw.js").read_text()
    # the page scales the W2 ranking (designs, photos) as the runtime does
    assert site["wasserstein_tau2"] == runtime.wasserstein().temperature


def test_export_web_refuses_an_existing_folder_and_a_tampered_bundle(tiny_site, bundle_copy,
                                                                     tmp_path):
    result = CliRunner().invoke(run_main, ["export-web", "-o", str(tiny_site)])
    assert result.exit_code == 2
    assert result.output.strip().endswith("exists: pass --force to replace it")
    for folder in (bundle_copy, bundle_copy.parent):  # --force must not replace the bundle
        result = CliRunner().invoke(run_main, ["export-web", "--bundle", str(bundle_copy),
                                               "-o", str(folder), "--force"])
        assert result.exit_code == 2 and "holds the bundle" in result.output
        assert (bundle_copy / "manifest.json").is_file()
    with open(bundle_copy / "decoder.onnx", "r+b") as handle:
        handle.seek(-5, 2)
        handle.write(b"\x00")
    result = CliRunner().invoke(run_main, ["export-web", "--bundle", str(bundle_copy), "-o",
                                           str(tmp_path / "out")])
    assert result.exit_code == 2 and "decoder.onnx" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_the_site_works_from_a_static_server_then_offline(browser, tiny_site, runtime):  # noqa: F811
    server = StaticServer(tiny_site)
    view = SiteKiosk(browser, server, runtime)
    try:
        assert view.page.locator("#sliders input").count() == runtime.latent_dim
        drag_and_tap(view)
        view.reload_offline(server)
        server = None
        view.drag("#sliders input[data-dim='1']", 0.1)
        view.settle()
        assert view.check_consistent()[1] < -1.0
        check_slider_ends(view)
        blend(view)
        before = view.z
        view.page.locator("#surprise").tap()
        view.wait_for_z_other_than(before)
        view.check_consistent()
        assert view.problems == []
    finally:
        view.close()
        if server:
            server.stop()


def test_the_site_obeys_its_own_content_security_policy(browser, tiny_site):  # noqa: F811
    """Enforced (no bypass): WASM runs under 'wasm-unsafe-eval' and nothing else is needed."""
    server = StaticServer(tiny_site)
    context = browser.new_context(has_touch=True)
    page = context.new_page()
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    try:
        page.goto(server.url)
        page.locator("#matches .item").nth(K - 1).wait_for()
        page.locator("#sliders .end[src^='data:image/png;base64,']").first.wait_for()
        page.locator("#matches .item").first.tap()
        page.locator("#status", has_text="Loaded").wait_for()
    finally:
        context.close()
        server.stop()
    assert problems == []


@pytest.mark.parametrize("file_role", ["decoder", "mu"])
def test_a_tampered_site_shows_an_error_instead_of_answers(browser, tiny_site, tmp_path,  # noqa: F811
                                                           file_role):
    site = shutil.copytree(tiny_site, tmp_path / "site")
    name = json.loads((site / "api" / "info").read_text())["site"]["files"][file_role]
    data = bytearray((site / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (site / name).write_bytes(bytes(data))
    server = StaticServer(site)
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(server.url)
        status = page.locator("#status.error")
        status.wait_for()
        text = status.inner_text()
        assert text.startswith("This kiosk cannot start:")
        assert name in text and "do not match their manifest" in text
        assert page.locator("body").get_attribute("data-failed") == "true"
        assert page.locator("#matches .item").count() == 0
        assert page.locator("#garment").get_attribute("src") is None
    finally:
        context.close()
        server.stop()


def test_a_colour_catalog_site_shows_its_photos_and_metadata(browser, shop, tmp_path):  # noqa: F811
    _, bundle = shop
    runtime = Runtime.load(bundle)
    site = export(bundle, tmp_path / "site")
    server = StaticServer(site)
    view = SiteKiosk(browser, server, runtime)
    try:
        drag_and_tap(view)
        first = view.page.locator("#matches .match").first
        row = int(np.flatnonzero(runtime.index.ids == first.get_attribute("data-id"))[0])
        metadata = runtime.index.item_metadata(row)
        assert first.locator(".name").inner_text() == metadata["name"]
        assert first.locator(".price").inner_text() == metadata["price"]
        assert first.locator(".qr svg").count() == 1
        src = first.locator("img").get_attribute("src")
        assert src.startswith("data:image/webp;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == runtime.index.thumbnail(row)
        view.reload_offline(server)
        server = None
        assert view.problems == []
    finally:
        view.close()
        if server:
            server.stop()


@pytest.fixture(scope="module")
def shipped_site(tmp_path_factory):
    return export(Runtime.load().root, tmp_path_factory.mktemp("web") / "shipped")


def test_the_pages_ranking_equals_the_runtimes_on_the_shipped_catalog(browser, shipped_site,  # noqa: F811
                                                                      data_dir):
    """1,000 z of each kind by log q and 200 photos' posteriors by W2 (the site's tau^2),
    ranked by the page's engine over the 60,000-item float16 index: the runtime's ids in the
    runtime's order, scores within 1e-9 relative (both float64 from the same float16 values;
    the formula's terms summed in another order), p within the runtime's 1.1e-7 relative."""
    from vae_edge.training.data import load_split

    runtime = Runtime.load()
    d, k, n = runtime.latent_dim, 10, 1000
    rng = np.random.default_rng(7)
    corners = rng.choice([-5.0, 5.0], size=(n, d))
    latent = np.concatenate([rng.standard_normal((n, d)), rng.uniform(-5, 5, (n, d)), corners])
    photos = load_split("test", data_dir).images[:200, None]
    mu, log_sigma = runtime.encode(photos)
    expected = [runtime.nearest(latent, k=k), runtime.nearest_image(photos, k=k)]
    queries = [[z, None] for z in latent.tolist()] + [
        [m, s] for m, s in zip(mu.astype(np.float64).tolist(),
                               log_sigma.astype(np.float64).tolist())]

    server = StaticServer(shipped_site)
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(server.url)
        page.locator("#matches .item").first.wait_for(timeout=60_000)
        found = page.evaluate("""async ([queries, k]) => {
            const info = await (await fetch("api/info")).json();
            const site = info.site;
            delete info.site;
            const engine = await VaeEngine.PageEngine.load(info, site,
                new URL(".", window.location.href));
            return queries.map(([centre, logSigma]) => {
                const ranked = logSigma === null ? engine.rank("likelihood", centre, null, k)
                    : engine.rank("wasserstein", centre, logSigma.map(Math.exp), k);
                return [ranked.rows, ranked.scores, ranked.scores.map(
                    (s) => Math.exp(s - ranked.logTotal))];
            });
        }""", [queries, k])
    finally:
        context.close()
        server.stop()
    rows, scores, probabilities = (np.array([query[i] for query in found]) for i in range(3))
    want = [np.concatenate([m.rows for m in expected]),
            np.concatenate([m.log_likelihoods for m in expected]),
            np.concatenate([m.probabilities for m in expected])]
    assert rows.shape == (3 * n + 200, k)
    np.testing.assert_array_equal(rows, want[0])
    np.testing.assert_allclose(scores, want[1], rtol=1e-9, atol=0)
    np.testing.assert_allclose(probabilities, want[2], rtol=1.1e-7, atol=1e-300)


def test_the_shipped_site_is_under_12_mb_gzipped(shipped_site):
    total = sum(len(gzip.compress(path.read_bytes(), compresslevel=6))
                for path in shipped_site.rglob("*") if path.is_file())
    assert total < 12e6
