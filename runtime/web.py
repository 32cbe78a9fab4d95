"""`vae-run export-web`: the kiosk as a static folder that runs without a server.

The folder holds the kiosk page (the same files `vae-run serve` serves), the bundle's two
graphs and float16 index, the items, their thumbnails, and onnxruntime-web's WASM build. The
page's first request, api/info, is a file there: the kiosk's info, and the files for the
in-page engine (engine.js), which then answers decode, nearest and the rest itself: the
graphs in onnxruntime-web, the ranking exact in float64. The page checks every file the
engine reads against the size and sha256 listed there (for the bundle's files, the bundle
manifest's own). A service worker (sw.js) caches the whole folder on the first load.

onnxruntime-web is vendored (runtime/vendor/onnxruntime-web) so that the package installs,
exports and is tested offline; the files are pinned here by sha256 (docs/kiosk.md says how
to renew them). Only what the page uses is kept: the WASM build (which runs on one thread
without cross-origin isolation) and the module that loads it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from .atomic import atomic_directory
from .bundle import INDEX_FILES, MODEL_FILES, THUMBNAIL_FILES, BundleError, sha256_file
from .core import Runtime
from .kiosk_app import DEFAULT_IDLE_RESET_S, DEFAULT_K, DEFAULT_RANGE, KioskApp
from .kiosk_http import STATIC_DIR

ORT_VERSION = "1.31.1"
ORT_DIR = Path(__file__).resolve().parent / "vendor" / "onnxruntime-web"
# `npm pack onnxruntime-web@1.31.1`, package/dist/; the licence and notices from the
# onnxruntime project (MIT).
ORT_FILES = {
    "ort.wasm.bundle.min.mjs": "51bd7168175767324ab0acfcfc4ca94a096a3826e3ebac9ccc4f195eb865f8dd",
    "ort-wasm-simd-threaded.wasm":
        "4b884c203b0fa48d057be3332c65513ff85aa3c5bddd6946acc0fab7ecda001d",
    "LICENSE": "2f07c72751aed99790b8a4869cf2311df85a860b22ded05fa22803587a48922c",
    "ThirdPartyNotices.txt": "d8696258afcf9df7827a5e01d6b6d55ee9b461b4e82020f5f48242deb9cc2270",
}
PAGE_FILES = ("app.js", "engine.js", "qrcode.js", "style.css", "icon.svg",
              "manifest.webmanifest")
# Files sent as byte planes (_write_planes): the graphs' float32 weights, the float16 index.
PLANES = {"encoder": 4, "decoder": 4, "mu": 2, "log_sigma": 2}
SITE_FORMAT = "vae-edge-site"
# The page's first question to a kiosk server, answered here by a file: the kiosk's info, and
# in "site" the files the in-page engine loads, their sizes and sha256.
INFO_FILE = "api/info"
SITE_VERSION_LINE = 'const VERSION = "unversioned";'


def _copy_checked(source: Path, target: Path, sha256: str, what: str) -> dict:
    """Copy source to target, then check the copy's sha256: {"bytes", "sha256"}."""
    shutil.copyfile(source, target)
    digest = sha256_file(target)
    if digest != sha256:
        raise BundleError(f"{what}: sha256 {digest[:12]}..., expected {sha256[:12]}...")
    return {"bytes": target.stat().st_size, "sha256": digest}


def _write_planes(source: Path, target: Path, sha256: str, planes: int, what: str) -> dict:
    """Write source's bytes as `planes` byte planes (byte j of every planes-byte word, then
    byte j + 1, ...; zero-padded to whole words), after checking their sha256: gzipped, the
    shipped graphs' float32 weights come out 8% smaller so and the float16 index 7 to 14%,
    since their sign and exponent bytes repeat. The page puts the bytes back in order, then
    checks size and sha256 of the original: {"bytes", "sha256", "planes"}."""
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise BundleError(f"{what}: sha256 {digest[:12]}..., expected {sha256[:12]}...")
    words = -(-len(data) // planes)
    padded = np.zeros(words * planes, dtype=np.uint8)
    padded[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    target.write_bytes(padded.reshape(words, planes).T.tobytes())
    return {"bytes": len(data), "sha256": digest, "planes": planes}


def _write(target: Path, data: bytes) -> dict:
    target.write_bytes(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def export_site(runtime: Runtime, out_dir: str | Path, *, z_range: float = DEFAULT_RANGE,
                k: int = DEFAULT_K, idle_reset: float = DEFAULT_IDLE_RESET_S,
                attract: float = 0, force: bool = False) -> dict:
    """Write the static kiosk site of a loaded bundle to out_dir (atomically: the folder
    appears complete or not at all). The kiosk options are `vae-run serve`'s.

    Raises FileExistsError where out_dir exists and force is False, ValueError for bad kiosk
    options and for an out_dir that is or holds the bundle, BundleError where a bundle or
    vendored file no longer matches its hash.
    Returns {"files": count, "bytes": total, "gzip_bytes": total gzipped}.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not force:
        raise FileExistsError(f"{out_dir} exists: pass --force to replace it")
    bundle = runtime.root.resolve()
    if out_dir.resolve() == bundle or out_dir.resolve() in bundle.parents:
        raise ValueError(f"{out_dir} holds the bundle {runtime.root}: expected a folder "
                         "outside it, since the site replaces the whole folder")
    app = KioskApp(runtime, z_range=z_range, k=k, idle_reset=idle_reset, attract=attract)
    with atomic_directory(out_dir) as root:
        written, names, verify = _write_page_and_bundle(root, runtime)
        site_id = hashlib.sha256("".join(
            f"{name}\0{spec['sha256']}\n" for name, spec in sorted(written.items())).encode()
        ).hexdigest()[:16]
        worker = (STATIC_DIR / "sw.js").read_text(encoding="utf-8")
        if SITE_VERSION_LINE not in worker:
            raise BundleError(f"sw.js: expected the line {SITE_VERSION_LINE!r} to stamp")
        written["sw.js"] = _write(root / "sw.js", worker.replace(
            SITE_VERSION_LINE, f'const VERSION = "{site_id}";').encode("utf-8"))
        # wasserstein_tau2: the scale of the W2 ranking (designs, photos), so that the page's
        # scores and p are the runtime's (WassersteinSearch.temperature).
        site = {"format": SITE_FORMAT, "version": site_id, "onnxruntime_web": ORT_VERSION,
                "files": names, "verify": verify,
                "wasserstein_tau2": runtime.wasserstein().temperature,
                "cache": sorted(name for name in written if name != "sw.js")}
        (root / "api").mkdir()
        written[INFO_FILE] = _write(root / INFO_FILE, json.dumps(
            {**app.info(), "site": site}, indent=1).encode("utf-8"))
        stored = [(root / name).read_bytes() for name in written]
        summary = {"files": len(stored), "bytes": sum(len(data) for data in stored),
                   "gzip_bytes": sum(len(gzip.compress(data, compresslevel=6))
                                     for data in stored)}
    return summary


def _write_page_and_bundle(root: Path, runtime: Runtime):
    """The page, onnxruntime-web and the bundle's files under root, each checked against its
    pinned or manifest hash: what was written ({name: size and sha256}), the names the page
    loads by role, and the files the page checks itself."""
    manifest = runtime.manifest
    bundle_files = {"encoder": MODEL_FILES["encoder"], "decoder": MODEL_FILES["decoder"],
                    **INDEX_FILES}
    if manifest.get("thumbnails") is not None:
        bundle_files.update(thumbnails=THUMBNAIL_FILES["images"],
                            thumbnail_offsets=THUMBNAIL_FILES["offsets"])
    index = runtime.index
    items = {"ids": index.ids.tolist(), "columns": list(index.columns),
             "metadata": [values.tolist() for values in index.metadata]}
    (root / "static" / "ort").mkdir(parents=True)
    (root / "bundle").mkdir()
    written = {"index.html": _write(root / "index.html",
                                    (STATIC_DIR / "index.html").read_bytes())}
    for name in PAGE_FILES:
        written[f"static/{name}"] = _write(root / "static" / name,
                                           (STATIC_DIR / name).read_bytes())
    for name, sha256 in ORT_FILES.items():
        written[f"static/ort/{name}"] = _copy_checked(
            ORT_DIR / name, root / "static" / "ort" / name, sha256,
            f"vendored onnxruntime-web file {name}")
    names = {"ort_module": "static/ort/ort.wasm.bundle.min.mjs",
             "ort_wasm": "static/ort/ort-wasm-simd-threaded.wasm"}
    verify = {names["ort_wasm"]: written[names["ort_wasm"]]}
    for role, name in bundle_files.items():
        sha256 = manifest["files"][name]["sha256"]
        planes = PLANES.get(role)
        names[role] = f"bundle/{name}" + (f".planes{planes}" if planes else "")
        what = f"bundle file {name}"
        target = root / names[role]
        verify[names[role]] = written[names[role]] = _copy_checked(
            runtime.root / name, target, sha256, what) if planes is None else \
            _write_planes(runtime.root / name, target, sha256, planes, what)
    names["items"] = "bundle/items.json"
    verify[names["items"]] = written[names["items"]] = _write(
        root / names["items"], json.dumps(items, separators=(",", ":")).encode("utf-8"))
    return written, names, verify
