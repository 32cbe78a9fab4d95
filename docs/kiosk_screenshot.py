"""Make docs/kiosk.png: the kiosk page at 1920x1080 in headless Chromium, mid-morph.

    python docs/kiosk_screenshot.py [--bundle DIR] [-o docs/kiosk.png]

Needs Debian's chromium (/usr/bin/chromium) and the playwright package (dev extra).
"""

from __future__ import annotations

import argparse
import threading

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def drag(page, selector: str, start: float, end: float) -> None:
    box = page.locator(selector).bounding_box()
    y = box["y"] + box["height"] / 2
    inset = 17  # half the thumb: where the thumb sits at the ends of the track
    span = box["width"] - 2 * inset
    page.mouse.move(box["x"] + inset + span * start, y)
    page.mouse.down()
    page.mouse.move(box["x"] + inset + span * end, y, steps=5)
    page.mouse.up()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", default=None, help="default: the shipped model")
    parser.add_argument("-o", "--output", default="docs/kiosk.png")
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
    idle = "document.body.dataset.busy === 'false'"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium,
                                                 args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1920, "height": 1080}, bypass_csp=True)
            page.goto(server.url)
            page.locator("#matches .item").nth(5).wait_for()
            page.wait_for_function(idle)
            # A person's session: push the first slider to each end and pick a morph end
            # from each list, then stop the morph a third of the way from A to B.
            items = page.locator("#matches .match")
            for fraction, slot in ((args.a_end, "a"), (args.b_end, "b")):
                drag(page, "#sliders input[data-dim='0']", 0.5, fraction)
                page.wait_for_timeout(300)
                page.wait_for_function(idle)
                items.nth(0).locator(f"[data-slot='{slot}']").click()
                page.wait_for_function(f"document.querySelector('#slot-{slot}').dataset.id")
            page.wait_for_function("!document.querySelector('#morph-t').disabled")
            drag(page, "#morph-t", 0.0, 0.35)
            page.wait_for_timeout(300)
            page.wait_for_function(idle)
            page.wait_for_function("[...document.querySelectorAll('img[src]')]"
                                   ".every(i => i.complete && i.naturalWidth)")
            page.wait_for_timeout(3500)  # let the "Loaded ..." note fade out
            page.screenshot(path=args.output)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
