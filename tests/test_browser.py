"""The kiosk page in real headless Chromium (Debian's chromium, driven by Playwright).

Each test uses the page as a person would (drag a slider with the mouse, tap items on a
touch screen, press buttons) and then checks what is on screen against the Runtime itself:
the picture must be decode(z) pixel for pixel, the list must be nearest(z).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import io
import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pytest
from PIL import Image

from tests.conftest import start_kiosk, stop_kiosk
from tests.test_catalog_training import read_rows, write_csv
from vae_edge.runtime import Runtime
from vae_edge.runtime.images import to_uint8
from vae_edge.runtime.server import make_server

CHROMIUM = Path(os.environ.get("KIOSK_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps dialing Google from a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1920, "height": 1080}
K = 6


def _browser_or_skip():
    missing = []
    if not CHROMIUM.is_file():
        missing.append(f"{CHROMIUM} (Debian package chromium)")
    if importlib.util.find_spec("playwright") is None:
        missing.append("the playwright Python package (pip install -e '.[dev]')")
    if missing:
        message = "browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(message + "; .ci/run installs both")  # in CI this must run
        pytest.skip(message)


@contextlib.contextmanager
def browser_or_skip():
    """Headless Chromium as the kiosk tests drive it (skipped where it is not installed,
    failed in CI)."""
    _browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def browser():
    with browser_or_skip() as chromium:
        yield chromium


def serve(runtime, port=0, **options):
    """The kiosk with K results, serving until stop_kiosk."""
    return start_kiosk(make_server(runtime, "127.0.0.1", port, k=K, **options))


@pytest.fixture(scope="module")
def kiosk(runtime):
    server = serve(runtime)
    yield server
    stop_kiosk(server)


@pytest.fixture(scope="module")
def shipped():
    """(server, Runtime) of `vae-run serve` on the shipped model (models/default): the checkout
    ships it, so a missing or damaged one is a failure."""
    from vae_edge.runtime import Runtime

    runtime = Runtime.load()
    server = serve(runtime)
    yield server, runtime
    stop_kiosk(server)


class Kiosk:
    """One page on a touch screen, and what it shows, read back as numbers."""

    def __init__(self, browser, server, runtime, viewport=VIEWPORT, init_script=None,
                 mobile=False):
        self.runtime = runtime
        self.origin = server.url.rstrip("/")
        # Playwright's wait_for_function evaluates its predicate in a way the page's own
        # policy (no eval) forbids; test_page_obeys_its_content_security_policy covers the page
        # under that policy.
        self.context = browser.new_context(viewport=viewport, has_touch=True, bypass_csp=True,
                                           is_mobile=mobile)
        self.page = self.context.new_page()
        if init_script:
            self.page.add_init_script(init_script)
        self.problems = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(m.text))
        self.page.on("pageerror", lambda exc: self.problems.append(str(exc)))
        self.page.on("request", self._check_request)
        self.page.goto(server.url)
        self.settle()
        self.far_distance = self.context.request.get(server.url + "api/info").json()[
            "far_distance"]
        self.opening_z = self.mu(runtime.index.ids[0])

    def _check_request(self, request):
        if not request.url.startswith((self.origin + "/", "data:")):
            self.problems.append(f"request left the kiosk: {request.url}")

    def settle(self, timeout=30_000):
        """Wait until picture and list both show the z the sliders stand for."""
        self.page.wait_for_function(
            """() => {
                const same = (a, b) => a !== undefined && b !== undefined &&
                    JSON.stringify(JSON.parse(a)) === JSON.stringify(JSON.parse(b));
                const z = document.getElementById("sliders").dataset.z;
                return document.body.dataset.busy === "false" &&
                    same(document.getElementById("garment").dataset.z, z) &&
                    same(document.getElementById("matches").dataset.z, z);
            }""",
            timeout=timeout,
        )

    @property
    def z(self) -> np.ndarray:
        return np.array(json.loads(self.page.locator("#sliders").get_attribute("data-z")))

    def slider_values(self) -> np.ndarray:
        return np.array(self.page.eval_on_selector_all(
            "#sliders input", "inputs => inputs.map(i => Number(i.value))"))

    def picture(self) -> np.ndarray:
        src = self.page.locator("#garment").get_attribute("src")
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        with Image.open(io.BytesIO(base64.b64decode(src[len(prefix):]))) as image:
            return np.asarray(image)

    def shown_ids(self) -> list[str]:
        return self.page.eval_on_selector_all("#matches .item",
                                              "items => items.map(i => i.dataset.id)")

    def wait_for_z(self, z):
        """Until the sliders stand for z, then until picture and list show it."""
        wanted = json.dumps(list(z))
        self.page.wait_for_function(
            f"document.querySelector('#sliders').dataset.z === JSON.stringify({wanted})")
        self.settle()

    def wait_for_z_other_than(self, z):
        """Until the sliders leave z (compared as numbers, not as JSON text), then until
        picture and list show where they went."""
        left = json.dumps(list(z))
        self.page.wait_for_function(
            "JSON.stringify(JSON.parse(document.querySelector('#sliders').dataset.z)) !== "
            f"JSON.stringify({left})")
        self.settle()

    def list_text(self) -> str:
        return self.page.locator("#matches").inner_text()

    def check_consistent(self):
        """The picture is decode(z) and the list is nearest(z) ranked by the decoded garment,
        for the z on the sliders; the page says whether z is far from the catalog."""
        z = self.z
        np.testing.assert_array_equal(self.picture(), to_uint8(self.runtime.decode(z)))
        matches = self.runtime.nearest(z, k=K, by="decoded")
        assert self.shown_ids() == matches.ids.tolist()
        far = float(matches.distances) > self.far_distance
        fit = self.page.locator("#fit")
        assert ("far" in fit.get_attribute("class").split()) == far
        assert fit.inner_text().startswith("Nothing in our catalog" if far else "These pieces")
        return z

    def drag(self, selector: str, fraction: float):
        """Press on the thumb (at the centre: value 0) and drag it to fraction of the width."""
        box = self.page.locator(selector).bounding_box()
        y = box["y"] + box["height"] / 2
        self.page.mouse.move(box["x"] + box["width"] / 2, y)
        self.page.mouse.down()
        self.page.mouse.move(box["x"] + box["width"] * fraction, y, steps=10)
        self.page.mouse.up()

    def touch_drag(self, selector: str, fraction: float):
        """A finger on the thumb (at the centre), slid to fraction of the width, then lifted."""
        box = self.page.locator(selector).bounding_box()
        y = box["y"] + box["height"] / 2
        cdp = self.context.new_cdp_session(self.page)
        start, end = box["x"] + box["width"] / 2, box["x"] + box["width"] * fraction
        cdp.send("Input.dispatchTouchEvent",
                 {"type": "touchStart", "touchPoints": [{"x": start, "y": y}]})
        for step in range(1, 11):
            x = start + (end - start) * step / 10
            cdp.send("Input.dispatchTouchEvent",
                     {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        cdp.detach()

    def mu(self, item_id: str) -> np.ndarray:
        row = int(np.flatnonzero(self.runtime.index.ids == item_id)[0])
        return self.runtime.index.mu[row].astype(np.float64)

    def close(self):
        self.context.close()


@pytest.fixture
def page(browser, kiosk, runtime):
    view = Kiosk(browser, kiosk, runtime)
    yield view
    problems = view.problems
    view.close()
    assert problems == []


def check_slider_and_tap(view: Kiosk, d: int):
    assert view.page.locator("#sliders input").count() == d
    assert view.page.locator("#matches .item").count() == K
    # The page opens on a real garment: the catalog's first item.
    np.testing.assert_array_equal(view.z, view.opening_z)
    view.check_consistent()
    before_picture, before_ids = view.picture(), view.shown_ids()

    view.drag("#sliders input[data-dim='0']", 0.9)
    view.settle()
    z = view.check_consistent()
    assert z[0] > 1.0
    np.testing.assert_array_equal(z[1:], view.opening_z[1:])
    assert not np.array_equal(view.picture(), before_picture)
    assert view.shown_ids() != before_ids

    item_id = view.shown_ids()[2]
    view.page.locator(f"#matches .item[data-id='{item_id}']").tap()
    mu_json = json.dumps(view.mu(item_id).tolist())
    view.page.wait_for_function(
        f"document.querySelector('#sliders').dataset.z === JSON.stringify({mu_json})")
    view.settle()
    np.testing.assert_array_equal(view.check_consistent(), view.mu(item_id))
    limit = float(view.page.locator("#sliders input").first.get_attribute("max"))
    np.testing.assert_allclose(view.slider_values(), np.clip(view.mu(item_id), -limit, limit),
                               atol=0.005 + 1e-9)


def test_page_obeys_its_content_security_policy(browser, kiosk):
    """With the server's policy enforced (no eval, nothing external) the page still works."""
    context = browser.new_context(viewport=VIEWPORT, has_touch=True)
    page = context.new_page()
    problems = []
    page.on("console", lambda m: m.type == "error" and problems.append(m.text))
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    try:
        response = page.goto(kiosk.url)
        assert "default-src 'self'" in response.headers["content-security-policy"]
        page.locator("#matches .item").nth(K - 1).wait_for()
        page.locator("#garment[src^='data:image/png;base64,']").wait_for()
        page.locator("#sliders .end[src^='data:image/png;base64,']").first.wait_for()
        page.locator("#surprise").tap()
        page.locator("#matches .item").first.tap()
        page.locator("#status", has_text="Loaded").wait_for()
    finally:
        context.close()
    assert problems == []


def test_a_slider_change_is_one_request(browser, kiosk, runtime):
    """Each page update asks the server once (/api/view: the picture and the list together),
    never a decode and a nearest request of its own."""
    view = Kiosk(browser, kiosk, runtime)
    try:
        paths = []
        view.page.on("request", lambda request: paths.append(urlsplit(request.url).path))
        view.drag("#sliders input[data-dim='0']", 0.8)
        view.settle()
        view.check_consistent()
        assert "/api/view" in paths and not {"/api/decode", "/api/nearest"} & set(paths), paths
        assert view.problems == []
    finally:
        view.close()


def test_slider_moves_picture_and_list_then_tap_loads_an_item(page, runtime):
    assert page.page.locator("#sliders input").first.get_attribute("min") == "-3"
    check_slider_and_tap(page, runtime.latent_dim)


def test_slider_follows_a_finger(page, runtime):
    page.touch_drag("#sliders input[data-dim='1']", 0.15)
    page.page.wait_for_function("JSON.parse(document.querySelector('#sliders').dataset.z)[1] < 0")
    page.settle()
    z = page.check_consistent()
    assert z[1] < -1.0
    np.testing.assert_array_equal(np.delete(z, 1), np.delete(page.opening_z, 1))


def test_surprise_me_then_reset(page, runtime):
    page.page.locator("#surprise").tap()
    page.wait_for_z_other_than(page.opening_z.tolist())
    z = page.check_consistent()
    assert z.shape == (runtime.latent_dim,) and not np.array_equal(z, page.opening_z)
    page.page.locator("#reset").tap()
    page.wait_for_z(page.opening_z.tolist())
    page.check_consistent()


def test_morph_between_two_items(page, runtime):
    assert page.page.locator("#morph-play").is_disabled()
    first, second = page.shown_ids()[:2]
    page.page.locator(f"#matches .match[data-id='{first}'] [data-slot='a']").tap()
    page.page.wait_for_function(f"document.querySelector('#slot-a').dataset.id === '{first}'")
    assert page.page.locator("#morph-play").is_disabled()  # B still missing
    page.page.locator(f"#matches .match[data-id='{second}'] [data-slot='b']").tap()
    page.page.wait_for_function(f"document.querySelector('#slot-b').dataset.id === '{second}'")
    mu_a, mu_b = page.mu(first), page.mu(second)

    # Dragging the morph slider puts z on the line from mu(A) to mu(B).
    page.drag("#morph-t", 0.5)
    page.settle()
    t = float(page.page.locator("#morph-t").input_value())
    assert 0.1 < t < 0.9
    np.testing.assert_allclose(page.check_consistent(), (1 - t) * mu_a + t * mu_b,
                               rtol=0, atol=1e-12)

    # Morph plays all the way to B.
    page.page.locator("#morph-play").tap()
    page.page.wait_for_function("document.body.dataset.morphing === 'false' && "
                                "document.querySelector('#morph-t').value === '1'")
    page.settle()
    np.testing.assert_array_equal(page.check_consistent(), mu_b)


def test_screenshot_at_1080p(page, tmp_path):
    page.page.locator("#surprise").tap()
    page.wait_for_z_other_than(page.opening_z.tolist())
    # Every thumbnail has arrived and the page fits a 1080p screen without scrolling.
    page.page.wait_for_function(
        "[...document.querySelectorAll('#matches img')].every(i => i.complete && i.naturalWidth)")
    assert page.page.evaluate("document.documentElement.scrollHeight") <= VIEWPORT["height"]
    shot = tmp_path / "kiosk.png"
    page.page.screenshot(path=str(shot))
    with Image.open(shot) as image:
        assert image.size == (VIEWPORT["width"], VIEWPORT["height"])
        # Not a blank page: the picture and the thumbnails put many grey levels on screen.
        assert len(np.unique(np.asarray(image.convert("L")))) > 50


def test_shipped_model_in_the_browser(browser, shipped):
    """`vae-run serve` on the shipped model (models/default)."""
    server, runtime = shipped
    view = Kiosk(browser, server, runtime)
    try:
        check_slider_and_tap(view, runtime.latent_dim)
        # Every slider at its end: a corner of the slider box, far from every catalog item.
        for dim in range(runtime.latent_dim):
            view.drag(f"#sliders input[data-dim='{dim}']", 1.0)
        view.settle()
        assert (view.check_consistent() >= 2.9).all()
        assert "far" in view.page.locator("#fit").get_attribute("class").split()
        assert view.problems == []
    finally:
        view.close()


@pytest.mark.parametrize("viewport", [
    {"width": 1080, "height": 1920},  # a portrait kiosk
    {"width": 390, "height": 844},  # a phone
    VIEWPORT,
    {"width": 1366, "height": 768},  # smaller landscape screens
    {"width": 1024, "height": 768},
], ids=lambda v: f"{v['width']}x{v['height']}")
def test_garment_sliders_and_first_results_fit_the_first_screen(browser, shipped, viewport):
    """With the shipped model's 16 sliders."""
    server, runtime = shipped
    view = Kiosk(browser, server, runtime, viewport=viewport, mobile=viewport["width"] < 600)
    try:
        page = view.page
        page.locator("#sliders .end[src]").first.wait_for()
        width, height = viewport["width"], viewport["height"]

        def inside(selector):
            box = page.locator(selector).bounding_box()
            return (box is not None and box["x"] >= 0 and box["y"] >= 0 and
                    box["x"] + box["width"] <= width and box["y"] + box["height"] <= height)

        assert inside("#garment") and inside("#surprise") and inside("#reset")
        for dim in range(runtime.latent_dim):
            assert inside(f"#sliders input[data-dim='{dim}']")
        per_row = page.evaluate("getComputedStyle(document.getElementById('matches'))"
                                ".gridTemplateColumns.split(' ').length")
        for position in range(per_row):
            assert inside(f"#matches .match:nth-child({position + 1})")
        assert page.evaluate("window.scrollY") == 0
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        # No slider's words and track run into another's.
        tracks = page.eval_on_selector_all("#sliders .track", """tracks => tracks.map(t => {
            const r = t.getBoundingClientRect();
            return [r.left, r.top, r.right, r.bottom];
        })""")
        for i, a in enumerate(tracks):
            for b in tracks[i + 1:]:
                assert min(a[2], b[2]) - max(a[0], b[0]) <= 1 or \
                    min(a[3], b[3]) - max(a[1], b[1]) <= 1, (a, b)
        assert view.problems == []
    finally:
        view.close()


def test_a_pinch_does_not_zoom_the_page(browser, page):
    def pinch(tab, x, y):
        cdp = tab.context.new_cdp_session(tab)
        fingers = lambda spread: [{"x": x - spread, "y": y, "id": 0},  # noqa: E731
                                  {"x": x + spread, "y": y, "id": 1}]
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": fingers(20)})
        for step in range(1, 21):
            cdp.send("Input.dispatchTouchEvent",
                     {"type": "touchMove", "touchPoints": fingers(20 + 10 * step)})
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
        cdp.detach()
        tab.wait_for_timeout(300)
        return tab.evaluate("visualViewport.scale")

    # The same gesture zooms an ordinary page: it is a real pinch.
    plain = page.context.new_page()
    plain.set_content("<p style='height: 3000px'>an ordinary page</p>")
    assert pinch(plain, 500, 500) > 2
    plain.close()
    for selector in ("#garment", "#matches .item", "#controls h2"):
        box = page.page.locator(selector).first.bounding_box()
        assert pinch(page.page, box["x"] + box["width"] / 2, box["y"] + box["height"] / 2) == 1
    # No context menu, no dragging a picture, no selecting text.
    assert page.page.evaluate("""() => {
        const refused = (type, target) => !target.dispatchEvent(
            new Event(type, {bubbles: true, cancelable: true}));
        return refused("contextmenu", document.getElementById("garment")) &&
            refused("dragstart", document.getElementById("garment")) &&
            refused("selectstart", document.querySelector("h1")) &&
            getComputedStyle(document.body).userSelect === "none";
    }""")


def test_the_page_resets_itself_when_idle_then_attracts(browser, runtime):
    # Timers far enough apart that a slow machine keeps the steps in order.
    server = serve(runtime, idle_reset=6, attract=3)
    view = Kiosk(browser, server, runtime)
    try:
        page = view.page
        first, second = view.shown_ids()[:2]
        page.locator(f"#matches .match[data-id='{first}'] [data-slot='a']").tap()
        page.locator(f"#matches .match[data-id='{second}'] [data-slot='b']").tap()
        page.wait_for_function("document.querySelector('#slot-b').dataset.id")
        view.drag("#sliders input[data-dim='0']", 0.95)
        view.settle()
        assert not np.array_equal(view.z, view.opening_z)
        page.wait_for_function("document.body.dataset.idleResets === '1'", timeout=10_000)
        view.wait_for_z(view.opening_z.tolist())
        np.testing.assert_array_equal(view.check_consistent(), view.opening_z)
        assert page.locator("#slot-a").get_attribute("data-id") is None
        assert page.locator("#slot-b").get_attribute("data-id") is None
        assert page.locator("#morph-play").is_disabled()

        # Attract mode: 3 s later the page shows a catalog item from the results by itself.
        assert page.evaluate("document.body.dataset.attract") == "true"
        shown = view.shown_ids()
        page.wait_for_function("document.body.dataset.loaded", timeout=10_000)
        loaded = page.evaluate("document.body.dataset.loaded")
        assert loaded in shown
        view.wait_for_z(view.mu(loaded).tolist())
        view.check_consistent()
        # A touch ends it, and the garment stays.
        page.locator("h1").tap()
        assert page.evaluate("document.body.dataset.attract") == "false"
        page.wait_for_timeout(4000)  # past attract's step, short of the next idle reset
        np.testing.assert_array_equal(view.z, view.mu(loaded))
        assert view.problems == []
    finally:
        view.close()
        stop_kiosk(server)


def test_the_page_waits_for_its_server_and_recovers_from_a_restart(browser, runtime):
    server = serve(runtime)
    port = server.server_address[1]
    context = browser.new_context(viewport=VIEWPORT, has_touch=True, bypass_csp=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        # The page's first calls for the server's settings fail (a server still starting).
        page.route("**/api/info", lambda route: route.abort("connectionrefused"))
        page.goto(server.url)
        page.wait_for_selector("#status.error", timeout=10_000)
        assert page.evaluate("document.body.dataset.ready") == "false"
        page.unroute("**/api/info")
        view = Kiosk.__new__(Kiosk)
        view.page, view.runtime = page, runtime
        view.far_distance = context.request.get(server.url + "api/info").json()["far_distance"]
        view.opening_z = view.mu(runtime.index.ids[0])
        view.settle(timeout=20_000)
        view.check_consistent()

        # An outage, a slider moved during it, then the server back: nobody touches the page.
        stop_kiosk(server)
        view.drag("#sliders input[data-dim='0']", 0.95)
        page.wait_for_function("document.body.dataset.offline === 'true'")
        # The old picture is marked stale while it disagrees with the sliders.
        assert page.locator(".reconnecting").is_visible()
        server = None
        server = serve(runtime, port=port)
        view.settle(timeout=20_000)
        z = view.check_consistent()
        assert z[0] > 2.0
        assert page.evaluate("document.body.dataset.offline") == "false"
        assert not page.locator(".reconnecting").is_visible()
        assert page.locator("#status.error").count() == 0
        assert errors == []
    finally:
        context.close()
        if server is not None:  # a failure to restart leaves none
            stop_kiosk(server)


def test_a_tap_that_failed_in_an_outage_heals_when_the_server_is_back(browser, runtime):
    server = serve(runtime)
    port = server.server_address[1]
    view = Kiosk(browser, server, runtime)
    try:
        stop_kiosk(server)
        server = None
        view.page.locator("#surprise").tap()
        view.page.wait_for_selector("#status.error")
        server = serve(runtime, port=port)
        # Nobody touches the page: the message goes and the page shows its sliders' z.
        view.page.wait_for_function(
            "!document.querySelector('#status').classList.contains('error') && "
            "document.body.dataset.offline === 'false'", timeout=20_000)
        view.settle(timeout=20_000)
        np.testing.assert_array_equal(view.check_consistent(), view.opening_z)
    finally:
        view.close()
        if server is not None:  # a failure to restart leaves none
            stop_kiosk(server)


def test_a_server_back_with_another_bundle_reloads_the_page(browser, runtime, shipped):
    """The kiosk restarted on a new model: the page rebuilds itself for it, untouched."""
    server = serve(runtime)
    port = server.server_address[1]
    view = Kiosk(browser, server, runtime)
    try:
        assert view.page.locator("#sliders input").count() == runtime.latent_dim
        stop_kiosk(server)
        server = None
        view.drag("#sliders input[data-dim='0']", 0.95)
        view.page.wait_for_function("document.body.dataset.offline === 'true'")
        new_runtime = shipped[1]
        assert new_runtime.latent_dim != runtime.latent_dim
        server = serve(new_runtime, port=port)
        view.page.wait_for_function(
            f"document.querySelectorAll('#sliders input').length === {new_runtime.latent_dim}",
            timeout=20_000)
        view.runtime = new_runtime
        view.opening_z = view.mu(new_runtime.index.ids[0])
        view.settle(timeout=20_000)
        np.testing.assert_array_equal(view.check_consistent(), view.opening_z)
        assert view.page.locator("#status.error").count() == 0
        # The only console errors are failed requests: refused in the outage, then the old z
        # refused (400) by the new model, which sends the page to start afresh.
        assert all(problem.startswith("Failed to load resource")
                   for problem in view.problems), view.problems
    finally:
        view.close()
        if server is not None:  # a failure to restart leaves none
            stop_kiosk(server)


# Every item the page loads (body's data-loaded), in order, in window.loadedIds.
RECORD_LOADED = """
window.loadedIds = [];
document.addEventListener("DOMContentLoaded", () => new MutationObserver(
    () => window.loadedIds.push(document.body.dataset.loaded)).observe(
    document.body, {attributeFilter: ["data-loaded"]}));
"""


def test_attract_mode_jumps_to_the_item_nearest_a_random_design(browser, runtime):
    """Every fourth step of attract mode leaves the walk between neighbours for the item
    nearest a random design (here the item farthest from the opening one)."""
    mu = runtime.index.mu.astype(np.float64)
    z = mu[np.argmax(np.square(mu - mu[0]).sum(axis=1))]
    expected = runtime.nearest(z, k=1, by="decoded").ids[0]
    server = serve(runtime, idle_reset=2, attract=1)
    view = Kiosk(browser, server, runtime, init_script=RECORD_LOADED)
    try:
        samples = []

        def design(route):
            samples.append(len(view.page.evaluate("window.loadedIds")))
            route.fulfill(json={"z": z.tolist(), "seed": None})

        view.page.route("**/api/sample", design)
        view.page.wait_for_function("window.loadedIds.length >= 4", timeout=30_000)
        loaded = view.page.evaluate("window.loadedIds")
        # Nobody pressed Surprise me: the one design asked for is the fourth step's.
        assert samples == [3] and loaded[3] == expected, (samples, loaded)
        view.page.locator("h1").tap()  # ends attract mode where it stands
        view.settle()
        view.check_consistent()
        assert view.problems == []
    finally:
        view.close()
        stop_kiosk(server)


# Answers from the kiosk's own server held back in the browser: a slow network, in a test.
DELAY_ANSWERS = """
(() => {
  const send = window.fetch.bind(window);
  window.delayed = {};  // path -> milliseconds, set by the test
  window.fetch = async (path, options) => {
    const answer = await send(path, options);
    const wait = window.delayed[String(path)] || 0;
    if (wait) await new Promise((resolve) => setTimeout(resolve, wait));
    return answer;
  };
})();
"""


def test_the_newest_action_wins_over_late_answers(browser, kiosk, runtime):
    view = Kiosk(browser, kiosk, runtime, init_script=DELAY_ANSWERS)
    try:
        page = view.page
        first, second = view.shown_ids()[:2]
        page.evaluate(f"window.delayed['/api/item/{first}'] = 1500")
        page.locator(f"#matches .item[data-id='{first}']").tap()
        page.locator(f"#matches .item[data-id='{second}']").tap()
        view.wait_for_z(view.mu(second).tolist())
        page.wait_for_timeout(2000)  # the first tap's answer has arrived by now
        view.settle()
        np.testing.assert_array_equal(view.check_consistent(), view.mu(second))

        # Surprise me answered late, after the shopper has moved a slider: the drag stays.
        page.evaluate("window.delayed['/api/sample'] = 1500")
        page.locator("#surprise").tap()
        view.drag("#sliders input[data-dim='1']", 0.05)
        page.wait_for_timeout(2000)
        view.settle()
        z = view.check_consistent()
        assert z[1] < -2.5
        np.testing.assert_array_equal(np.delete(z, 1), np.delete(view.mu(second), 1))

        # A pressed under one item, then under another: the later press keeps slot A.
        first, second = view.shown_ids()[:2]
        page.evaluate(f"window.delayed['/api/item/{first}'] = 1500")
        page.locator(f"#matches .match[data-id='{first}'] [data-slot='a']").tap()
        page.locator(f"#matches .match[data-id='{second}'] [data-slot='a']").tap()
        page.wait_for_function(f"document.querySelector('#slot-a').dataset.id === '{second}'")
        page.wait_for_timeout(2000)  # the first press's answer has arrived by now
        assert page.locator("#slot-a").get_attribute("data-id") == second
        assert view.problems == []
    finally:
        view.close()


def test_a_tap_during_a_morph_loads_the_item(page):
    first, second = page.shown_ids()[:2]
    page.page.locator(f"#matches .match[data-id='{first}'] [data-slot='a']").tap()
    page.page.locator(f"#matches .match[data-id='{second}'] [data-slot='b']").tap()
    page.page.wait_for_function("!document.querySelector('#morph-play').disabled")
    page.page.locator("#morph-play").tap()
    page.page.wait_for_function("Number(document.querySelector('#morph-t').value) > 0.2")
    assert page.page.evaluate("document.body.dataset.morphing") == "true"
    target = page.page.locator("#matches .item").nth(3)
    tapped = target.get_attribute("data-id")
    target.tap()
    page.page.wait_for_function(f"document.body.dataset.loaded === '{tapped}'")
    assert page.page.evaluate("document.body.dataset.morphing") == "false"
    page.wait_for_z(page.mu(tapped).tolist())
    np.testing.assert_array_equal(page.check_consistent(), page.mu(tapped))


def test_enter_on_a_result_keeps_the_focus_in_the_results(page):
    chosen = page.shown_ids()[2]
    page.page.locator(f"#matches .item[data-id='{chosen}']").focus()
    page.page.keyboard.press("Enter")
    page.wait_for_z(page.mu(chosen).tolist())
    focused = page.page.evaluate("document.activeElement.dataset.id")
    # The loaded item is still among the results for its own mu; the focus stays on it.
    assert chosen in page.shown_ids() and focused == str(chosen)


def test_results_show_catalog_metadata_and_a_qr_code(browser, kiosk, runtime):
    """A catalog with shop metadata: text ids (SKUs), names, prices and product links.

    The server's answers are rewritten in the browser into the shape such a catalog gives:
    the first result with a name, a price and a url, the second with empty metadata and
    label, the third with none at all; taps must reach the item by its text id.
    """
    import zxingcpp

    view = Kiosk(browser, kiosk, runtime)
    page = view.page
    sku = {}  # text id -> catalog id

    def shop_view(route):
        answer = route.fetch().json()
        for rank, item in enumerate(answer["nearest"]["results"]):
            text_id = f"SKU {item['id']}/{rank}"  # a space and a slash: URL-encoded in paths
            sku[text_id] = item["id"]
            item["id"] = text_id
            if rank == 0:
                item["metadata"] = {"name": "Blue shirt", "price": "19.99",
                                    "url": f"https://shop.example/p/{sku[text_id]}"}
            elif rank == 1:
                item["metadata"], item["label"] = {}, ""
        route.fulfill(json=answer)

    def shop_item(route):
        text_id = unquote(route.request.url.split("/api/item/", 1)[1])
        answer = route.fetch(url=f"{view.origin}/api/item/{sku[text_id]}").json()
        route.fulfill(json={**answer, "id": text_id})

    try:
        page.route("**/api/view", shop_view)
        page.route("**/api/item/SKU*", shop_item)
        view.drag("#sliders input[data-dim='0']", 0.8)
        view.settle()
        page.locator("#matches .match[data-id^='SKU']").nth(K - 1).wait_for()
        first, second, third = (page.locator("#matches .match").nth(i) for i in range(3))
        catalog_id = sku[first.get_attribute("data-id")]
        assert first.locator(".name").inner_text() == "Blue shirt"
        assert first.locator(".price").inner_text() == "19.99"
        second_id = second.get_attribute("data-id")
        assert second.locator(".name").inner_text() == f"Item {second_id}"
        assert not second.locator(".price").is_visible() and not second.locator(".qr").is_visible()
        label = runtime.label_names[runtime.index.labels[
            int(np.flatnonzero(runtime.index.ids == sku[third.get_attribute("data-id")])[0])]]
        assert third.locator(".name").inner_text() == label
        # The QR code, drawn on the page, reads back as the product's link.
        shot = first.locator(".qr svg").screenshot()
        with Image.open(io.BytesIO(shot)) as image:
            codes = zxingcpp.read_barcodes(image.convert("L"))
        assert [code.text for code in codes] == [f"https://shop.example/p/{catalog_id}"]

        first.locator(".item").tap()
        page.wait_for_function("document.body.dataset.loaded && "
                               "document.body.dataset.loaded.startsWith('SKU')")
        view.wait_for_z(view.mu(catalog_id).tolist())
        assert view.problems == []
    finally:
        view.close()


def test_a_vertical_swipe_on_a_slider_moves_only_the_slider(browser, kiosk, runtime):
    """On a phone the page is taller than the screen: a swipe from a slider must not scroll it,
    while the same swipe from the garment does."""
    view = Kiosk(browser, kiosk, runtime, viewport={"width": 390, "height": 844}, mobile=True)
    try:
        page = view.page

        def swipe_up(x, y):
            cdp = view.context.new_cdp_session(page)
            cdp.send("Input.dispatchTouchEvent",
                     {"type": "touchStart", "touchPoints": [{"x": x, "y": y}]})
            for step in range(1, 11):
                cdp.send("Input.dispatchTouchEvent",
                         {"type": "touchMove", "touchPoints": [{"x": x, "y": y - 30 * step}]})
            cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
            cdp.detach()
            page.wait_for_timeout(300)
            return page.evaluate("window.scrollY")

        box = page.locator("#sliders input[data-dim='6']").bounding_box()
        assert swipe_up(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2) == 0
        box = page.locator("#garment").bounding_box()
        assert swipe_up(box["x"] + box["width"] / 2, box["y"] + box["height"] - 5) > 0
        assert view.problems == []
    finally:
        view.close()


def contrast(rgb_a, rgb_b) -> float:
    """WCAG contrast ratio of two sRGB colours (0-255)."""
    def luminance(rgb):
        linear = [(c / 255 / 12.92) if c / 255 <= 0.04045 else ((c / 255 + 0.055) / 1.055) ** 2.4
                  for c in rgb]
        return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    light, dark = sorted((luminance(rgb_a), luminance(rgb_b)), reverse=True)
    return (light + 0.05) / (dark + 0.05)


def test_tracks_contrast_and_focus_rings_fit(page):
    # The track as drawn: the darkest colour along a row of the slider, away from its thumb,
    # against the panel around it.
    slider = page.page.locator("#sliders input[data-dim='0']")
    page.page.evaluate("document.querySelector('#sliders input[data-dim=\"0\"]').value = '-3'")
    with Image.open(io.BytesIO(slider.screenshot())) as shot:
        pixels = np.asarray(shot.convert("RGB"))
    row = pixels[pixels.shape[0] // 2, pixels.shape[1] // 2:]
    track = row[row.sum(axis=1).argmin()]
    panel = pixels[1, -1]
    assert contrast(track, panel) >= 3.0
    # Every focusable control, with its 3 px ring and offset, lies inside whatever clips it.
    clipped = page.page.evaluate("""() => {
        const ring = 5;
        const bad = [];
        for (const el of document.querySelectorAll("button, input")) {
            const box = el.getBoundingClientRect();
            for (let up = el.parentElement; up; up = up.parentElement) {
                const style = getComputedStyle(up);
                if (style.overflowX === "visible" && style.overflowY === "visible") continue;
                const clip = up.getBoundingClientRect();
                const left = clip.left + up.clientLeft, top = clip.top + up.clientTop;
                if (box.left - ring < left || box.top - ring < top ||
                    box.right + ring > left + up.clientWidth ||
                    box.bottom + ring > top + up.scrollHeight) bad.push(el.outerHTML.slice(0, 80));
            }
        }
        return bad;
    }""")
    assert clipped == []
    # Moving a slider says nothing to a screen reader: the live region stays quiet.
    page.drag("#sliders input[data-dim='1']", 0.8)
    page.settle()
    assert page.page.locator("#status").inner_text() == ""
    assert page.page.locator("[aria-live]").count() == 1


def test_the_kiosk_page_shows_the_catalog_photos_names_and_prices(shop, browser):
    """The page under its own content security policy, on a real catalog bundle: each result
    shows the item's photo (the bundle's WebP thumbnail, loaded), its name and its price."""
    csv, bundle = shop
    rows = {row["id"]: row for row in read_rows(csv)}
    runtime = Runtime.load(bundle)
    server = serve(runtime)
    try:
        chromium = browser
        context = chromium.new_context(viewport={"width": 1080, "height": 1920})
        page = context.new_page()
        problems = []
        page.on("console", lambda m: m.type == "error" and problems.append(m.text))
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("#matches .match .name")
        cards = page.locator("#matches .match")
        for i in range(cards.count()):
            card = cards.nth(i)
            row = rows[card.get_attribute("data-id")]
            assert card.locator(".name").inner_text() == row["name"]
            assert card.locator(".price").inner_text() == row["price"]
            card.locator("img").evaluate("img => img.decode()")
            assert card.locator("img").evaluate("img => img.naturalWidth") == 32
        assert problems == []
        context.close()
    finally:
        stop_kiosk(server)


def test_a_link_too_long_for_a_qr_code_leaves_the_other_results_shown(shop, browser, tmp_path):
    """Items whose url no QR code can hold (3,000 characters) show without a code; the rest
    of the list, with its codes, still shows."""
    from vae_edge.runtime.edit import add_items

    csv, original = shop
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    long_url = "https://shop.example/p?ref=" + "a" * 3000
    new_csv = write_csv(tmp_path / "long.csv", [  # every photo again: some among any matches
        {"id": f"LONG-{row['id']}", "image": str(csv.parent / row["image"]),
         "label": row["label"], "name": "Long link", "price": "1", "url": long_url}
        for row in read_rows(csv)])
    add_items(bundle, new_csv, log=lambda message: None)
    server = serve(Runtime.load(bundle))
    try:
        chromium = browser
        page = chromium.new_page()
        problems = []
        page.on("pageerror", lambda exc: problems.append(str(exc)))
        page.goto(server.url)
        page.wait_for_selector("#matches .match .name")
        ids = page.eval_on_selector_all("#matches .match", "els => els.map(e => e.dataset.id)")
        long = [i for i in ids if i.startswith("LONG-")]
        assert len(ids) == K and 0 < len(long) < K, ids
        for item_id in ids:
            qr = page.locator(f"#matches .match[data-id='{item_id}'] .qr")
            assert qr.is_hidden() == (item_id in long)
            assert qr.locator("svg").count() == (item_id not in long)
        assert page.locator("#status").inner_text() == ""
        assert problems == []
    finally:
        stop_kiosk(server)
