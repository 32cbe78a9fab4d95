"""Training recipes for a colour catalog, compared through the documented commands.

Each recipe is `vae-train --catalog CSV --skip-bad` with the defaults plus the recipe's own
options, then `vae-export` and `vae-eval --catalog` (the kiosk's match mode, by="decoded");
one table line per recipe: the held-out loss, the slider scenario for z ~ N(0, I) and uniform
in [-5, 5]^d (median pixel r of the top match as a share of the bound, distinct first items),
photo queries (label agreement of the nearest other item beside raw-pixel L2) and the
training time. A recipe is a name and its options; runs already in OUT are reused.

    python benchmarks/real_catalog.py runs/real
    python benchmarks/catalog_recipe.py runs/real/catalog.csv runs/recipes \\
        default="" beta1="--beta 1" labels="--label-weight 30"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def run(command: list[str], log: Path) -> None:
    with open(log, "a", encoding="utf-8") as handle:
        handle.write("$ " + shlex.join(command) + "\n")
        handle.flush()
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{shlex.join(command)} failed (exit {done.returncode}); see {log}")


def recipe_line(csv: Path, out: Path, name: str, options: str, queries: int) -> str:
    run_dir, log = out / name, out / f"{name}.log"
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = run_dir / "checkpoint.pt"
    if not (run_dir / "trained").exists():
        started = time.perf_counter()
        run(["vae-train", "--catalog", str(csv), "--skip-bad", "--no-progress", "--resume",
             "--out", str(run_dir), *shlex.split(options)], log)
        (run_dir / "trained").write_text(f"{time.perf_counter() - started:.0f}\n")
    if not (run_dir / "bundle").exists():
        run(["vae-export", str(checkpoint), "-o", str(run_dir / "bundle"), "--skip-bad"], log)
    if not (run_dir / "eval" / "report.json").exists():
        run(["vae-eval", str(run_dir / "bundle"), "--catalog", str(csv), "-o",
             str(run_dir / "eval"), "--slider-queries", str(queries), "--force"], log)
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    manifest = json.loads((run_dir / "bundle" / "manifest.json").read_text())
    slider, photos = report["slider_scenario"], report["photo_queries"]
    cells = [f"{slider[source]['decoded']['of_bound']:.2f}, "
             f"{slider[source]['decoded']['distinct_top_items']:.2f}"
             for source in ("normal", "uniform")]
    return (f"| {name} | `{options or '(defaults)'}` | {manifest['epochs_trained']} | "
            f"{manifest['metrics']['test_loss']:.0f} | {cells[0]} | {cells[1]} | "
            f"{photos['label_agreement']:.3f} ({photos['label_agreement_pixel_l2']:.3f}) | "
            f"{int((run_dir / 'trained').read_text()) / 60:.1f} min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("recipes", nargs="+", help='NAME="vae-train options"')
    parser.add_argument("--queries", type=int, default=250)
    args = parser.parse_args()
    print("| recipe | options | epochs | held-out loss | N(0, I): of bound, distinct "
          "| uniform: of bound, distinct | photos: label agreement (raw pixels) | training |")
    print("|---|---|---|---|---|---|---|---|")
    for recipe in args.recipes:
        name, _, options = recipe.partition("=")
        print(recipe_line(args.csv, args.out, name, options, args.queries), flush=True)


if __name__ == "__main__":
    main()
