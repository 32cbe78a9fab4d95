"""The options vae-run's commands share: the bundle (or a shard set), a latent query (--z,
--random, --seed) or a photo, and the kiosk page's settings; each wrapper loads or parses
what its options name and hands it to the command."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import click

from . import kiosk_app as kiosk  # serve's defaults and limits
from .checks import MAX_THREADS, parse_z
from .cli_errors import CliError, library_errors
from .core import Runtime
from .images import FORMATS_TEXT


class AsciiInt(click.types.IntParamType):
    """An integer option in ASCII digits; Python's int() would also take '\u0663' (Arabic 3)."""

    _digits = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not self._digits.fullmatch(value):
            self.fail(f"{value!r} is not a valid integer.", param, ctx)
        return super().convert(value, param, ctx)


class AsciiIntRange(AsciiInt, click.IntRange):
    """AsciiInt within click.IntRange's bounds."""


def bundle_options(command):
    @click.option("--bundle", type=click.Path(path_type=Path), default=None,
                  help="Bundle directory made by vae-export (default: the shipped model).")
    @click.option("--threads", type=AsciiIntRange(1, MAX_THREADS), default=1, show_default=True,
                  help="onnxruntime threads; 1 leaves the rest of a kiosk's CPU free.")
    @functools.wraps(command)
    def wrapper(bundle, threads, shards=None, cluster=None, **kwargs):
        if shards is not None:  # cluster_options
            if bundle is not None:
                raise CliError("give --bundle or --shards, not both")
            return command(load_cluster(shards, cluster, threads), **kwargs)
        if cluster is not None:
            raise CliError("--cluster goes with --shards DIR (a shard set from vae-run shard)")
        with library_errors():
            # vae-run owns its process, so it caps numpy's BLAS pool too (Runtime.load)
            runtime = Runtime.load(bundle, threads=threads, limit_blas=True)
        return command(runtime, **kwargs)

    return wrapper


def with_latent_options(wrapper):
    """--z / --random / --seed on a wrapper that receives z_text, use_random and seed."""
    for option in reversed([
        click.option("--z", "z_text", metavar="NUMBERS",
                     help='Latent vector, one number per latent dim: "0.5,-1.2,...".'),
        click.option("--random", "use_random", is_flag=True,
                     help="Draw z from the prior N(0, I) instead of --z."),
        click.option("--seed", type=AsciiInt(), default=None, help="Seed for --random."),
    ]):
        wrapper = option(wrapper)
    return wrapper


def page_options(command):
    """--range, -k, --idle-reset and --attract: the kiosk page's settings (serve, export-web),
    bounded by the server's own limits."""
    for option in reversed([
        click.option("--range", "z_range", type=click.FloatRange(0, kiosk.MAX_RANGE, min_open=True),
                     default=kiosk.DEFAULT_RANGE, show_default=True,
                     help="Each slider spans [-RANGE, RANGE] (5 matches the seeds)."),
        click.option("-k", type=AsciiIntRange(1, kiosk.MAX_K), default=kiosk.DEFAULT_K,
                     show_default=True, help="How many nearest catalog items the page shows."),
        click.option("--idle-reset", type=AsciiIntRange(0, kiosk.MAX_IDLE_RESET_S),
                     default=kiosk.DEFAULT_IDLE_RESET_S, show_default=True, metavar="SECONDS",
                     help="After this long without a touch the page returns to its opening "
                          "garment, picks cleared; 0 never resets."),
        click.option("--attract", type=AsciiIntRange(0, kiosk.MAX_ATTRACT_S), default=0,
                     show_default=True, metavar="SECONDS",
                     help="Once reset for idleness, show another catalog item every SECONDS "
                          "until someone touches the screen; 0 stays on the opening garment."),
    ]):
        command = option(command)
    return command


def cluster_options(command):
    """--shards and --cluster, for a command that also has bundle_options (placed above)."""
    shards = click.option(
        "--shards", type=click.Path(path_type=Path), default=None,
        help="Search this shard set (vae-run shard) in Ray actors, one per shard, instead of "
             "one --bundle (needs vae-edge[cluster]).")
    cluster = click.option(
        "--cluster", metavar="ADDRESS", default=None,
        help="The Ray cluster for --shards, as ray.init takes it (auto, HOST:PORT, "
             "ray://HOST:PORT); default: RAY_ADDRESS or a local Ray.")
    return shards(cluster(command))


def load_cluster(shards: Path, address: str | None, threads: int):
    try:
        from .cluster import ShardedRuntime, ShardUnavailable
    except ImportError as exc:
        raise CliError(f"--shards needs Ray ({exc}): pip install 'vae-edge[cluster]'") from None
    try:
        with library_errors():
            return ShardedRuntime.load(shards, address=address, threads=threads)
    except (ShardUnavailable, ConnectionError) as exc:
        raise CliError(str(exc)) from None


def latent_options(command):
    @functools.wraps(command)
    def wrapper(runtime, z_text, use_random, seed, **kwargs):
        return command(runtime, resolve_latent(runtime, z_text, use_random, seed), **kwargs)

    return with_latent_options(wrapper)


def resolve_latent(runtime: Runtime, z_text: str | None, use_random: bool, seed: int | None):
    if (z_text is None) == (not use_random):
        raise CliError("give exactly one of --z NUMBERS or --random")
    with library_errors():
        if use_random:
            return runtime.sample_prior(seed=seed)
        return parse_z(z_text, runtime.latent_dim)


def query_options(command):
    """--z / --random (see latent_options) or --image PATH: exactly one."""

    @click.option("--image", "image_path", type=click.Path(path_type=Path), default=None,
                  help=f"Query by a photo ({FORMATS_TEXT}, any size; fitted into the model's "
                       "square as training fitted the catalog) instead of z: ranks items by the "
                       "2-Wasserstein distance between the photo's encoding q(z|photo) and "
                       "each item's (docs/matching.md).")
    @functools.wraps(command)
    def wrapper(runtime, image_path, z_text, use_random, seed, **kwargs):
        if image_path is None:
            z = resolve_latent(runtime, z_text, use_random, seed)
            return command(runtime, z, image=None, **kwargs)
        if z_text is not None or use_random:
            raise CliError("give either --image PATH or a latent (--z NUMBERS / --random), "
                           "not both")
        with library_errors():
            pixels = runtime.read_photo(image_path)
        return command(runtime, None, image=(image_path, pixels), **kwargs)

    return with_latent_options(wrapper)
