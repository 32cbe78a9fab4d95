"""HTTP load on `vae-run serve` over loopback: N concurrent clients x M mixed requests each.

    python benchmarks/load.py                      # starts `vae-run serve` on the shipped model
    python benchmarks/load.py --bundle DIR         # ... on another bundle
    python benchmarks/load.py --url http://127.0.0.1:8000/   # an already running server

The mix follows what the kiosk page asks for: what every slider update computes, a decode and a
nearest (k=6) request (routes every version of the server answers, so that two can be compared;
the page sends both as one /api/view, timed by benchmarks/page_update.py), plus prior samples
and catalog items (JSON and picture). Each client keeps one
keep-alive connection, like a browser. Prints p50/p99 latency per route and overall, throughput
and the error count (any status other than 200, or a failed connection). Bounded in count
(--clients x --requests) and in time (--max-seconds): a run that hits the time limit says so.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import subprocess
import sys
import threading
import time
from urllib.parse import urlsplit

import numpy as np

MIX = (("nearest", 0.35), ("decode", 0.35), ("sample", 0.10), ("item", 0.10),
       ("item.png", 0.10))
SERVE = "from vae_edge.runtime.cli import main; main()"


def start_server(bundle: str | None, threads: int) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-c", SERVE, "serve", "--port", "0", "--threads", str(threads)]
    if bundle:
        command += ["--bundle", bundle]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stdout.readline()
    if "http://" not in line:
        process.kill()
        raise SystemExit(f"vae-run serve did not start:\n{line}{process.stderr.read()}")
    return process, line.split(" on ", 1)[1].split()[0]


class Client:
    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.conn = None

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        data = None if body is None else json.dumps(body).encode()
        headers = {} if body is None else {"Content-Type": "application/json"}
        try:
            self.conn.request(method, path, body=data, headers=headers)
            response = self.conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None  # reconnect on the next request
            raise


def plan(rng: np.random.Generator, n: int, d: int, item_ids: list[int], k: int):
    """n (route, method, path, body) tuples, drawn with the MIX weights."""
    names = [name for name, _ in MIX]
    weights = np.array([w for _, w in MIX])
    kinds = rng.choice(len(names), size=n, p=weights / weights.sum())
    requests = []
    for kind in kinds:
        name = names[kind]
        z = np.round(rng.uniform(-3, 3, size=d), 2).tolist()
        if name == "nearest":
            requests.append((name, "POST", "/api/nearest", {"z": z, "k": k}))
        elif name == "decode":
            requests.append((name, "POST", "/api/decode", {"z": z}))
        elif name == "sample":
            requests.append((name, "GET", "/api/sample", None))
        else:
            item_id = item_ids[rng.integers(len(item_ids))]
            suffix = "/image" if name == "item.png" else ""
            requests.append((name, "GET", f"/api/item/{item_id}{suffix}", None))
    return requests


def run_client(url, requests, deadline, latencies, errors):
    client = Client(url)
    for name, method, path, body in requests:
        if time.monotonic() > deadline:
            return
        started = time.perf_counter()
        try:
            status, _ = client.call(method, path, body)
        except (OSError, http.client.HTTPException) as exc:
            errors.append(f"{name}: {exc!r}")
            continue
        latencies.append((name, time.perf_counter() - started))
        if status != 200:
            errors.append(f"{name}: HTTP {status}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="an already running kiosk server")
    where.add_argument("--bundle", help="bundle to serve (default: the shipped model)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=2000, help="per client")
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime threads (server)")
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_seconds <= 0:
        parser.error("--clients, --requests and --max-seconds must be positive")

    process = None
    url = args.url
    if url is None:
        process, url = start_server(args.bundle, args.threads)
    try:
        probe = Client(url)
        status, raw = probe.call("GET", "/api/info")
        if status != 200:
            raise SystemExit(f"{url}api/info answered HTTP {status}")
        info = json.loads(raw)
        d = info["latent_dim"]
        rng = np.random.default_rng(args.seed)
        item_ids = set()
        for z in rng.standard_normal((20, d)):  # warm-up, and real item ids to ask for
            status, raw = probe.call("POST", "/api/nearest", {"z": z.tolist(), "k": 10})
            item_ids.update(r["id"] for r in json.loads(raw)["results"])
        item_ids = sorted(item_ids)

        plans = [plan(np.random.default_rng([args.seed, c]), args.requests, d, item_ids, args.k)
                 for c in range(args.clients)]
        latencies, errors = [], []  # list.append is atomic: shared by the client threads
        deadline = time.monotonic() + args.max_seconds
        threads = [threading.Thread(target=run_client, args=(url, p, deadline, latencies, errors))
                   for p in plans]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)

    planned = args.clients * args.requests
    done = len(latencies) + len(errors)
    print(f"server: {url} (latent dim {d}, {info['catalog_size']} catalog items, "
          f"onnxruntime threads {args.threads})")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"1-minute load average at the end {os.getloadavg()[0]:.2f} (machine shared)")
    print(f"{args.clients} clients x {args.requests} requests = {planned} planned, {done} sent "
          f"in {elapsed:.1f} s ({done / elapsed:.0f} requests/s)")
    if done < planned:
        print(f"STOPPED at the {args.max_seconds:g} s limit before all requests were sent")
    print(f"{'route':<10} {'count':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    rows = [(name, [t for n, t in latencies if n == name]) for name, _ in MIX]
    rows.append(("all", [t for _, t in latencies]))
    for name, times in rows:
        if times:
            ms = np.array(times) * 1e3
            print(f"{name:<10} {len(ms):>6} {np.percentile(ms, 50):>8.2f} "
                  f"{np.percentile(ms, 99):>8.2f} {ms.max():>8.2f}")
    print(f"errors: {len(errors)}")
    for message in errors[:10]:
        print(f"  {message}")
    return 1 if errors or done < planned else 0


if __name__ == "__main__":
    sys.exit(main())
