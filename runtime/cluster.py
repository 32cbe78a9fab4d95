"""A catalog sharded over a Ray cluster, searched exactly (docs/scale.md).

ShardedRuntime puts one shard of a set written by `vae-run shard` into each of N Ray actors
(each a Runtime over its shard) and answers nearest and nearest_image as one Runtime over the
whole catalog answers them: the same ids in the same order, the same float64 scores, the
same metadata, and p(x|z) within the engine's P_TOLERANCE. Every shard returns its own top k
with exact scores and global rows (its offset plus its row), and log S, the log of its sum of
q(z|x); the driver keeps the best k of the shards' lists, ties to the lower global row as the
engine breaks them, and takes the log-sum-exp of the shards' log S as the global normaliser.
Designs (by="decoded") and photos rank by W2 (docs/matching.md) the same way: every shard
scales its scores by the whole catalog's tau^2, the median of all shards' log sigma values
counted together at load (each shard's own median would give each its own scale).
Graph work (decode, the round trip of by="decoded", encoding photos) runs once, on the first
shard's actor, so that every shard ranks the very same query.

A query waits for every shard: an actor that dies is restarted by Ray (max_restarts) and the
query retried (max_task_retries); one that cannot come back raises ShardUnavailable, never a
result without its items.

Needs Ray (pip install "vae-edge[cluster]"); the rest of the runtime never imports it.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from .bundle import IMAGE_RANGE, Bundle, BundleError, CatalogIndex, sha256_file
from .checks import check_images, check_k, check_latent, check_mode, find_label
from .core import Runtime, checked_thumbnail, sample_prior
from .manifest import ManifestShape
from .search import Matches
from .shard import read_shards
from .wasserstein import WassersteinSearch, log_sigma_counts, merge_counts, temperature_of

RESTARTS = 3  # Ray restarts a dead shard actor this often before queries fail
DEFAULT_TIMEOUT_S = 120.0  # a query waits this long for every shard, then fails


class ShardUnavailable(RuntimeError):
    """A shard's actor died and Ray could not bring it back, or did not answer in time."""


class _ShardActor:
    """One shard's Runtime in its own process (wrapped by ray.remote in ShardedRuntime)."""

    def __init__(self, path: str, manifest_sha256: str, offset: int, threads: int):
        self.offset = offset
        # A shard that cannot load is kept as its error, raised by every call: an actor whose
        # constructor raised would be reported as merely dead.
        self.error = self._runtime = None
        try:
            # The node may see another file at this path than the driver did.
            actual = sha256_file(Path(path) / "manifest.json")
            if actual != manifest_sha256:
                raise BundleError(f"{path}: manifest sha256 {actual[:12]}... on this node, "
                                  f"the set lists {manifest_sha256[:12]}...")
            # The actor owns its process, so it caps numpy's BLAS pool as vae-run does.
            self._runtime = Runtime.load(path, threads=threads, limit_blas=True)
        except (ValueError, OSError) as exc:
            self.error = exc

    @property
    def runtime(self) -> Runtime:
        if self.error is not None:
            raise self.error
        return self._runtime

    def describe(self) -> dict:
        index = self.runtime.index
        return {"manifest": self.runtime.manifest, "size": len(index),
                "label_counts": np.bincount(index.labels, minlength=len(index.label_names)),
                "log_sigma_counts": log_sigma_counts(index.log_sigma)}

    def search(self, z: np.ndarray, var: np.ndarray | None, k: int, label: int | None,
               temperature: float | None = None):
        """This shard's top k for queries z (B, d): global rows, ids, labels, exact scores,
        metadata (B, k') and log S (B,); by log q (temperature None) or by W2 with the whole
        catalog's tau^2."""
        engine = self.runtime._search if temperature is None else \
            self.runtime.wasserstein(temperature)
        rows, scores, log_total = engine.partial(z, k, label, var)
        index = self.runtime.index
        return (rows + self.offset, engine.ids[rows],
                index.labels[rows].astype(np.int64), scores, self.runtime._metadata(rows),
                log_total)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return self.runtime.decode(z)

    def roundtrip(self, z: np.ndarray):
        return self.runtime._roundtrip(z)

    def decode_and_encode(self, z: np.ndarray):
        """decode(z) for validated z (1, d) and the encoding of that garment (Runtime.view)."""
        images = self.runtime._decode(z)
        return (images, *self.runtime._encode(images))

    def encode(self, images: np.ndarray):
        return self.runtime.encode(images)

    def pid(self) -> int:
        """The actor's process (memory figures; tests that kill it)."""
        return os.getpid()


@dataclass(frozen=True)
class _Part:
    rows: np.ndarray
    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    metadata: tuple
    log_total: np.ndarray


class ShardedRuntime(ManifestShape):
    """The query side of a Runtime (nearest, nearest_image, decode, roundtrip_distance,
    label_id, sample_prior; index and manifest for the kiosk) over a shard set in Ray actors.

    Thread safety: queries only read; Ray's handles may be used from many threads.
    """

    def __init__(self, shard_set, actors: list, manifest: dict, label_counts: np.ndarray,
                 timeout: float):
        self.shard_set = shard_set
        self.actors = actors  # one Ray actor handle per shard, in shard order
        self.manifest = manifest
        self._label_counts = label_counts
        self._timeout = timeout
        # tau^2 of the W2 ranking (by="decoded", photos): the whole catalog's, from every
        # shard's log sigma values, so that each shard scores as one Runtime would.
        self.temperature = 1.0

    @classmethod
    def load(cls, shards: str | Path, *, address: str | None = None, threads: int = 1,
             actor_options: dict | None = None, timeout: float = DEFAULT_TIMEOUT_S,
             **ray_init):
        """One actor per shard of the set in `shards` (written by vae-run shard, readable at
        the same path on every node), on the Ray cluster this process is connected to; if
        none, ray.init(address=address, **ray_init) connects it first (None: a local Ray).

        threads: onnxruntime threads per actor. actor_options: Ray's .options() for every
        actor (num_cpus, resources, scheduling_strategy, ...); by default each asks one CPU,
        and is restarted up to RESTARTS times with its queries retried. timeout: seconds a
        query waits for all shards before ShardUnavailable.
        Raises FileNotFoundError or BundleError for an incomplete or mixed shard set, and
        ShardUnavailable for a shard that its actor cannot load.
        """
        shard_set = read_shards(shards)
        if not ray.is_initialized():
            ray.init(address=address, **ray_init)
        options = {"num_cpus": 1, "max_restarts": RESTARTS, "max_task_retries": RESTARTS,
                   **(actor_options or {})}
        remote = ray.remote(_ShardActor).options(**options)
        actors = [remote.remote(str(shard.path.resolve()), shard.manifest_sha256, shard.offset,
                                threads) for shard in shard_set.shards]
        runtime = cls(shard_set, actors, {}, np.zeros(0, np.int64), timeout)
        try:
            described = runtime._all("describe")
        except BaseException:
            runtime.close()
            raise
        manifest = dict(described[0]["manifest"])
        manifest["index"] = {**manifest["index"], "size": shard_set.size}
        manifest.pop("shard", None)
        # Every file of every shard: what the kiosk's picture URLs name
        manifest["files"] = {f"{shard.path.name}/{name}": entry
                             for shard, info in zip(shard_set.shards, described)
                             for name, entry in info["manifest"]["files"].items()}
        runtime.manifest = manifest
        runtime._label_counts = np.sum([info["label_counts"] for info in described], axis=0)
        runtime.temperature = temperature_of(*merge_counts(
            [info["log_sigma_counts"] for info in described]))
        return runtime

    def _all(self, method: str, *args) -> list:
        return self._wait([getattr(actor, method).remote(*args) for actor in self.actors],
                          range(len(self.actors)))

    def _wait(self, refs: list, parts) -> list:
        deadline = time.monotonic() + self._timeout
        try:
            return ray.get(refs, timeout=self._timeout)
        except ray.exceptions.GetTimeoutError:
            raise ShardUnavailable(f"no answer from every shard of {self.shard_set.root} "
                                   f"within {self._timeout:g} s") from None
        except ray.exceptions.RayTaskError as exc:  # the method raised: pass on its error
            raise exc.cause from None
        except ray.exceptions.RayActorError as exc:
            dead = [str(self.shard_set.shards[part].path) for part, ref in zip(parts, refs)
                    if _actor_gone(ref, deadline)]
            raise ShardUnavailable(f"shard actor for {', '.join(dead) or self.shard_set.root} "
                                   f"is gone and Ray could not restart it: "
                                   f"{_first_line(exc)}") from None

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["index"]["label_names"])

    def __len__(self) -> int:
        return self.shard_set.size

    def label_id(self, label: int | str | None) -> int | None:
        return find_label(self.label_names, label)

    def sample_prior(self, n: int | None = None, seed: int | None = None) -> np.ndarray:
        return sample_prior(self.latent_dim, n, seed)

    def decode(self, z) -> np.ndarray:
        """As Runtime.decode, on the first shard's actor."""
        return self._first("decode", check_latent(z, self.latent_dim))

    def roundtrip_distance(self, z) -> np.ndarray:
        return self._first("roundtrip", check_latent(z, self.latent_dim))[2]

    def _first(self, method: str, *args):
        return self._wait([getattr(self.actors[0], method).remote(*args)], [0])[0]

    def nearest(self, z, k: int = 5, label: int | str | None = None,
                by: str = "latent", with_distance: bool = False) -> Matches:
        """As Runtime.nearest over the whole catalog (rows: rows of the whole catalog)."""
        array = check_latent(z, self.latent_dim)
        k = check_k(k)
        check_mode(by, with_distance)
        label_id = self._label_filter(label)
        if by == "latent":
            distances = self._first("roundtrip", array)[2] if with_distance else None
            return self._merge(array, None, k, label_id, distances, None)
        mu, log_sigma, distances = self._first("roundtrip", array)
        return self._merge(mu.astype(np.float64), WassersteinSearch.spread(log_sigma), k,
                           label_id, distances, self.temperature)

    def view(self, z, k: int = 5, label: int | str | None = None,
             by: str = "latent") -> tuple[np.ndarray, Matches]:
        """As Runtime.view: one z checked once and decoded once, on the first shard's actor."""
        array = check_latent(z, self.latent_dim, one=True)
        k = check_k(k)
        check_mode(by, True)
        label_id = self._label_filter(label)
        images, mu, log_sigma = self._first("decode_and_encode", array[None])
        distance = np.linalg.norm(array - mu[0])
        if by == "latent":
            return images[0], self._merge(array, None, k, label_id, distance, None)
        return images[0], self._merge(mu[0].astype(np.float64),
                                      WassersteinSearch.spread(log_sigma[0]), k, label_id,
                                      distance, self.temperature)

    def nearest_image(self, images, k: int = 5, label: int | str | None = None) -> Matches:
        """As Runtime.nearest_image over the whole catalog."""
        k = check_k(k)
        label_id = self._label_filter(label)
        batch, single = check_images(images, self.image_shape, IMAGE_RANGE)
        mu, log_sigma = self._first("encode", batch)
        if single:
            mu, log_sigma = mu[0], log_sigma[0]
        return self._merge(mu.astype(np.float64), WassersteinSearch.spread(log_sigma), k,
                           label_id, None, self.temperature)

    def _label_filter(self, label) -> int | None:
        label_id = self.label_id(label)
        if label_id is not None and self._label_counts[label_id] == 0:
            raise ValueError(f"no catalog item has label {self.label_names[label_id]!r}")
        return label_id

    def _merge(self, z: np.ndarray, var, k: int, label: int | None, distances,
               temperature: float | None) -> Matches:
        """The shards' partial answers as one: by log q (temperature None) or by W2."""
        single = z.ndim == 1
        flat = z.reshape(-1, self.latent_dim)
        flat_var = None if var is None else var.reshape(flat.shape)
        parts = [_Part(*answer) for answer in self._all("search", flat, flat_var, k, label,
                                                        temperature)]
        k = min(k, int(self._label_counts.sum() if label is None else self._label_counts[label]))
        rows = np.concatenate([p.rows for p in parts], axis=1)
        scores = np.concatenate([p.scores for p in parts], axis=1)
        # best first; ties to the lower row of the whole catalog, as the engine breaks them
        best = np.lexsort((rows, -scores), axis=1)[:, :k]
        pick = functools.partial(np.take_along_axis, indices=best, axis=1)
        log_totals = np.stack([p.log_total for p in parts])
        top = log_totals.max(axis=0)
        log_total = top + np.log(np.exp(log_totals - top).sum(axis=0))
        metadata = []
        for query, order in enumerate(best):
            found = [item for p in parts for item in p.metadata[query]]
            metadata.append(tuple(found[i] for i in order))
        metadata = tuple(metadata)
        ids = np.concatenate([p.ids for p in parts], axis=1)
        labels = np.concatenate([p.labels for p in parts], axis=1)
        matches = Matches(rows=pick(rows), ids=pick(ids), labels=pick(labels),
                          log_likelihoods=pick(scores),
                          probabilities=np.exp(pick(scores) - log_total[:, None]),
                          distances=distances, metadata=metadata)
        if not single:
            return matches
        return Matches(rows=matches.rows[0], ids=matches.ids[0], labels=matches.labels[0],
                       log_likelihoods=matches.log_likelihoods[0],
                       probabilities=matches.probabilities[0], distances=distances,
                       metadata=metadata[0])

    @functools.cached_property
    def index(self) -> ShardedIndex:
        """The whole catalog's index read on this machine, for the kiosk's item pages and
        slider words (the search itself never needs it here)."""
        return ShardedIndex([Bundle.read(shard.path, verify=False).index
                             for shard in self.shard_set.shards])

    def thumbnail(self, row: int) -> bytes | None:
        """The item's catalog photo, checked as Runtime.thumbnail checks it."""
        return checked_thumbnail(self.index, self.manifest, row)

    def close(self) -> None:
        """End the shard actors (the Ray connection stays as it is)."""
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _actor_gone(ref, deadline: float) -> bool:
    """Whether the call behind ref failed because its actor is gone (waiting until deadline
    for calls still running)."""
    try:
        ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # answered with an error of its own, or still running: not gone
        return False
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ShardedIndex:
    """A CatalogIndex's reading side over the shards' indexes, rows of the whole catalog."""

    def __init__(self, parts: list[CatalogIndex]):
        self._parts = parts
        self._starts = np.cumsum([0] + [len(part) for part in parts])
        self.label_names = parts[0].label_names
        self.columns = parts[0].columns
        self.mu = np.concatenate([part.mu for part in parts])
        self.log_sigma = np.concatenate([part.log_sigma for part in parts])
        self.labels = np.concatenate([part.labels for part in parts])
        self.ids = np.concatenate([part.ids for part in parts])
        self.metadata = tuple(np.concatenate(column)
                              for column in zip(*(part.metadata for part in parts)))
        self.thumbnail_offsets = None  # as in CatalogIndex: item i's bytes, whole catalog
        if parts[0].thumbnail_offsets is not None:
            sizes = np.concatenate([np.diff(part.thumbnail_offsets) for part in parts])
            self.thumbnail_offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
            np.cumsum(sizes, out=self.thumbnail_offsets[1:])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, row: int) -> tuple[CatalogIndex, int]:
        part = int(np.searchsorted(self._starts, row, side="right")) - 1
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} is outside the catalog's {len(self)} items")
        return self._parts[part], row - int(self._starts[part])

    def item_metadata(self, row: int) -> dict[str, str]:
        part, local = self._locate(row)
        return part.item_metadata(local)

    def thumbnail(self, row: int) -> bytes | None:
        part, local = self._locate(row)
        return part.thumbnail(local)
