"""The runtime: decode z, encode images, and find the catalog items most likely to give z.

Only numpy, onnxruntime and the standard library are imported here (no torch, no onnx).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np

from .bundle import (
    IMAGE_RANGE,
    Bundle,
    BundleError,
    CatalogIndex,
    default_bundle_path,
    graph_sections,
)
from .checks import (
    MAX_THREADS,
    check_images,
    check_k,
    check_latent,
    check_mode,
    find_label,
    is_integer,
)
from .graphs import Graph
from .images import read_image, webp_size
from .manifest import ManifestShape
from .search import LikelihoodSearch, Matches
from .wasserstein import WassersteinSearch

ROUNDTRIP_CHUNK = 16  # rows per decode-and-encode in a round trip (Runtime._roundtrip)


def sample_prior(latent_dim: int, n: int | None = None, seed: int | None = None) -> np.ndarray:
    """z ~ N(0, I): (latent_dim,) when n is None, else (n, latent_dim)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(latent_dim if n is None else (n, latent_dim))


def checked_thumbnail(index, manifest: dict, row: int) -> bytes | None:
    """index.thumbnail(row) once its WebP header shows the manifest's thumbnail size
    (Runtime.thumbnail); BundleError otherwise."""
    data = index.thumbnail(row)
    if data is None:
        return None
    expected = tuple(manifest["thumbnails"]["size"])
    where = f"thumbnails.bin: item {index.ids[row][:80]!r}"
    try:
        size = webp_size(data)
    except ValueError as exc:
        raise BundleError(f"{where}: {exc}") from None
    if size != expected:
        raise BundleError(f"{where}: picture is {size[0]}x{size[1]}, the manifest's "
                          f"thumbnails are {expected[0]}x{expected[1]}")
    return data


def encoder_of(bundle: Bundle, threads: int = 1):
    """The bundle's encoder alone, as Runtime.encode runs it: images -> (mu, log_sigma)
    float32 (B, d). For vae-run add, which encodes new items and searches nothing: the graph
    is the one read (and checked) with the bundle, whatever happened to the file since."""
    spec = graph_sections(bundle.latent_dim, bundle.image_shape)["encoder"]
    graph = Graph.load(bundle.root, spec, threads, bundle.graphs[spec["file"]])

    def encode(images) -> tuple[np.ndarray, np.ndarray]:
        batch, _ = check_images(images, bundle.image_shape, IMAGE_RANGE)
        mu, log_var = graph.run(batch)
        return mu, 0.5 * log_var

    return encode


class Runtime(ManifestShape):
    """A loaded bundle: ONNX sessions, the float16 catalog index and its search engine.

    Thread safety: decode, encode and nearest only read shared state (onnxruntime's
    InferenceSession.run is thread-safe), so one Runtime may serve many threads; the one
    thing built on first use, the W2 engine, is built under a lock.
    """

    def __init__(self, root: Path, manifest: dict, index: CatalogIndex, encoder, decoder,
                 threads: int = 1):
        self.root = root
        self.manifest = manifest
        self.index = index
        self._encoder = encoder
        self._threads = threads
        self._decoder = decoder
        self._search = LikelihoodSearch(index.mu, index.log_sigma, index.ids, index.labels)
        # Designs and photos: ranked by a distance between posteriors that does not reward
        # an item for a broad one (docs/matching.md). Its item vectors are built by the first
        # query that needs them, so that a kiosk nobody uses holds one engine's.
        self._look: WassersteinSearch | None = None
        self._look_lock = threading.Lock()

    def wasserstein(self, temperature: float | None = None) -> WassersteinSearch:
        """The W2 engine over this catalog (nearest by="decoded", nearest_image), built on first
        use with the catalog's own tau^2. temperature: tau^2 when this bundle is a shard of a
        larger catalog (the whole catalog's, runtime/cluster.py); the engine is built again
        when it differs from the one it has."""
        engine = self._look
        if engine is None or (temperature is not None and engine.temperature != temperature):
            with self._look_lock:
                engine = self._look
                if engine is None or (temperature is not None
                                      and engine.temperature != temperature):
                    index = self.index
                    engine = self._look = WassersteinSearch(
                        index.mu, index.log_sigma, index.ids, index.labels, temperature)
        return engine

    @classmethod
    def load(cls, path: str | Path | None = None, *, threads: int = 1, verify: bool = True,
             limit_blas: bool = False):
        """Load a bundle directory (None: the shipped default model).

        verify=True checks every file's size and sha256 against the manifest first.
        threads: onnxruntime intra-op threads, 1..MAX_THREADS; 1 suits a kiosk whose CPU is
        shared.
        limit_blas=True also caps numpy's BLAS thread pool at `threads`, for the whole process
        (so it is off unless asked: an app that embeds the runtime keeps its threads). The
        search is one small matrix product per query, and a multi-threaded BLAS on a busy
        small CPU spends far longer waking and syncing threads than computing (measured:
        11.7 ms instead of 0.4 ms per query); `vae-run` asks for it.
        """
        root = default_bundle_path() if path is None else Path(path)
        if not is_integer(threads) or not 1 <= threads <= MAX_THREADS:
            raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")
        threads = int(threads)
        if limit_blas:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=threads, user_api="blas")
        bundle = Bundle.read(root, verify=verify)
        sections = graph_sections(bundle.latent_dim, bundle.image_shape)
        encoder, decoder = (Graph.load(root, sections[role], threads)
                            for role in ("encoder", "decoder"))
        return cls(root, bundle.manifest, bundle.index, encoder, decoder, threads=threads)

    @property
    def threads(self) -> int:
        """onnxruntime's intra-op threads per session (Runtime.load(threads=))."""
        return self._threads

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.index.label_names

    def decode(self, z) -> np.ndarray:
        """z (d,) or (B, d) -> float32 images (C, H, W) or (B, C, H, W) in [0, 1]."""
        array = check_latent(z, self.latent_dim)
        images = self._decode(array.reshape(-1, self.latent_dim))
        return images[0] if array.ndim == 1 else images

    def encode(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Images -> (mu, log_sigma) float32, each (d,) for one image or (B, d)."""
        batch, single = check_images(images, self.image_shape, IMAGE_RANGE)
        mu, log_sigma = self._encode(batch)
        return (mu[0], log_sigma[0]) if single else (mu, log_sigma)

    def _decode(self, z: np.ndarray) -> np.ndarray:
        """Validated z (B, d) -> images (B, C, H, W) float32 in [0, 1], ready for _encode."""
        (images,) = self._decoder.run(z.astype(np.float32))
        # A float32 sigmoid can round to just outside [0, 1] (-1.2e-7 with armhf's onnxruntime);
        # encode() refuses such images, and the documented range is [0, 1].
        return np.clip(images, 0.0, 1.0, out=images)

    def _encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Validated float32 images (B, C, H, W) -> mu, log_sigma (B, d)."""
        mu, log_var = self._encoder.run(images)
        return mu, 0.5 * log_var

    def nearest(self, z, k: int = 5, label: int | str | None = None,
                by: str = "latent", with_distance: bool = False) -> Matches:
        """The k catalog items most like the garment z, best first, ranked one of two ways:

        by="latent": log q(z|x), how likely each item's posterior makes z itself.
        by="decoded": the garment decode(z) is encoded again to its posterior N(m, s^2), and
        items are ranked by -W2^2 / (2 tau^2) = -(|m - mu|^2 + |s - sigma|^2) / (2 tau^2),
        the squared 2-Wasserstein distance to each item's posterior (tau^2: the catalog's median
        sigma^2, the scale of the probabilities), as photos are (nearest_image). Far
        from the catalog, where log q(z|x) favours the broadest posteriors whatever they
        look like, this ranks by what the shopper sees (docs/matching.md).

        k larger than the catalog (or than the label's items) returns them all.
        label: a class name ("Sneaker") or id (7): only items of that class are returned;
        probabilities stay the softmax of the scores over the whole catalog.
        Matches.log_likelihoods holds each mode's score.
        Matches.distances holds |z - mu(decode(z))| per query (see roundtrip_distance) for
        by="decoded", which computes that round trip anyway, and for by="latent" only with
        with_distance=True: there it costs a decode and an encode, more than the search.
        """
        array = check_latent(z, self.latent_dim)
        k = check_k(k)
        check_mode(by, with_distance)
        label_id = None if label is None else self._label_filter(label)
        roundtrip = self._roundtrip(array) if by != "latent" or with_distance else None
        return self._ranked(array, roundtrip, k, label_id, by)

    def view(self, z, k: int = 5, label: int | str | None = None,
             by: str = "latent") -> tuple[np.ndarray, Matches]:
        """What a kiosk shows for one z (d,): the garment decode(z), (C, H, W), and
        nearest(z, k, label, by, with_distance=True), with z checked once and decoded once
        (the round trip encodes the garment shown)."""
        array = check_latent(z, self.latent_dim, one=True)
        k = check_k(k)
        check_mode(by, True)
        label_id = self._label_filter(label)
        images = self._decode(array[None])
        mu, log_sigma = self._encode(images)
        roundtrip = mu[0], log_sigma[0], np.linalg.norm(array - mu[0])
        return images[0], self._ranked(array, roundtrip, k, label_id, by)

    def _ranked(self, z: np.ndarray, roundtrip, k: int, label_id: int | None,
                by: str) -> Matches:
        """nearest's ranking of validated z, given its round trip (mu, log_sigma, distance)
        or None (by latent without the distance)."""
        if by == "latent":
            matches = self._search.search(z, k, label_id)
        else:
            mu, log_sigma, _ = roundtrip
            matches = self.wasserstein().search_gaussian(mu.astype(np.float64),
                                                         log_sigma.astype(np.float64), k,
                                                         label_id)
        # The engine's fields and Runtime's, in one new Matches: dataclasses.replace would
        # cost each query several microseconds more.
        return Matches(rows=matches.rows, ids=matches.ids, labels=matches.labels,
                       log_likelihoods=matches.log_likelihoods,
                       probabilities=matches.probabilities,
                       distances=None if roundtrip is None else roundtrip[2],
                       metadata=self._metadata(matches.rows))

    def _metadata(self, rows: np.ndarray) -> tuple:
        """The items' metadata dicts, shaped like rows: (k,) or (B, k) as nested tuples."""
        if rows.ndim == 2:
            return tuple(self._metadata(row) for row in rows)
        if not self.index.columns:  # the shipped bundle: ids only
            return tuple([{} for _ in range(rows.size)])
        return tuple(self.index.item_metadata(int(row)) for row in rows)

    def roundtrip_distance(self, z) -> np.ndarray:
        """|z - mu(decode(z))|: how far the encoder puts the decoded garment from z.

        Small where the decoder learnt from catalog items (z next to an item's mu, or
        typical z ~ N(0, I)); large where z lies outside the region the catalog covers, so
        that the decoded garment resembles no item closely. float64, () for one z, (B,).
        """
        return self._roundtrip(check_latent(z, self.latent_dim))[2]

    def _roundtrip(self, z: np.ndarray):
        """encode(decode(z)) for validated z: mu, log_sigma and |z - mu| (shaped like z).

        In chunks of ROUNDTRIP_CHUNK rows: the graphs' intermediate images of a whole batch
        would stay resident (a kiosk's start-up sample of 512 z: +10 MB at 64 rows a chunk)."""
        flat = z.reshape(-1, self.latent_dim)
        # The decoder's images go to the encoder as they are: already checked, float32, in range.
        parts = [self._encode(self._decode(flat[lo:lo + ROUNDTRIP_CHUNK]))
                 for lo in range(0, len(flat), ROUNDTRIP_CHUNK)]
        mu = np.concatenate([part[0] for part in parts])
        log_sigma = np.concatenate([part[1] for part in parts])
        if z.ndim == 1:
            mu, log_sigma = mu[0], log_sigma[0]
        return mu, log_sigma, np.linalg.norm(z - mu, axis=-1)

    def nearest_image(self, images, k: int = 5, label: int | str | None = None) -> Matches:
        """Catalog items ranked by -W2^2 / (2 tau^2) between the posterior of query image(s)
        x_q and each item's, as nearest(by="decoded") ranks a garment.

        images as for encode(). `log_likelihoods` holds these scores and `probabilities`
        their softmax over the catalog.
        """
        k = check_k(k)
        label_id = self._label_filter(label)
        mu, log_sigma = self.encode(images)
        matches = self.wasserstein().search_gaussian(mu.astype(np.float64),
                                                     log_sigma.astype(np.float64), k, label_id)
        return replace(matches, metadata=self._metadata(matches.rows))

    def read_photo(self, path: str | Path) -> np.ndarray:
        """A photo file of any size and colour fitted as training fits catalog photos:
        uint8 (C, H, W) of this bundle's image shape, ready for encode and nearest_image."""
        channels, size, _ = self.image_shape
        return read_image(path, size, channels)

    def thumbnail(self, row: int) -> bytes | None:
        """The item's catalog photo (WebP bytes) once its header shows a picture of the
        manifest's thumbnail size, or None in a bundle without thumbnails. Checked before any
        use, since the sha256s only prove that the files match a manifest anyone can rewrite:
        a 10 KB WebP claiming 16383x16383 pixels would take gigabytes to draw."""
        return checked_thumbnail(self.index, self.manifest, row)

    def _label_filter(self, label) -> int | None:
        label_id = self.label_id(label)
        if label_id is not None and self._search.label_count(label_id) == 0:
            raise ValueError(f"no catalog item has label {self.label_names[label_id]!r}")
        return label_id

    def label_id(self, label: int | str | None) -> int | None:
        """A class name or id -> class id (None stays None); ValueError names the valid ones."""
        return find_label(self.label_names, label)

    def sample_prior(self, n: int | None = None, seed: int | None = None) -> np.ndarray:
        """z ~ N(0, I): (d,) when n is None, else (n, d)."""
        return sample_prior(self.latent_dim, n, seed)

    def describe(self) -> dict:
        """A summary of the bundle for `vae-run info`."""
        m = self.manifest
        return {
            "bundle": str(self.root),
            "format_version": m["format_version"],
            "latent_dim": self.latent_dim,
            "image_shape": list(self.image_shape),
            "catalog": m["index"].get("catalog", "unknown"),
            "catalog_size": len(self.index),
            "label_names": list(self.label_names),
            "metadata_columns": list(self.index.columns),
            "thumbnails": m["thumbnails"] is not None,
            "index_bytes": int(self.index.mu.nbytes + self.index.log_sigma.nbytes),
            "test_metrics": m.get("metrics", {}),
            "parity_max_abs_diff": m.get("parity", {}).get("max_abs_diff"),
            "log_2pi_constant_included": True,
            "created": m.get("created"),
        }

