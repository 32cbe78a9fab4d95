"""`vae-train`: a thin click layer over vae_edge.training.train."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import click

from ..export.build import DEFAULT_THUMBNAIL_SIZE
from ..runtime.cli_errors import CliError, library_errors
from . import distributed
from .catalog_data import DEFAULT_HOLDOUT, catalog_data
from .data import CLASS_NAMES, download
from .model import VAEConfig
from .train import TrainConfig, train

CATALOG_IMAGE_SIZE = 64
# The measured recipe for catalogs (docs/catalog.md, "The catalog recipe"): the defaults with
# --catalog. Image budget: about 15 minutes for 10,000 64x64 photos on a 2-core CPU.
CATALOG_RECIPE = {"batch_size": 64, "beta": 2.0, "patience": 5, "hidden_dim": 512}
CATALOG_IMAGES_SEEN = 300_000


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/vae"), show_default=True,
              help="Run directory: checkpoint.pt (rewritten atomically every epoch) "
              "and metrics.jsonl.")
@click.option("--latent-dim", type=click.IntRange(1, 512), default=VAEConfig.latent_dim,
              show_default=True, help="Size of z.")
@click.option("--widths", default="32,64", show_default=True,
              help="Conv widths, one per layer. The first layers halve the resolution (2 for "
              "28x28 images, 4 for 64x64: halved while the side is even and the half >= 4); "
              "widths missing for them are added by doubling the last (up to 256).")
@click.option("--hidden-dim", type=click.IntRange(min=1), default=None,
              help="Fully connected layer between conv stack and latent [default: "
              f"{VAEConfig.hidden_dim}; {CATALOG_RECIPE['hidden_dim']} with --catalog].")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help=f"Passes over the training images [default: {TrainConfig.epochs}; with "
              f"--catalog, enough for {CATALOG_IMAGES_SEEN:,} images and at least "
              f"{TrainConfig.epochs}, ended earlier by --patience].")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help=f"Images per step [default: {TrainConfig.batch_size}; "
              f"{CATALOG_RECIPE['batch_size']} with --catalog].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.lr,
              show_default=True, help="Adam learning rate.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True)
@click.option("--beta", type=click.FloatRange(min=0), default=None,
              help=f"Weight of the KL term (1 = the true ELBO) [default: {TrainConfig.beta:g}; "
              f"{CATALOG_RECIPE['beta']:g} with --catalog].")
@click.option("--kl-warmup-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Ramp beta linearly from 0 over this many epochs.")
@click.option("--label-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Optional label-aware objective: adds this weight times the cross-entropy of a "
              "linear classifier on z (uses the class labels; 0 = pure VAE).")
@click.option("--patience", type=click.IntRange(min=0), default=None,
              help="Early stopping: end the run once the held-out loss has not improved for "
              "this many epochs, keeping the weights of the epoch with the lowest one; 0 = off "
              f"[default: {CATALOG_RECIPE['patience']} with --catalog, 0 for Fashion-MNIST].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Train on a fixed random subset of this many training images.")
@click.option("--test-subset", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first this many test images.")
@click.option("--catalog", "catalog_csv", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Train on a shop's catalog CSV (id, image[, label, ...]; "
              "docs/catalog.md) instead of Fashion-MNIST.")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help=f"Catalog: side of the square the photos are fitted into, a multiple of 4 "
              f"from 16 to 256 [default: {CATALOG_IMAGE_SIZE}]. Fashion-MNIST is 28.")
@click.option("--channels", "image_channels", type=click.Choice(["1", "3"]), default=None,
              help="Catalog: 3 keeps colour, 1 makes grayscale [default: 3]. Fashion-MNIST is 1.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, help=f"Catalog: the seeded random fraction of items held out for "
              f"the test figures [default: {DEFAULT_HOLDOUT}].")
@click.option("--skip-bad", is_flag=True,
              help="Catalog: leave out bad rows and unreadable photos (and say how many) "
              "instead of refusing the catalog.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Catalog: where decoded photos are cached [default: "
              "$XDG_CACHE_HOME/vae-edge/photos].")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Directory with the Fashion-MNIST IDX files (.gz or raw).")
@click.option("--download", "do_download", is_flag=True,
              help="Fetch Fashion-MNIST into the user cache first (checksums verified).")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out (written by any "
              "number of ranks).")
@click.option("--device", type=click.Choice(distributed.DEVICES), default="auto",
              show_default=True, help="Where to train: auto takes a GPU when PyTorch sees one. "
              "Under torchrun each rank takes the GPU of its local rank.")
@click.option("--rank-timeout", type=click.FloatRange(min=0, min_open=True),
              default=distributed.DEFAULT_TIMEOUT, show_default=True,
              help="Under torchrun: seconds a rank waits for the others (a step, the photo "
              "cache another rank builds) before the job ends with an error.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar per epoch (default: when stderr is a terminal).")
def main(out_dir, latent_dim, widths, hidden_dim, epochs, batch_size, lr, lr_schedule, beta,
         kl_warmup_epochs, label_weight, patience, seed, subset, test_subset, catalog_csv,
         image_size, image_channels, holdout, skip_bad, cache_dir, data_dir, do_download, resume,
         device, rank_timeout, progress):
    """Train the convolutional VAE on Fashion-MNIST, or on a shop's catalog (--catalog).

    Loss per image: Bernoulli reconstruction (BCE with logits, summed over pixels and
    channels) + beta * KL(q(z|x) || N(0, I)). Per-epoch train/test loss parts are printed and
    written to OUT/metrics.jsonl; export OUT/checkpoint.pt with `vae-export`.

    On many ranks: `torchrun --nproc-per-node N $(which vae-train) ...` (docs/scale.md).
    --batch-size is the global batch, split over the ranks: the same options train the same
    model on any number of ranks.
    """
    try:
        conv_widths = tuple(int(c) for c in widths.split(","))
    except ValueError:
        raise CliError(f"--widths must be comma-separated integers, got {widths!r}") from None
    if catalog_csv is None:
        given = [name for name, value in (("--image-size", image_size not in (None, 28)),
                                          ("--channels", image_channels not in (None, "1")),
                                          ("--holdout", holdout is not None),
                                          ("--skip-bad", skip_bad),
                                          ("--cache-dir", cache_dir is not None)) if value]
        if given:
            raise CliError(f"{', '.join(given)} need{'s' if len(given) == 1 else ''} --catalog "
                           "(Fashion-MNIST is 28x28 grayscale with a fixed test split)")
    elif data_dir is not None or do_download:
        raise CliError("--data-dir and --download are for Fashion-MNIST; a --catalog run reads "
                       "the photos its CSV names")
    with distributed.joined(device, rank_timeout) as (ranks, where):
        _train(ranks, where, out_dir, conv_widths, latent_dim, hidden_dim, epochs, batch_size, lr,
               lr_schedule, beta, kl_warmup_epochs, label_weight, patience, seed, subset,
               test_subset, catalog_csv, image_size, image_channels, holdout, skip_bad,
               cache_dir, data_dir, do_download, resume, progress)


def _train(ranks, device, out_dir, conv_widths, latent_dim, hidden_dim, epochs, batch_size, lr,
           lr_schedule, beta, kl_warmup_epochs, label_weight, patience, seed, subset,
           test_subset, catalog_csv, image_size, image_channels, holdout, skip_bad, cache_dir,
           data_dir, do_download, resume, progress):
    say = click.echo if ranks.leader else quiet
    show = (sys.stderr.isatty() if progress is None else progress) and ranks.leader
    with library_errors():
        recipe = CATALOG_RECIPE if catalog_csv is not None else {}
        model_config = VAEConfig(
            latent_dim=latent_dim, channels=conv_widths,
            hidden_dim=recipe.get("hidden_dim", VAEConfig.hidden_dim) if hidden_dim is None
            else hidden_dim,
            image_size=28 if catalog_csv is None else image_size or CATALOG_IMAGE_SIZE,
            image_channels=int(image_channels or (1 if catalog_csv is None else 3)))
        unset = {"epochs": epochs, "batch_size": batch_size, "beta": beta, "patience": patience}
        config = TrainConfig(lr=lr, kl_warmup_epochs=kl_warmup_epochs, seed=seed, subset=subset,
                             test_subset=test_subset, lr_schedule=lr_schedule,
                             label_weight=label_weight,
                             **{name: recipe.get(name, getattr(TrainConfig, name))
                                if value is None else value for name, value in unset.items()})
        data = None
        if catalog_csv is not None:
            with distributed.one_per_machine_first(ranks):  # one rank builds the photo cache
                data = catalog_data(catalog_csv, model_config.image_size,
                                    model_config.image_channels, seed=seed,
                                    holdout=DEFAULT_HOLDOUT if holdout is None else holdout,
                                    skip_bad=skip_bad, require_labels=label_weight > 0,
                                    thumbnail_size=DEFAULT_THUMBNAIL_SIZE,
                                    cache_dir=cache_dir, progress=show, log=say)
            if epochs is None:
                config = replace(config, epochs=catalog_epochs(min(len(data.train),
                                                                   subset or len(data.train))))
            say(f"catalog: {len(data.train)} items train, {len(data.test)} held out, "
                f"{len(data.class_names)} labels; up to {config.epochs} epochs of "
                f"{config.batch_size} a step" + (f", stopping once {config.patience} bring no "
                                                 "better held-out loss" if config.patience else ""))
        elif do_download:
            with distributed.one_per_machine_first(ranks):
                data_dir = download(data_dir, log=None if ranks.leader else quiet)
        class_names = CLASS_NAMES if data is None else data.class_names
        model_config = replace(model_config,
                               num_classes=len(class_names) if label_weight > 0 else 0)
        checkpoint = train(model_config, config, out_dir, data_dir=data_dir, resume=resume,
                           progress=show, log=say, data=data, device=device)
    last = checkpoint["history"][-1]
    say(f"done: {out_dir / 'checkpoint.pt'} (test loss {last['test_loss']:.2f} nats/image)")


def catalog_epochs(train_items: int) -> int:
    """--epochs by default with --catalog: CATALOG_IMAGES_SEEN images, at least the
    Fashion-MNIST default's epochs."""
    return max(TrainConfig.epochs, -(-CATALOG_IMAGES_SEEN // train_items))


def quiet(message) -> None:
    """The log of a rank other than 0: rank 0 speaks for the run."""
