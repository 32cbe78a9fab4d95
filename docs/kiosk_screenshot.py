"""Make the kiosk screenshots in docs/: the page in headless Chromium at the three screen
shapes it is laid out for (landscape 1920x1080, portrait kiosk 1080x1920, phone 390x844),
each after the same short session, mid-morph.

    python docs/kiosk_screenshot.py [--bundle DIR] [--out-dir docs]

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (dev extra).
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
LAYOUTS = {  # file name -> (width, height, is_mobile)
    "kiosk.png": (1920, 1080, False),
    "kiosk-portrait.png": (1080, 1920, False),
    "kiosk-phone.png": (390, 844, True),
}


def drag(page, selector: str, start: float, end: float) -> None:
    box = page.locator(selector).bounding_box()
    y = box["y"] + box["height"] / 2
    inset = 16  # half the thumb: where the thumb sits at the ends of the track
    span = box["width"] - 2 * inset
    page.mouse.move(box["x"] + inset + span * start, y)
    page.mouse.down()
    page.mouse.move(box["x"] + inset + span * end, y, steps=5)
    page.mouse.up()


def session(page, a_end: float, b_end: float) -> None:
    """Push the first slider to each end and pick a morph end from each list, then stop the
    morph a third of the way from A to B."""
    idle = "document.body.dataset.busy === 'false'"
    page.locator("#matches .item").nth(5).wait_for()
    page.wait_for_function(idle)
    items = page.locator("#matches .match")
    for fraction, slot in ((a_end, "a"), (b_end, "b")):
        drag(page, "#sliders input[data-dim='0']", 0.5, fraction)
        page.wait_for_timeout(300)
        page.wait_for_function(idle)
        items.nth(0).locator(f"[data-slot='{slot}']").click()
        page.wait_for_function(f"document.querySelector('#slot-{slot}').dataset.id")
    page.wait_for_function("!document.querySelector('#morph-t').disabled")
    drag(page, "#morph-t", 0.0, 0.35)
    page.wait_for_timeout(300)
    page.wait_for_function(idle)
    # The slider previews for this z, and every picture, have arrived.
    page.wait_for_function("document.querySelector('#sliders').dataset.endsZ === "
                           "document.querySelector('#sliders').dataset.z")
    page.wait_for_function("[...document.querySelectorAll('img[src]')]"
                           ".every(i => i.complete && i.naturalWidth)")
    page.wait_for_timeout(3500)  # let the "Loaded ..." note fade out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="default: the shipped model")
    parser.add_argument("--out-dir", default="docs", type=Path)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--a-end", type=float, default=0.1,
                        help="where slider 1 goes (0..1 of its track) before choosing A")
    parser.add_argument("--b-end", type=float, default=0.9, help="... and before choosing B")
    args = parser.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from vae_edge.runtime import Runtime
    from vae_edge.runtime.server import make_server

    server = make_server(Runtime.load(args.bundle), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=CHROMIUM_ARGS)
            for name, (width, height, mobile) in LAYOUTS.items():
                context = browser.new_context(viewport={"width": width, "height": height},
                                              has_touch=True, is_mobile=mobile,
                                              bypass_csp=True)
                page = context.new_page()
                page.goto(server.url)
                session(page, args.a_end, args.b_end)
                page.screenshot(path=str(args.out_dir / name))
                context.close()
                print(f"wrote {args.out_dir / name}")
            browser.close()
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
