"""The kiosk's API, independent of HTTP: what each route of `vae-run serve` answers.

KioskApp takes parsed values (z as an array, k as an int) and returns JSON-ready dicts or
picture bytes; runtime/kiosk_http.py turns requests into these calls and runtime/server.py
serves them. docs/kiosk.md documents the routes.
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
from http import HTTPStatus
from urllib.parse import quote

import numpy as np

from .bundle import BundleError
from .checks import MATCH_MODES, check_k, is_number
from .core import Runtime
from .images import png_bytes
from .search import match_records

DEFAULT_HOST = "127.0.0.1"  # reachable from this machine only
DEFAULT_PORT = 8000
DEFAULT_RANGE = 3.0
MAX_RANGE = 100
DEFAULT_K = 6
DEFAULT_IDLE_RESET_S = 90  # a shopper who walks away leaves the next one a fresh page
MAX_IDLE_RESET_S = 24 * 3600
MAX_ATTRACT_S = 3600
MAX_K = 100  # a results list longer than this is a scraper, not a kiosk
FAR_SAMPLES = 256  # p99 3.82 on the shipped model, as from 512 (4,096: 3.90); start-up stays short
FAR_QUANTILE = 0.99
ITEM_IMAGE_CACHE = 4096


class ApiError(Exception):
    """An HTTP error other than 400 (not found, wrong method, too large)."""

    def __init__(self, status: HTTPStatus, message: str, close: bool = False):
        super().__init__(message)
        self.status = status
        self.close = close


def check_seconds(value, name: str, maximum: float, zero_means: str) -> float:
    if not is_number(value) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be a number of seconds in [0, {maximum}] "
                         f"(0: {zero_means}), got {value!r}")
    return float(value)


def check_server_k(k) -> int:
    k = check_k(k)
    if k > MAX_K:
        raise ValueError(f"k must be <= {MAX_K}, got {k}")
    return k


def png_data_url(image: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


class KioskApp:
    """The API over one Runtime, independent of HTTP: each method takes parsed values.

    Every method only reads the Runtime and this object's immutable tables, so one
    KioskApp serves all of the server's threads (the item picture cache is lru_cache,
    which is thread-safe).
    """

    def __init__(self, runtime: Runtime, *, z_range: float = DEFAULT_RANGE, k: int = DEFAULT_K,
                 idle_reset: float = DEFAULT_IDLE_RESET_S, attract: float = 0):
        if not is_number(z_range) or not 0 < z_range <= MAX_RANGE:
            raise ValueError(f"range must be a number in (0, {MAX_RANGE:g}], got {z_range!r}")
        self.runtime = runtime
        self.z_range = float(z_range)
        self.k = check_server_k(k)
        self.idle_reset = check_seconds(idle_reset, "idle reset", MAX_IDLE_RESET_S, "never")
        self.attract = check_seconds(attract, "attract", MAX_ATTRACT_S, "off")
        # The page opens on a real garment, the catalog's first item, not on z = 0 (which
        # decodes to a blur of every class).
        self.opening_z = runtime.index.mu[0].astype(np.float64).tolist()
        self.slider_ends = slider_ends(runtime)
        # A garment is "far from the catalog" when its round-trip distance exceeds what 99%
        # of typical garments (z ~ N(0, I), a fixed sample) show: docs/matching.md.
        typical = runtime.roundtrip_distance(runtime.sample_prior(FAR_SAMPLES, seed=0))
        self.far_distance = float(np.quantile(typical, FAR_QUANTILE))
        # The rows in id order, for a binary search over the bundle's own id strings (a dict,
        # or the ids sorted, would hold a second copy of every id for an idle kiosk).
        self._id_rows = np.argsort(runtime.index.ids, kind="stable").astype(np.int32)
        self.item_png = functools.lru_cache(maxsize=ITEM_IMAGE_CACHE)(self._item_png)
        # Part of every picture's URL: a browser may keep a picture for an hour, and an item
        # removed and added again with a new photo (vae-run remove, add, a restart) keeps its id.
        files = runtime.manifest["files"]
        self.image_version = hashlib.sha256("".join(
            f"{name}\0{files[name]['sha256']}\n" for name in sorted(files)).encode()
        ).hexdigest()[:16]

    def info(self) -> dict:
        rt = self.runtime
        return {
            "latent_dim": rt.latent_dim,
            "image_shape": list(rt.image_shape),
            "label_names": list(rt.label_names),
            "catalog": rt.manifest["index"].get("catalog", "unknown"),
            "catalog_size": len(rt.index),
            "range": self.z_range,
            "k": self.k,
            "max_k": MAX_K,
            "match_modes": list(MATCH_MODES),
            "far_distance": self.far_distance,
            "metadata_columns": list(rt.index.columns),
            "thumbnails": rt.index.thumbnail_offsets is not None,
            "idle_reset": self.idle_reset,
            "attract": self.attract,
            "opening_z": self.opening_z,
            "slider_ends": self.slider_ends,
        }

    def sample(self, seed: int | None) -> dict:
        if seed is not None and not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        z = self.runtime.sample_prior(seed=seed)
        return {"z": z.tolist(), "seed": seed}

    def decode_png(self, z: np.ndarray) -> bytes:
        return png_bytes(self.runtime.decode(z))

    def decode(self, z: np.ndarray) -> dict:
        return {"z": z.tolist(), "image": png_data_url(self.runtime.decode(z))}

    def ends(self, z: np.ndarray) -> dict:
        """For each slider, the garment with that slider at -range and at +range, the other
        values kept from z: one decode of 2d rows, so a page can show what every slider does."""
        d = self.runtime.latent_dim
        grid = np.repeat(z[None, :], 2 * d, axis=0)
        dims = np.arange(d)
        grid[2 * dims, dims] = -self.z_range
        grid[2 * dims + 1, dims] = self.z_range
        urls = [png_data_url(image) for image in self.runtime.decode(grid)]
        return {"z": z.tolist(), "range": self.z_range,
                "ends": [urls[2 * i:2 * i + 2] for i in range(d)]}

    def nearest(self, z: np.ndarray, k: int, by: str = "latent") -> dict:
        matches = self.runtime.nearest(z, k=check_server_k(k), by=by, with_distance=True)
        return self._nearest_answer(z, by, matches)

    def _nearest_answer(self, z: np.ndarray, by: str, matches) -> dict:
        # rank, id, then row: the documented order (a key repeated by **record keeps its place)
        results = [{"rank": record["rank"], "id": record["id"], "row": int(row), **record,
                    "image": item_image_url(record["id"], self.image_version)}
                   for record, row in zip(match_records(matches, self.runtime.label_names),
                                          matches.rows)]
        distance = float(matches.distances)
        return {"z": z.tolist(), "by": by, "k": len(results), "distance": distance,
                "far": distance > self.far_distance, "results": results}

    def view(self, z: np.ndarray, k: int, by: str = "latent") -> dict:
        """What one page update shows: the garment z and the k items most like it, z decoded
        once (Runtime.view)."""
        image, matches = self.runtime.view(z, k=check_server_k(k), by=by)
        return {"decoded": {"z": z.tolist(), "image": png_data_url(image)},
                "nearest": self._nearest_answer(z, by, matches)}

    def row_of(self, item_id: str) -> int:
        ids = self.runtime.index.ids
        position = bisect.bisect_left(self._id_rows, item_id, key=lambda row: ids[row])
        if position < len(self._id_rows) and ids[self._id_rows[position]] == item_id:
            return int(self._id_rows[position])
        raise ApiError(HTTPStatus.NOT_FOUND, f"no catalog item with id {item_id[:80]!r}")

    def item(self, item_id: str) -> dict:
        row = self.row_of(item_id)
        index = self.runtime.index
        label = int(index.labels[row])
        return {"id": item_id, "row": row, "label": self.runtime.label_names[label],
                "label_id": label, "metadata": index.item_metadata(row),
                "mu": index.mu[row].astype(np.float64).tolist(),
                "log_sigma": index.log_sigma[row].astype(np.float64).tolist(),
                "image": item_image_url(item_id, self.image_version)}

    def item_image(self, item_id: str) -> tuple[bytes, str]:
        """The item's picture and its content type: the catalog photo's thumbnail, or where
        the bundle has none, the decoder's view of mu."""
        row = self.row_of(item_id)
        try:
            photo = self.runtime.thumbnail(row)
        except BundleError as exc:  # the bundle's fault, not the request's
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, str(exc)) from None
        if photo is not None:
            return photo, "image/webp"
        return self.item_png(row), "image/png"

    def _item_png(self, row: int) -> bytes:
        return png_bytes(self.runtime.decode(self.runtime.index.mu[row].astype(np.float64)))


def item_image_url(item_id: str, version: str) -> str:
    """The item's picture: `v` names the bundle's contents, so a cached picture of an
    earlier bundle is never shown for an item of this one."""
    return f"/api/item/{quote(str(item_id), safe='')}/image?v={version}"


def slider_ends(runtime: Runtime) -> list[list[str]]:
    """For each latent dim, the catalog classes whose items lie lowest and highest along it on
    average: words for the two ends of a slider ("Sandal" to "Coat"). A catalog with one
    class or none names no ends ("")."""
    index = runtime.index
    names = runtime.label_names
    present = np.unique(index.labels)
    if len(present) < 2:
        return [["", ""] for _ in range(runtime.latent_dim)]
    means = np.stack([index.mu[index.labels == label].mean(axis=0, dtype=np.float64)
                      for label in present])
    low, high = present[means.argmin(axis=0)], present[means.argmax(axis=0)]
    return [[names[a], names[b]] for a, b in zip(low, high)]


