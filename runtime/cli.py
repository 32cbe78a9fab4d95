"""`vae-run`: a thin click layer over vae_edge.runtime (decode, encode, nearest, info, serve,
export-web, bench, add, remove, shard)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import click
import numpy as np

from . import kiosk_app as kiosk  # serve's defaults and limits
from .checks import MATCH_MODES
from .cli_errors import CliError, library_errors
from .cli_options import (
    AsciiInt,
    AsciiIntRange,
    bundle_options,
    cluster_options,
    latent_options,
    page_options,
    query_options,
)
from .core import Runtime
from .images import save_png, save_sheet
from .search import match_records
from .words import first_few, plural

SHEET_MAX_ITEMS = 20


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def format_z(z: np.ndarray) -> str:
    return ",".join(f"{v:.4g}" for v in z)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vae-edge")
def main():
    """Decode latent vectors and search a VAE catalog by likelihood, without PyTorch.

    A latent vector z is d numbers (d = the bundle's latent dim, see `vae-run info`).
    `nearest` ranks catalog items x by log q(z|x), the log density of the item's
    Gaussian posterior at z: exact, no sampling.
    """


@main.command()
@bundle_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def info(runtime: Runtime, as_json: bool):
    """Show what a bundle holds: latent dim, catalog, test metrics."""
    summary = runtime.describe()
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        click.echo(f"{key:>26}: {value}")


@main.command()
@bundle_options
@latent_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="PNG file to write.")
def decode(runtime: Runtime, z: np.ndarray, output: Path):
    """Decode one latent vector into a garment image (PNG)."""
    with library_errors():
        image = runtime.decode(z)
        save_png(output, image)
    click.echo(f"z = {format_z(z)}")
    click.echo(f"wrote {output}")


@main.command()
@bundle_options
@query_options
@click.option("-k", type=AsciiInt(), default=5, show_default=True,
              help="How many items to return (more than the catalog returns all).")
@click.option("--label", default=None, metavar="NAME",
              help="Only items of this class, by name (Sneaker) or id (7); p(x|z) stays "
                   "over the whole catalog.")
@click.option("--by", type=click.Choice(MATCH_MODES), default=None,
              help="How a latent query ranks items: latent (default), by log q(z|x); decoded, "
                   "by the garment decode(z) encoded again, as a photo would be (better far "
                   "from the catalog: docs/matching.md).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object: the query, the match mode, z's distance from the "
                   "catalog and a results list.")
@click.option("--sheet", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help=f"Also write a PNG: the query beside the first {SHEET_MAX_ITEMS} items (their "
              "catalog photos, or the decoded mu in a bundle without thumbnails).")
def nearest(runtime: Runtime, z: np.ndarray | None, image, k: int, label: str | None,
            by: str | None, as_json: bool, sheet: Path | None):
    """Catalog items most like the garment z, best first.

    By default items are ranked by log q(z|x), how likely each item's posterior makes z;
    --by decoded ranks them by the decoded garment instead. With --image, items are ranked
    by E[log q(z|x)] over the photo's posterior z ~ q(z|photo). p(x|z) is each item's share
    of the match among catalog items (uniform prior over items), not a similarity. The
    distance |z - mu(decode(z))| says how far z lies from where the catalog is.
    """
    if image is not None and by is not None:
        raise CliError("--by ranks latent queries (--z / --random); --image always ranks by "
                       "the photo's posterior")
    by = by or "latent"
    with library_errors():
        if image is None:
            matches = runtime.nearest(z, k=k, label=label, by=by, with_distance=True)
        else:
            matches = runtime.nearest_image(image[1], k=k, label=label)
    results = match_records(matches, runtime.label_names)
    if sheet is not None:
        with library_errors():
            save_sheet(sheet, *_sheet_pictures(runtime, matches, results, z, image))
    if image is None:
        query = {"z": [float(v) for v in z], "by": by,
                 "distance": float(matches.distances)}
    else:
        query = {"image": str(image[0])}
    if as_json:
        click.echo(json.dumps({**query, "label": label, "k": len(results),
                               "results": results}))
    else:
        if image is None:
            click.echo(f"z = {format_z(z)}")
            click.echo(f"ranked by {by}; distance from the catalog |z - mu(decode(z))| = "
                       f"{query['distance']:.2f}")
        else:
            click.echo(f"image = {image[0]}")
        # decoded and photo queries rank by the expectation over a posterior
        score = "log q(z|x)" if by == "latent" and image is None else "E log q(z|x)"
        width = max([6] + [len(r["id"]) for r in results])
        click.echo(f"{'rank':>4}  {'id':>{width}}  {'label':<12} {score:>12}  {'p(x|z)':>8}")
        for r in results:
            details = "  ".join(f"{key}={' '.join(value.split())}"  # one line per item
                                for key, value in r["metadata"].items())
            click.echo(f"{r['rank']:>4}  {r['id']:>{width}}  {r['label']:<12} "
                       f"{r['log_likelihood']:>12.3f}  {r['probability']:>8.4f}"
                       f"{'  ' + shorten(details, 120) if details else ''}")
    if sheet is not None:
        click.echo(f"wrote {sheet}", err=as_json)


def _sheet_pictures(runtime: Runtime, matches, results: list[dict], z, image):
    """The query and (up to SHEET_MAX_ITEMS) items for a contact sheet: the items' catalog
    photos where the bundle has thumbnails, else the decoder's view of their mu."""
    from PIL import Image

    # A large k must not decode the catalog into one endless picture.
    shown = matches.rows[:SHEET_MAX_ITEMS]
    photos = [runtime.thumbnail(int(row)) for row in shown]
    if all(photo is not None for photo in photos):
        items, drawn = [Image.open(io.BytesIO(photo)) for photo in photos], "catalog photos"
    else:
        items, drawn = list(runtime.decode(runtime.index.mu[shown])), "decoded mu"
    if image is None:
        query, title = runtime.decode(z), "decoded z"
    else:
        query, title = image[1], "query image"
    captions = [f"query: {title}"] + [f"#{r['id']} {r['label']}\n{r['log_likelihood']:.2f}"
                                      for r in results[:SHEET_MAX_ITEMS]]
    return query, items, captions, f"{title} | nearest catalog items ({drawn}), log q(z|x)"


@main.command()
@bundle_options
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
def encode(runtime: Runtime, images: tuple[Path, ...], as_json: bool):
    """Encode photos (PNG, JPEG, WebP, BMP, GIF or PPM, any size and colour, fitted into the
    model's square) to their posterior mu and log-sigma."""
    with library_errors():
        pixels = np.stack([runtime.read_photo(path) for path in images])
        mu, log_sigma = runtime.encode(pixels)
    for path, m, s in zip(images, mu, log_sigma):
        if as_json:
            click.echo(json.dumps({"file": str(path), "mu": m.tolist(),
                                   "log_sigma": s.tolist()}))
        else:
            click.echo(f"{path}\n  mu        = {format_z(m)}\n  log_sigma = {format_z(s)}")


@main.command()
@bundle_options
@cluster_options
@click.option("--host", default=kiosk.DEFAULT_HOST, show_default=True,
              help="Address to listen on. The default is reachable from this machine only; "
                   "0.0.0.0 opens the kiosk to the network.")
@click.option("--port", type=AsciiIntRange(0, 65535), default=kiosk.DEFAULT_PORT,
              show_default=True, help="TCP port; 0 picks a free one (the URL is printed).")
@page_options
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Also answer requests addressed to this host name (repeatable), e.g. the "
                   "name a reverse proxy or the local network uses for this machine. Only "
                   "the listening address (and localhost) are answered otherwise.")
@click.option("--log-requests", is_flag=True, help="Log every request (failures always are).")
def serve(runtime, host: str, port: int, z_range: float, k: int,
          allow_hosts: tuple[str, ...], idle_reset: int, attract: int, log_requests: bool):
    """Serve the kiosk page and its JSON API (decode, nearest, sample, item).

    Open the printed URL in a browser: one slider per latent dim, the decoded garment,
    and the catalog items most likely to have produced it. The API is described in
    docs/kiosk.md. Ctrl+C or SIGTERM stops it after the requests in flight. With --shards
    the catalog is searched in Ray actors (docs/scale.md).
    """
    from .server import is_loopback, make_server, return_free_memory

    with library_errors():
        server = make_server(runtime, host, port, z_range=z_range, k=k, idle_reset=idle_reset,
                             attract=attract, log_requests=log_requests, allow_hosts=allow_hosts)
    return_free_memory()
    if not is_loopback(host):
        click.echo(f"note: listening on {host}, so other machines can reach the kiosk", err=True)
    click.echo(f"kiosk on {server.url} (latent dim {runtime.latent_dim}, "
               f"{plural(len(runtime.index), 'catalog item')}); Ctrl+C stops it")
    server.run(log=lambda message: click.echo(message, err=True))


@main.command("export-web")
@bundle_options
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The folder to write (replaced only with --force).")
@click.option("--force", is_flag=True, help="Replace the folder if it exists.")
@page_options
def export_web(runtime: Runtime, output: Path, force: bool, z_range: float, k: int,
               idle_reset: int, attract: int):
    """Write the kiosk as a static folder that needs no server.

    Open OUTPUT/index.html from any static file server (https, or localhost): the page
    decodes and searches in the browser (onnxruntime-web), exactly as `serve` does, checks
    every file against its sha256 first, and keeps working offline once loaded. Deploying
    it on a tablet: docs/kiosk.md.
    """
    from .web import export_site

    with library_errors():
        summary = export_site(runtime, output, z_range=z_range, k=k, idle_reset=idle_reset,
                              attract=attract, force=force)
    click.echo(f"wrote {output}: {plural(summary['files'], 'file')}, "
               f"{summary['bytes'] / 1e6:.1f} MB ({summary['gzip_bytes'] / 1e6:.1f} MB gzipped)")


@main.command()
@bundle_options
@click.option("--seconds", type=click.FloatRange(0, 3600, min_open=True), default=3.0,
              show_default=True, help="Time budget in all (a slow device's cold start may "
                                      "take longer: at least one runs).")
@click.option("--batch", type=AsciiIntRange(2, 4096), default=64, show_default=True,
              help="Queries per call in the batch rows.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def bench(runtime: Runtime, seconds: float, batch: int, as_json: bool):
    """Size this device: decode, encode and nearest latency (p50/p99), cold start, memory.

    Run it on the hardware a shop means to use, with the bundle and --threads it will use.
    """
    from .bench import format_report, run_bench

    with library_errors():
        report = run_bench(runtime, seconds=seconds, batch=batch)
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def _edit_progress(total: int | None = None):
    from tqdm import tqdm

    return tqdm(total=total, desc="photos", unit="photo", disable=None, leave=False)


@main.command()
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle directory to change (made by vae-export).")
@click.argument("csv_file", metavar="CATALOG.csv", type=click.Path(path_type=Path))
@click.option("--skip-bad", is_flag=True,
              help="Leave out rows that cannot be used (reported) instead of refusing the CSV.")
def add(bundle: Path, csv_file: Path, skip_bad: bool):
    """Add the items of a catalog CSV (id, image[, label, ...]; docs/catalog.md) to a bundle.

    Photos are fitted as training fitted the catalog and encoded with the bundle's
    encoder.onnx; each item's metadata and thumbnail are stored with it. The bundle is
    replaced in one step once the new one is complete: a kill leaves the old bundle or the
    new one, and a kiosk already running keeps serving what it loaded until restarted.
    """
    from .edit import add_items

    with library_errors(), _edit_progress() as bar:
        report = add_items(bundle, csv_file, skip_bad=skip_bad, progress=bar.update,
                           log=lambda message: click.echo(message, err=True))
    if report.skipped:
        click.echo(f"skipped {plural(len(report.skipped), 'bad row')}: "
                   f"{first_few(report.skipped)}", err=True)
    click.echo(f"added {plural(len(report.added), 'item')}; {bundle} holds {report.size}")


@main.command()
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle directory to change (made by vae-export).")
@click.argument("ids", nargs=-1, required=True)
def remove(bundle: Path, ids: tuple[str, ...]):
    """Take the items with these IDS out of a bundle (all or nothing: an unknown id changes
    nothing). Replaced in one step, as for `add`. An id that starts with a dash goes after
    `--`: vae-run remove --bundle B -- -5"""
    from .edit import remove_items

    with library_errors():
        report = remove_items(bundle, ids, log=lambda message: click.echo(message, err=True))
    click.echo(f"removed {plural(len(report.removed), 'item')}; {bundle} holds {report.size}")


@main.command()
@click.option("--bundle", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Bundle directory to split (made by vae-export).")
@click.option("--parts", type=AsciiIntRange(1, 1024), required=True,
              help="How many shards: one per Ray actor that will search them.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the shard set to (shard-0, ..., shards.json).")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists.")
def shard(bundle: Path, parts: int, output: Path, force: bool):
    """Split a bundle's catalog into PARTS bundles for a Ray cluster (docs/scale.md).

    Each shard is a complete bundle (Runtime.load and vae-run info accept it) with a
    contiguous run of the items and the same graphs (hard links where the output is on the
    bundle's file system, copies otherwise); shards.json names the set, so a shard missing,
    changed or from another set is refused when the set is loaded.
    """
    from .shard import shard_bundle

    with library_errors():
        shard_set = shard_bundle(bundle, parts, output, force=force,
                                 log=lambda message: click.echo(message, err=True))
    for item in shard_set.shards:
        click.echo(f"{item.path}: items {item.offset}-{item.offset + item.size - 1}")
