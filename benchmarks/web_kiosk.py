"""The served kiosk beside the exported one (`vae-run export-web`), in one run of headless
Chromium on this machine:

    python benchmarks/web_kiosk.py [--bundle DIR] [--changes 200]

Each kiosk in a fresh browser: `vae-run serve` (its own process), and the exported site from
a plain static file server (its own process, Python's http.server counting the bytes it
sends). Prints, per kiosk: first load (navigation to the first garment and list shown, empty
cache) and warm load (a reload), bytes transferred on the first load (for the exported site
with the service worker's copy of every file, which it fetches once more), the time from a
slider change to the page showing the new garment and list (p50, p99 over --changes changes
of one slider at a time to a random value in the range, each after the previous change's
slider previews have settled), and the tab's memory: the proportional set size (PSS) of the
browser's renderer processes (the page, and the service worker's) and the page's JS heap.
Also the exported site's size, as files and gzipped (what a server that compresses sends).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHROMIUM = os.environ.get("KIOSK_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

SETTLED = """() => {
    const z = document.getElementById("sliders").dataset.z;
    return document.body.dataset.busy === "false" && z !== undefined &&
        document.getElementById("garment").dataset.z === z &&
        document.getElementById("matches").dataset.z === z;
}"""

SLIDER_CHANGES = """async ([count, range]) => {
    const inputs = [...document.querySelectorAll("#sliders input")];
    const sliders = document.getElementById("sliders");
    const garment = document.getElementById("garment");
    const list = document.getElementById("matches");
    const until = (done) => new Promise((resolve) => {
        if (done()) return resolve();
        const watch = new MutationObserver(() => {
            if (done()) { watch.disconnect(); resolve(); }
        });
        watch.observe(document.body, { attributes: true, subtree: true });
    });
    let seed = 12345;
    const random = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
    const times = [];
    for (let i = 0; i < count; i++) {
        const input = inputs[i % inputs.length];
        let value = ((2 * random() - 1) * range).toFixed(2);
        if (value === input.value) value = String(Number(value) / 2);
        const start = performance.now();
        input.value = value;
        input.dispatchEvent(new Event("input", { bubbles: true }));
        const z = sliders.dataset.z;
        await until(() => garment.dataset.z === z && list.dataset.z === z);
        times.push(performance.now() - start);
        await until(() => document.body.dataset.busy === "false" && sliders.dataset.endsZ === z);
    }
    return times;
}"""


class CountingHandler(SimpleHTTPRequestHandler):
    """Python's static file server, counting every byte it sends (GET /.bytes tells)."""

    sent = 0

    def log_message(self, format, *args):
        pass

    def setup(self):
        super().setup()
        write = self.wfile.write

        def counted(data):
            if getattr(self, "path", None) != "/.bytes":  # the counter's answers are not the site's
                CountingHandler.sent += len(data)
            return write(data)

        self.wfile.write = counted

    def do_GET(self):
        if self.path == "/.bytes":
            body = str(CountingHandler.sent).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()


def serve_static(folder: str, port: int) -> None:
    handler = functools.partial(CountingHandler, directory=folder)
    ThreadingHTTPServer(("127.0.0.1", port), handler).serve_forever()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(url: str, timeout: float = 60.0) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def renderer_pss_mb() -> float:
    """PSS of this process's descendant Chromium renderers, MB (from /proc)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    mine, grew = {os.getpid()}, True
    while grew:
        more = {pid for pid, parent in parents.items() if parent in mine} - mine
        grew = bool(more)
        mine |= more
    total = 0
    for pid in mine:
        try:
            if b"--type=renderer" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def measure(playwright, url: str, changes: int, z_range: float, site_bytes=None) -> dict:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        # bypass_csp: Playwright's wait_for_function evaluates code, which the page's policy
        # forbids; the page itself runs the same either way.
        context = browser.new_context(viewport={"width": 1920, "height": 1080},
                                      bypass_csp=True)
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send("Performance.enable")
        received = []
        cdp.on("Network.loadingFinished", lambda event: received.append(event["encodedDataLength"]))
        start = time.perf_counter()
        page.goto(url)
        page.wait_for_function(SETTLED, timeout=120_000, polling=5)
        first_s = time.perf_counter() - start
        offline = page.evaluate("document.body.dataset.offlineReady === 'true'")
        if site_bytes is not None:  # the service worker's copy of every file
            page.wait_for_function("document.body.dataset.offlineReady === 'true'",
                                   timeout=120_000)
            offline = True
        page.wait_for_timeout(500)
        transferred = site_bytes() if site_bytes is not None else sum(received)
        start = time.perf_counter()
        page.reload()
        page.wait_for_function(SETTLED, timeout=120_000, polling=5)
        warm_s = time.perf_counter() - start
        page.wait_for_timeout(500)
        times = page.evaluate(SLIDER_CHANGES, [changes, z_range])
        metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
        return {"first_load_s": first_s, "warm_load_s": warm_s,
                "first_load_bytes": transferred, "offline_ready": offline,
                "update_p50_ms": statistics.median(times),
                "update_p99_ms": sorted(times)[min(len(times) - 1, int(0.99 * len(times)))],
                "renderer_pss_mb": renderer_pss_mb(),
                "js_heap_mb": metrics["JSHeapUsedSize"] / 1e6}
    finally:
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle directory (default: shipped)")
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--range", type=float, default=3.0, help="the kiosk's slider range")
    parser.add_argument("--serve-static", nargs=2, metavar=("DIR", "PORT"),
                        help=argparse.SUPPRESS)  # the static server's own process
    args = parser.parse_args()
    if args.serve_static:
        serve_static(args.serve_static[0], int(args.serve_static[1]))
        return

    from playwright.sync_api import sync_playwright

    from vae_edge.runtime import Runtime

    bundle = str(Runtime.load(args.bundle).root)
    with tempfile.TemporaryDirectory() as work:
        site = Path(work) / "site"
        subprocess.run(["vae-run", "export-web", "--bundle", bundle, "-o", str(site),
                        "--idle-reset", "0", "--range", str(args.range)], check=True)
        files = [path for path in site.rglob("*") if path.is_file()]
        size = sum(path.stat().st_size for path in files)
        gzipped = sum(len(gzip.compress(path.read_bytes(), compresslevel=6)) for path in files)
        served_port, static_port = free_port(), free_port()
        processes = [
            subprocess.Popen(["vae-run", "serve", "--bundle", bundle, "--port", str(served_port),
                              "--idle-reset", "0", "--range", str(args.range)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen([sys.executable, __file__, "--serve-static", str(site),
                              str(static_port)]),
        ]
        try:
            served = f"http://127.0.0.1:{served_port}/"
            static = f"http://127.0.0.1:{static_port}/"
            wait_until_up(served + "api/info")
            wait_until_up(static + ".bytes")

            def static_bytes():
                import urllib.request

                return int(urllib.request.urlopen(static + ".bytes").read())

            with sync_playwright() as playwright:
                rows = {"served (vae-run serve)": measure(playwright, served, args.changes,
                                                          args.range),
                        "in-page (export-web)": measure(playwright, static, args.changes,
                                                        args.range, static_bytes)}
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    print(f"exported site: {len(files)} files, {size / 1e6:.1f} MB, {gzipped / 1e6:.2f} MB "
          f"gzipped (level 6)")
    print(f"slider changes: {args.changes}, one slider at a time, range {args.range:g}")
    header = ("kiosk", "update p50 ms", "update p99 ms", "first load s", "warm load s",
              "first load MB", "renderer PSS MB", "JS heap MB")
    print(" | ".join(header))
    for name, row in rows.items():
        print(" | ".join([name, f"{row['update_p50_ms']:.1f}", f"{row['update_p99_ms']:.1f}",
                          f"{row['first_load_s']:.2f}", f"{row['warm_load_s']:.2f}",
                          f"{row['first_load_bytes'] / 1e6:.2f}",
                          f"{row['renderer_pss_mb']:.0f}", f"{row['js_heap_mb']:.1f}"]))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
