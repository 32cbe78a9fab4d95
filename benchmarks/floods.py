"""Hostile clients against `vae-run serve`: a shopper's latency while another address floods.

    python benchmarks/floods.py                  # this tree, the shipped model
    python benchmarks/floods.py --baseline REV   # ... and REV's runtime, side by side
    python benchmarks/floods.py --seconds 5      # shorter floods

Loopback only. The server runs as `vae-run serve` with the open-file limit systemd gives a
service by default (1,024). Each flood comes from 127.0.0.2, runs --seconds and stops by
itself; meanwhile a shopper on 127.0.0.1 asks, every 0.1 s on one kept-alive connection, for
`nearest` (a computing route) and `info` (answered on the event loop), each with a 15 s
timeout. The floods:

  never-read   1,000 connections, each sending 100 pipelined GET /static/qrcode.js and
               never reading
  idle         1,000 connections that send nothing
  head-ends    160 connections, each sending HEAD /api/ends, reading the answer, again
  pipe-ends    32 connections, each pipelining 20 GET /api/ends and reading the answers, again

Prints, per flood: the shopper's median, 90th percentile and worst latency for each route, its
failed requests, the server's peak resident memory during the flood (VmRSS, sampled every
0.1 s), and what the server wrote to stderr (lines, tracebacks, EMFILE errors). The flooding
client shares the CPU with the server; compare figures from one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from footprint import extract_revision, link_tree  # noqa: E402

SERVE = "from vae_edge.runtime.cli import main; main()"
FLOODER, SHOPPER = "127.0.0.2", "127.0.0.1"
SERVICE_FILES = 1024  # systemd's default soft limit on open files (LimitNOFILE)
Z = "0.5,-1.2,0.0,1.0,2.0,-2.0,0.1,3.0,0.3,-0.7,1.1,0.0,-0.4,0.9,-1.5,0.2"
HOST = b"Host: 127.0.0.1\r\n"


def start_server(env: dict, log) -> tuple[subprocess.Popen, int]:
    def service_limits():
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (SERVICE_FILES, hard))

    process = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--port", "0"], env=env,
                               stdout=subprocess.PIPE, stderr=log, text=True,
                               preexec_fn=service_limits)
    line = process.stdout.readline()
    if "http://" not in line:
        process.kill()
        raise SystemExit(f"vae-run serve did not start: {line}")
    return process, int(line.split("http://127.0.0.1:")[1].split("/")[0])


def resident_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024


# -- floods (asyncio, in their own thread) -----------------------------------------------------


async def connect(port: int) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((FLOODER, 0))
    try:
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port)),
                               2.0)
        return sock
    except (OSError, asyncio.TimeoutError):
        sock.close()
        return None


async def hold(port: int, seconds: float, payload: bytes) -> None:
    """1,000 connections that send payload (or nothing) and never read, held for seconds."""
    deadline = time.monotonic() + seconds
    socks = [sock for sock in await asyncio.gather(*(connect(port) for _ in range(1000))) if sock]
    for sock in socks:
        try:
            sock.send(payload)  # what fits; a client that never reads sends no more either
        except OSError:
            pass
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    for sock in socks:
        sock.close()


async def read_answer(reader: asyncio.StreamReader, head_only: bool) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if not head_only and length:
        await reader.readexactly(length)


async def repeat(port: int, seconds: float, connections: int, request: bytes, pipelined: int,
                 head_only: bool) -> None:
    """connections clients, each sending `pipelined` requests and reading their answers, again,
    until seconds have passed (a closed connection is opened again)."""
    deadline = time.monotonic() + seconds

    async def client():
        while time.monotonic() < deadline:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(FLOODER, 0)), 2.0)
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
                continue
            try:
                while time.monotonic() < deadline:
                    writer.write(request * pipelined)
                    for _ in range(pipelined):
                        await asyncio.wait_for(read_answer(reader, head_only),
                                               max(0.01, deadline - time.monotonic()))
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError,
                    asyncio.LimitOverrunError):
                pass
            finally:
                writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))


FLOODS = {
    "never-read": lambda port, s: hold(
        port, s, (b"GET /static/qrcode.js HTTP/1.1\r\n" + HOST + b"\r\n") * 100),
    "idle": lambda port, s: hold(port, s, b""),
    "head-ends": lambda port, s: repeat(
        port, s, 160, f"HEAD /api/ends?z={Z} HTTP/1.1\r\n".encode() + HOST + b"\r\n", 1, True),
    "pipe-ends": lambda port, s: repeat(
        port, s, 32, f"GET /api/ends?z={Z} HTTP/1.1\r\n".encode() + HOST + b"\r\n", 20, False),
}


# -- the shopper --------------------------------------------------------------------------------


def shop(port: int, stop: threading.Event, times: dict, failures: list) -> None:
    conn = None
    while not stop.is_set():
        for route, path in (("nearest", f"/api/nearest?z={Z}"), ("info", "/api/info")):
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15,
                                                  source_address=(SHOPPER, 0))
            started = time.perf_counter()
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    failures.append(f"{route}: HTTP {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"{route}: {exc!r}")
                conn.close()
                conn = None
            times[route].append(time.perf_counter() - started)
        stop.wait(0.1)
    if conn is not None:
        conn.close()


def run_flood(name: str, port: int, pid: int, seconds: float) -> dict:
    times, failures = {"nearest": [], "info": []}, []
    stop = threading.Event()
    shopper = threading.Thread(target=shop, args=(port, stop, times, failures))
    peak = [resident_mb(pid)]

    def sample():
        while not stop.is_set():
            try:
                peak.append(resident_mb(pid))
            except OSError:
                return
            stop.wait(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    shopper.start()
    time.sleep(0.5)  # the shopper's first answers, before the flood
    if name != "quiet":
        asyncio.run(FLOODS[name](port, seconds))
    else:
        time.sleep(seconds)
    time.sleep(0.5)
    stop.set()
    shopper.join()
    sampler.join()
    return {"times": times, "failures": failures, "peak": max(peak)}


def run_tree(env: dict, floods: list[str], seconds: float) -> dict:
    rows = {}
    with tempfile.TemporaryFile("w+") as log:
        process, port = start_server(env, log)
        try:
            for name in ("quiet", *floods):
                start = log.tell()
                rows[name] = run_flood(name, port, process.pid, seconds)
                log.seek(start)
                text = log.read()
                rows[name]["stderr"] = (text.count("\n"), text.count("Traceback"),
                                        text.count("Too many open files"))
                time.sleep(1.0)  # let the flood's connections close
            rows["idle MB"] = resident_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return rows


def ms(values: list[float]) -> str:
    if not values:
        return f"{'-':>23}"
    p90 = (statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1
           else values[0])
    return f"{statistics.median(values) * 1e3:>7.0f} {p90 * 1e3:>7.0f} {max(values) * 1e3:>7.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each flood")
    parser.add_argument("--baseline", metavar="REV", help="git revision to compare with")
    parser.add_argument("--floods", nargs="+", choices=list(FLOODS), default=list(FLOODS),
                        help="which floods to run (default: all)")
    args = parser.parse_args()
    if not 0 < args.seconds <= 60:
        parser.error("--seconds must lie in (0, 60]")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard or soft == resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))  # this script's own sockets

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trees = {"this tree": {**os.environ, "PYTHONPATH": str(link_tree(tmp / "tree"))}}
        if args.baseline:
            trees[args.baseline] = {**os.environ, "PYTHONPATH": str(
                extract_revision(args.baseline, tmp / "baseline"))}
        print(f"{os.cpu_count()} cores shared by server and clients (load average "
              f"{os.getloadavg()[0]:.1f}); each flood {args.seconds:g} s from {FLOODER}; shopper "
              f"on {SHOPPER}: median, 90th percentile and worst ms; server open-file limit "
              f"{SERVICE_FILES}")
        for tree, env in trees.items():
            rows = run_tree(env, args.floods, args.seconds)
            print(f"\n{tree}: server resident after the floods {rows.pop('idle MB'):.1f} MB")
            print(f"{'flood':<11} {'nearest p50':>11} {'p90':>7} {'max':>7} {'info p50':>8} "
                  f"{'p90':>7} {'max':>7} "
                  f"{'failed':>6} {'peak MB':>8} {'stderr lines':>12} {'tracebacks':>10} "
                  f"{'EMFILE':>6}")
            for name, row in rows.items():
                lines, tracebacks, emfile = row["stderr"]
                print(f"{name:<11}     {ms(row['times']['nearest'])}  {ms(row['times']['info'])} "
                      f"{len(row['failures']):>6} {row['peak']:>8.1f} {lines:>12} "
                      f"{tracebacks:>10} {emfile:>6}")
                for failure in row["failures"][:3]:
                    print(f"    {failure}")


if __name__ == "__main__":
    main()
