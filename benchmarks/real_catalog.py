"""Build a heterogeneous catalog CSV of real pictures from image collections installed here.

Image collections that nobody on this project made, each with its own categories as the label
(`--collections`, default emoji,adwaita):

- Twitter's emoji (npm `emoji-datasource-twitter`): about 1,900 colour pictures, 64x64 PNG on
  transparent backgrounds (faces, people, animals, food, vehicles, objects, symbols, flags),
  labelled by the emoji category ("Food & Drink", ...); skin-tone variants left out.
- GNOME's Adwaita icon theme (Debian `adwaita-icon-theme`): about 1,000 icons, mostly thin grey
  line art on transparent backgrounds, each icon once at one of its sizes (8 to 512 pixels,
  chosen by a hash of its name), labelled "icon <folder>" ("icon devices", ...).
- KDE's Oxygen and the Tango Desktop Project's icon themes (Debian `oxygen-icon-theme`,
  `tango-icon-theme`), a second catalog of another look: shaded, colourful icons, chosen and
  labelled the same way ("oxygen devices", "tango places", ...).

The photos stay where the packages installed them: the CSV names them by absolute path. This
script installs nothing; it says what to install when a collection is missing:

    apt-get install adwaita-icon-theme oxygen-icon-theme tango-icon-theme
    npm install --prefix ~/.cache/vae-edge-real emoji-datasource-twitter@16.0.0

    python benchmarks/real_catalog.py runs/real            # -> runs/real/catalog.csv
    python benchmarks/real_catalog.py runs/real-small --per-label 12   # a small subset
    python benchmarks/real_catalog.py runs/real2 --collections oxygen,tango --per-label 200
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from pathlib import Path

ICON_THEMES = {  # collection -> (theme folder holding SIZExSIZE/FOLDER/NAME.png, Debian package)
    "adwaita": (Path("/usr/share/icons/Adwaita"), "adwaita-icon-theme"),
    "oxygen": (Path("/usr/share/icons/oxygen/base"), "oxygen-icon-theme"),
    "tango": (Path("/usr/share/icons/Tango"), "tango-icon-theme"),
}
COLLECTIONS = ("emoji", *ICON_THEMES)
EMOJI_PACKAGE = "emoji-datasource-twitter"
DEFAULT_NPM_PREFIX = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
    / "vae-edge-real"
ICON_FOLDERS = ("actions", "apps", "categories", "devices", "emblems", "emotes", "legacy",
                "mimetypes", "places", "status")  # not ui/ (arrows, window buttons) nor cursors


def _stable_choice(name: str, options: list) -> object:
    return options[int(hashlib.sha256(name.encode()).hexdigest(), 16) % len(options)]


def emoji_rows(package: Path) -> list[dict]:
    data = json.loads((package / "emoji.json").read_text(encoding="utf-8"))
    rows = []
    for emoji in sorted(data, key=lambda e: e["sort_order"]):
        path = package / "img" / "twitter" / "64" / emoji["image"]
        if not emoji.get("has_img_twitter") or emoji["category"] == "Component" \
                or not path.is_file():
            continue
        rows.append({"id": f"emoji-{emoji['unified'].lower()}", "image": str(path),
                     "label": emoji["category"],
                     "name": (emoji["name"] or emoji["short_name"]).title(),
                     "source": "emoji-datasource-twitter"})
    return rows


def icon_rows(collection: str) -> list[dict]:
    theme, package = ICON_THEMES[collection]
    prefix = "icon" if collection == "adwaita" else collection  # the first catalog's ids stay
    sizes: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(theme.glob("*x*/*/*.png")):
        folder = path.parent.name
        if folder in ICON_FOLDERS:
            sizes.setdefault((folder, path.stem), []).append(path)
    rows = []
    for (folder, stem), paths in sorted(sizes.items()):
        rows.append({"id": f"{prefix}-{folder}-{stem}",
                     "image": str(_stable_choice(stem, paths)),
                     "label": f"{prefix} {folder}", "name": stem.replace("-", " "),
                     "source": package})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for catalog.csv")
    parser.add_argument("--npm-prefix", type=Path, default=DEFAULT_NPM_PREFIX,
                        help="where `npm install --prefix` put emoji-datasource-twitter")
    parser.add_argument("--per-label", type=int, default=0,
                        help="keep at most this many items of each label (0: all)")
    parser.add_argument("--collections", default="emoji,adwaita",
                        help=f"comma-separated, of {', '.join(COLLECTIONS)} "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    collections = [name.strip() for name in args.collections.split(",") if name.strip()]
    unknown = [name for name in collections if name not in COLLECTIONS]
    if unknown or not collections:
        print(f"--collections: expected names from {', '.join(COLLECTIONS)}, got "
              f"{args.collections!r}", file=sys.stderr)
        return 2
    package = args.npm_prefix / "node_modules" / EMOJI_PACKAGE
    missing = []
    if "emoji" in collections and not (package / "emoji.json").is_file():
        missing.append(f"npm install --prefix {args.npm_prefix} {EMOJI_PACKAGE}@16.0.0")
    missing += [f"apt-get install {ICON_THEMES[name][1]}" for name in collections
                if name in ICON_THEMES and not any(ICON_THEMES[name][0].glob("*x*/*/*.png"))]
    if missing:
        print("missing image collections; install them with:\n  " + "\n  ".join(missing),
              file=sys.stderr)
        return 2
    rows = [row for name in collections
            for row in (emoji_rows(package) if name == "emoji" else icon_rows(name))]
    if args.per_label > 0:
        by_label: dict[str, list[dict]] = {}
        for row in rows:
            by_label.setdefault(row["label"], []).append(row)
        rows = [row for group in by_label.values() for row in group[:args.per_label]]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "catalog.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["id", "image", "label", "name", "source"])
        writer.writeheader()
        writer.writerows(rows)
    labels = sorted({row["label"] for row in rows})
    print(f"{args.out / 'catalog.csv'}: {len(rows)} items, {len(labels)} labels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
