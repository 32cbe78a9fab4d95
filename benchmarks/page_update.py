"""One kiosk page update over HTTP: the picture and the list for a new z, side by side.

    python benchmarks/page_update.py [--updates 300] [--baseline PYTHONPATH]

Starts `vae-run serve` on the shipped model (its own process) and times, over loopback, what
the page sends for each slider change:

  view   one POST /api/view {"z", "k": 6, "by": "decoded"} (the page as it is)
  pair   POST /api/decode and POST /api/nearest for the same z at once, on two kept-alive
         connections, as a browser's Promise.all sends them; done when both are answered

With --baseline, a second server is started from another checkout (a folder holding a
`vae_edge` package whose runtime is that checkout's, put first on PYTHONPATH) and its pair is
timed in the same run; the variants take turns, one update each, so that load from elsewhere on
the machine falls on all of them alike. Prints the median and p99 per variant, in ms.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np

SERVE = "from vae_edge.runtime.cli import main; main()"
K = 6


def start_server(pythonpath: str | None) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    process = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env=env, cwd="/")
    line = process.stdout.readline()
    if "http://" not in line:
        process.kill()
        raise SystemExit(f"vae-run serve did not start: {line}")
    return process, int(line.split(" on ", 1)[1].split()[0].rstrip("/").rsplit(":", 1)[1])


def post(conn: http.client.HTTPConnection, path: str, body: dict) -> bytes:
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise SystemExit(f"{path}: HTTP {response.status} {data[:200]!r}")
    return data


class Variant:
    def __init__(self, name: str, port: int, pair: bool):
        self.name, self.pair, self.times = name, pair, []
        self.conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                      for _ in range(2 if pair else 1)]

    def update(self, z: list[float]) -> None:
        nearest = {"z": z, "k": K, "by": "decoded"}
        started = time.perf_counter()
        if self.pair:
            second = threading.Thread(target=post, args=(self.conns[1], "/api/nearest", nearest))
            second.start()
            post(self.conns[0], "/api/decode", {"z": z})
            second.join()
        else:
            post(self.conns[0], "/api/view", nearest)
        self.times.append(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=300)
    parser.add_argument("--baseline", metavar="PYTHONPATH", default=None,
                        help="a folder with the vae_edge package of the code to compare with")
    args = parser.parse_args()
    servers = [start_server(None)]
    variants = [Variant("view", servers[0][1], pair=False),
                Variant("pair", servers[0][1], pair=True)]
    if args.baseline:
        servers.append(start_server(args.baseline))
        variants.append(Variant("baseline pair", servers[1][1], pair=True))
    try:
        rng = np.random.default_rng(0)
        conn = variants[0].conns[0]
        conn.request("GET", "/api/info")
        d = json.loads(conn.getresponse().read())["latent_dim"]
        for variant in variants:  # warm-up
            for _ in range(10):
                variant.update(np.round(rng.uniform(-3, 3, d), 3).tolist())
            variant.times.clear()
        for _ in range(args.updates):
            z = np.round(rng.uniform(-3, 3, d), 3).tolist()
            for variant in variants:
                variant.update(z)
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=30)
    print(f"{args.updates} page updates each, shipped model, k={K}, by=decoded, loopback")
    for variant in variants:
        ms = np.array(variant.times) * 1000
        print(f"  {variant.name:<14} median {np.median(ms):6.2f} ms   p99 "
              f"{np.percentile(ms, 99):6.2f} ms")


if __name__ == "__main__":
    main()
