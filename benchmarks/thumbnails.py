"""`vae-run nearest --sheet` on a bundle with honest thumbnails and on re-signed ones whose
WebP headers claim 16383x16383 or 9000x9000 pixels (10-byte payloads, 38 bytes each).

    python benchmarks/thumbnails.py [--runs 3]

The bundles are the shipped model's with thumbnails added (28x28 WebP per item) and the
manifest re-signed, written to a temporary directory. Each command runs as a fresh process:
exit status, last line of its output, median wall time and peak resident set (ru_maxrss) of
--runs. Linux only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN_CLI = "import sys; from vae_edge.runtime.cli import main; sys.argv[0] = 'vae-run'; main()"


def webp(side: int) -> bytes:
    """A 28x28 lossless WebP, its header changed to claim side x side (side 28: as it is)."""
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (28, 28), 128).save(out, format="WEBP", lossless=True)
    data = out.getvalue()
    field = int.from_bytes(data[21:25], "little")
    field = (side - 1) | ((side - 1) << 14) | (field & ~((1 << 28) - 1))
    return data[:21] + field.to_bytes(4, "little") + data[25:]


def bundle_with(root: Path, side: int) -> Path:
    import numpy as np

    from vae_edge.runtime.bundle import default_bundle_path, pack_thumbnails, write_manifest

    out = root / f"thumbnails-{side}"
    shutil.copytree(default_bundle_path(), out)
    manifest = json.loads((out / "manifest.json").read_text())
    size = manifest["index"]["size"]
    packed = pack_thumbnails([webp(side)] * size)
    (out / "thumbnails.bin").write_bytes(packed["thumbnails"])
    np.save(out / "thumbnail_offsets.npy", packed["thumbnail_offsets"])
    manifest["thumbnails"] = {"files": {"images": "thumbnails.bin",
                                        "offsets": "thumbnail_offsets.npy"},
                              "format": "webp", "size": [28, 28]}
    manifest["files"].update({"thumbnails.bin": {}, "thumbnail_offsets.npy": {}})
    write_manifest(out, manifest)
    return out


def run(bundle: Path, sheet: Path) -> tuple[int, str, float, float]:
    """Exit status, last output line, wall seconds, peak RSS in MB of one fresh process."""
    sheet.unlink(missing_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_CLI, "nearest", "--bundle", str(bundle), "--random",
         "--seed", "0", "-k", "20", "--sheet", str(sheet)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    process.stdout.close()
    _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, in kB
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    lines = output.strip().splitlines()
    return process.returncode, lines[-1] if lines else "", seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        root = Path(work)
        print(f"{'thumbnails':<24} {'exit':>4} {'wall s':>7} {'peak MB':>8}  last line")
        for side, name in ((28, "28x28 (honest)"), (16383, "claim 16383x16383"),
                           (9000, "claim 9000x9000")):
            bundle = bundle_with(root, side)
            results = [run(bundle, root / "sheet.png") for _ in range(args.runs)]
            status, last = results[-1][:2]
            wall = statistics.median(r[2] for r in results)
            peak = statistics.median(r[3] for r in results)
            print(f"{name:<24} {status:>4} {wall:7.2f} {peak:8.0f}  {last[:110]}")
            shutil.rmtree(bundle)


if __name__ == "__main__":
    main()
