"""`vae-run add`, `vae-run remove` and `vae-export` of this tree, side by side with another
checkout of vae-edge (--base), in one run on the same inputs:

    mkdir /tmp/vae-edge-base && git archive <commit> | tar -x -C /tmp/vae-edge-base
    python benchmarks/bundle_edit.py --base /tmp/vae-edge-base [--rounds 5] [--add-items 100]
        [--export-limit 20000] [--commands add remove export]

Each round, for each tree in turn (the order alternating between rounds), on a fresh copy of
the shipped bundle (60,000 Fashion-MNIST items, read by both trees): `add` of --add-items
Fashion-MNIST test images as PNG files under new ids, then `remove` of those ids, then
`vae-export` of a tiny model (trained here, 1 epoch) indexing --export-limit training images.
Each command runs in a fresh process (`python -m` of the tree's CLI module, its package first
on PYTHONPATH), so the times are what a shell sees, start-up and imports included. Prints the
median wall time of each command per tree (`remove` needs `add` before it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CLIS = {"add": "vae_edge.runtime.cli", "remove": "vae_edge.runtime.cli",
        "export": "vae_edge.export.cli"}


def tree_path(work: Path, name: str, source: Path) -> Path:
    """A directory whose vae_edge is the checkout at source."""
    root = work / "trees" / name
    root.mkdir(parents=True)
    (root / "vae_edge").symlink_to(source.resolve(), target_is_directory=True)
    return root


def run(tree: Path, module: str, args: list, env: dict) -> float:
    code = f"import sys, {module} as m; sys.argv[0] = 'bench'; m.main()"
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                            text=True, env={**env, "PYTHONPATH": str(tree)})
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{tree.name} {module} {args}: {result.stdout}{result.stderr}")
    return elapsed


def photos_csv(work: Path, count: int, data_dir) -> tuple[Path, list[str]]:
    from PIL import Image

    from vae_edge.training.data import CLASS_NAMES, load_split

    split = load_split("test", data_dir)
    rows, ids = ["id,image,label"], []
    for i in range(count):
        Image.fromarray(split.images[i]).save(work / f"new-{i}.png")
        ids.append(f"new-{i}")
        rows.append(f"new-{i},new-{i}.png,{CLASS_NAMES[split.labels[i]]}")
    (work / "new.csv").write_text("\n".join(rows) + "\n")
    return work / "new.csv", ids


def tiny_checkpoint(work: Path, data_dir) -> Path:
    from vae_edge.training.model import VAEConfig
    from vae_edge.training.train import TrainConfig, train

    train(VAEConfig(latent_dim=8, channels=(8, 16), hidden_dim=32),
          TrainConfig(epochs=1, batch_size=64, subset=2000, test_subset=500, seed=0),
          work / "run", data_dir=data_dir, progress=False, log=lambda message: None)
    return work / "run" / "checkpoint.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the other vae-edge checkout")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--add-items", type=int, default=100)
    parser.add_argument("--export-limit", type=int, default=20000)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--commands", nargs="+", choices=list(CLIS), default=list(CLIS))
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trees = {"base": tree_path(work, "base", args.base), "this": tree_path(work, "this", HERE)}
        csv_path, ids = photos_csv(work, args.add_items, args.data_dir)
        checkpoint = tiny_checkpoint(work, args.data_dir)
        export_args = [checkpoint, "--catalog", "train", "--limit", args.export_limit,
                       "--force"] + (["--data-dir", args.data_dir] if args.data_dir else [])
        times = {(name, command): [] for name in trees for command in CLIS}
        for round_ in range(args.rounds):
            for name in (list(trees) if round_ % 2 == 0 else list(trees)[::-1]):
                tree = trees[name]
                bundle = work / f"{name}-bundle"
                shutil.rmtree(bundle, ignore_errors=True)
                shutil.copytree(tree / "vae_edge" / "models" / "default", bundle)
                for command, extra in (("add", ["--bundle", bundle, csv_path]),
                                       ("remove", ["--bundle", bundle, *ids]),
                                       ("export", [*export_args, "-o", work / f"{name}-x"])):
                    if command not in args.commands:
                        continue
                    times[name, command].append(
                        run(tree, CLIS[command], [command] * (command != "export") + extra, env))
        print(f"{'command':<8} {'base (s)':>9} {'this (s)':>9}   median of {args.rounds}")
        for command in args.commands:
            base, this = (statistics.median(times[name, command]) for name in trees)
            print(f"{command:<8} {base:9.2f} {this:9.2f}")


if __name__ == "__main__":
    main()
