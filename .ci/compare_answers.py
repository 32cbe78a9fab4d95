"""Compare the answers of `vae-run` on two machines (directories written by arm_check.sh).

    python .ci/compare_answers.py HOST_DIR GUEST_DIR     # exit status 1 when they differ

Same bundle summary, same ranked ids and labels, decoded PNGs equal pixel for pixel (to one
grey level: the decoder's float32 output can land either side of a rounding step), and scores
equal to within what each path can promise across CPUs:
- a z query: log q(z|x) in float64 from the same float16 index, so equal to ~1 ulp (libm's
  exp may differ in the last bit); p(x|z) within twice the engine's 1.1e-7 relative bound.
- an image query: the encoder runs in float32 with each CPU's own kernels, so its mu and
  log-sigma differ in the last float32 bits, and the scores (-W2^2 / (2 tau^2)) by ~1e-6.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np

Z_QUERIES = ("nearest.json", "nearest_label.json")
IMAGE_QUERIES = ("nearest_image.json",)
# (log-likelihood relative, probability relative) tolerance per kind of query
TOLERANCE = {"z": (1e-13, 2.2e-7), "image": (1e-6, 1e-4)}


def compare_matches(a: dict, b: dict, kind: str) -> tuple[bool, str]:
    ids_a = [(r["id"], r["label_id"]) for r in a["results"]]
    ids_b = [(r["id"], r["label_id"]) for r in b["results"]]
    if ids_a != ids_b:
        return False, f"ranked ids differ: {ids_a} vs {ids_b}"
    ll_a, ll_b = (np.array([r["log_likelihood"] for r in side["results"]]) for side in (a, b))
    p_a, p_b = (np.array([r["probability"] for r in side["results"]]) for side in (a, b))
    ll_rel = float(np.max(np.abs(ll_a - ll_b) / np.abs(ll_a)))
    p_rel = float(np.max(np.abs(p_a - p_b) / np.maximum(p_a, np.finfo(float).tiny)))
    ll_tol, p_tol = TOLERANCE[kind]
    if (ll_a == ll_b).all() and (p_a == p_b).all():
        return True, "identical"
    ok = ll_rel <= ll_tol and p_rel <= p_tol
    ll = "bit-identical" if (ll_a == ll_b).all() else f"within {ll_rel:.2g} relative"
    return ok, (f"same ids; log-likelihoods {ll} (tolerance {ll_tol:g}), probabilities within "
                f"{p_rel:.2g} relative (tolerance {p_tol:g})")


def compare_png(a: Path, b: Path) -> tuple[bool, str]:
    if a.read_bytes() == b.read_bytes():
        return True, "identical bytes"
    from PIL import Image

    pa, pb = (np.asarray(Image.open(io.BytesIO(p.read_bytes())), dtype=np.int16) for p in (a, b))
    if pa.shape != pb.shape:
        return False, f"sizes differ: {pa.shape} vs {pb.shape}"
    diff = np.abs(pa - pb)
    return int(diff.max()) <= 1, (f"{int((diff > 0).sum())} pixels differ, by at most "
                                  f"{int(diff.max())} grey levels")


def main(host: Path, guest: Path) -> bool:
    results = []
    info_a, info_b = (json.loads((side / "info.json").read_text()) for side in (host, guest))
    info_a.pop("bundle"), info_b.pop("bundle")  # the bundle path is the install location
    results.append(("info.json", info_a == info_b,
                    "identical" if info_a == info_b else "bundle summaries differ"))
    for name in Z_QUERIES + IMAGE_QUERIES:
        a, b = (json.loads((side / name).read_text()) for side in (host, guest))
        results.append((name, *compare_matches(a, b, "z" if name in Z_QUERIES else "image")))
    results.append(("decoded.png", *compare_png(host / "decoded.png", guest / "decoded.png")))
    for name, ok, detail in results:
        print(f"  {name:<20} {'ok  ' if ok else 'FAIL'} {detail}")
    return all(ok for _, ok, _ in results)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(0 if main(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
