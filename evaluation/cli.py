"""`vae-eval`: a thin click layer over vae_edge.evaluation.report.evaluate_bundle."""

from __future__ import annotations

from pathlib import Path

import click

from ..runtime.cli_errors import CliError, library_errors
from .catalog import HELD_OUT_IS_IMAGES, HELD_OUT_IS_SAMPLES, evaluate_catalog_bundle, summary
from .report import EvalConfig, evaluate_bundle


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle", type=click.Path(path_type=Path), required=False)
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              required=True, help="Report directory to create: report.json and pictures/.")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The bundle's checkpoint.pt: exact likelihoods from PyTorch logits and loss "
                   "curves from its history (without it: decoder.onnx, no loss curves).")
@click.option("--test-limit", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first N test images only (default: all 10,000).")
@click.option("--is-images", type=click.IntRange(min=0), default=None,
              help="Importance-sample the log-likelihood on the first N test images, with "
                   "--catalog held-out items (0: all)  [default: "
                   f"{EvalConfig.is_images}, with --catalog {HELD_OUT_IS_IMAGES}]")
@click.option("--is-samples", type=click.IntRange(min=1), default=None,
              help="Samples K per image for the importance-sampled estimate  [default: "
                   f"{EvalConfig.is_samples}, with --catalog {HELD_OUT_IS_SAMPLES}]")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the importance samples and of the prior-sample picture.")
@click.option("--threads", type=click.IntRange(min=1), default=EvalConfig.threads,
              show_default=True, help="onnxruntime intra-op threads.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also search the same catalog by raw-pixel L2 (the figure to beat).")
@click.option("--slider-queries", type=click.IntRange(min=0),
              default=EvalConfig.slider_queries, show_default=True,
              help="The slider scenario: this many z from each of N(0, I), uniform in "
                   "[-A, A]^d and the corners {-A, A}^d, each matched by both modes (0: skip).")
@click.option("--slider-range", "slider_range", type=click.FloatRange(min=0, min_open=True),
              default=EvalConfig.slider_range, show_default=True, metavar="A",
              help="Half-width A of the slider box for the uniform and corner z.")
@click.option("--pictures/--no-pictures", default=True, show_default=True,
              help="Draw the pictures (needs matplotlib, in the train extra).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Directory with the Fashion-MNIST IDX files.")
@click.option("--catalog", "catalog_csv", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="The shop catalog CSV the bundle was exported from: evaluate "
              "any bundle on it (slider scenario, photo queries, held-out likelihoods, picture "
              "sheets) instead of on Fashion-MNIST.")
@click.option("--photo-queries", type=click.IntRange(min=1), default=None,
              help="With --catalog: this many items' own photos as queries (default: all).")
@click.option("--force", is_flag=True, help="Replace an existing report directory.")
def main(bundle, out_dir, checkpoint, test_limit, is_images, is_samples, seed, threads, baseline,
         slider_queries, slider_range, pictures, data_dir, catalog_csv, photo_queries, force):
    """Evaluate BUNDLE (default: the shipped model) on the Fashion-MNIST test set, or with
    --catalog CSV on the shop catalog it was exported from (docs/matching.md).

    Retrieval goes through the exported runtime: each test image is encoded by
    encoder.onnx and its mu searched with Runtime.nearest over the bundle's catalog
    (1-NN label agreement, kNN-5 vote, precision@10), beside the raw-pixel L2 baseline
    over the same catalog and the photo search by the whole q(z|x). Also:
    loss parts in nats/image (reconstruction, KL, negative ELBO, importance-sampled
    log-likelihood), reconstruction MSE and active latent units, and the slider scenario:
    how much the top match of each match mode looks like the garment decoded from slider
    positions, far from the catalog too. Writes OUT/report.json
    and OUT/pictures/*.png; the full test set takes a few minutes on 2 cores.
    """
    if is_images is None:
        is_images = EvalConfig.is_images if catalog_csv is None else HELD_OUT_IS_IMAGES
    is_images = is_images or None  # 0: all
    if is_samples is None:
        is_samples = EvalConfig.is_samples if catalog_csv is None else HELD_OUT_IS_SAMPLES
    if catalog_csv is not None:
        if bundle is None or slider_queries == 0:
            raise CliError("--catalog needs the BUNDLE exported from that catalog and "
                           "--slider-queries of at least 1")
        with library_errors():
            report = evaluate_catalog_bundle(
                bundle, catalog_csv, out_dir, queries=slider_queries,
                slider_range=slider_range, photos=photo_queries, seed=seed, threads=threads,
                pictures=pictures, is_images=is_images, is_samples=is_samples, force=force,
                log=click.echo)
        click.echo(summary(report))
        return
    try:
        with library_errors():
            config = EvalConfig(test_limit=test_limit, is_images=is_images,
                                is_samples=is_samples, seed=seed, threads=threads,
                                baseline=baseline, slider_queries=slider_queries,
                                slider_range=slider_range, pictures=pictures)
            evaluate_bundle(bundle, out_dir, checkpoint=checkpoint, config=config,
                            data_dir=data_dir, force=force, log=click.echo)
    except ImportError as exc:
        raise CliError(f"{exc}; install the train extra: pip install 'vae-edge[train]'") from None
