"""`vae-train`: a thin click layer over vae_edge.training.train."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..runtime.cli import CliError, library_errors
from .data import download
from .model import VAEConfig
from .train import TrainConfig, train


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("runs/vae"), show_default=True,
              help="Run directory: checkpoint.pt (rewritten atomically every epoch) "
              "and metrics.jsonl.")
@click.option("--latent-dim", type=click.IntRange(1, 512), default=VAEConfig.latent_dim,
              show_default=True, help="Size of z.")
@click.option("--channels", default="32,64", show_default=True,
              help="Conv widths; the first two layers halve the resolution.")
@click.option("--hidden-dim", type=click.IntRange(min=1), default=VAEConfig.hidden_dim,
              show_default=True, help="Fully connected layer between conv stack and latent.")
@click.option("--epochs", type=click.IntRange(min=1), default=TrainConfig.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=TrainConfig.batch_size,
              show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=TrainConfig.lr,
              show_default=True, help="Adam learning rate.")
@click.option("--lr-schedule", type=click.Choice(["constant", "cosine"]), default="constant",
              show_default=True)
@click.option("--beta", type=click.FloatRange(min=0), default=TrainConfig.beta, show_default=True,
              help="Weight of the KL term (1 = the true ELBO).")
@click.option("--kl-warmup-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              help="Ramp beta linearly from 0 over this many epochs.")
@click.option("--label-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Optional label-aware objective: adds this weight times the cross-entropy of a "
              "linear classifier on z (uses the class labels; 0 = pure VAE).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--subset", type=click.IntRange(min=1), default=None,
              help="Train on a fixed random subset of this many training images.")
@click.option("--test-subset", type=click.IntRange(min=1), default=None,
              help="Evaluate on the first this many test images.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Directory with the Fashion-MNIST IDX files (.gz or raw).")
@click.option("--download", "do_download", is_flag=True,
              help="Fetch Fashion-MNIST into the user cache first (checksums verified).")
@click.option("--resume", is_flag=True, help="Continue the checkpoint in --out.")
@click.option("--progress/--no-progress", default=None,
              help="Progress bar per epoch (default: when stderr is a terminal).")
def main(out_dir, latent_dim, channels, hidden_dim, epochs, batch_size, lr, lr_schedule, beta,
         kl_warmup_epochs, label_weight, seed, subset, test_subset, data_dir, do_download, resume,
         progress):
    """Train the convolutional VAE on Fashion-MNIST.

    Loss per image: Bernoulli reconstruction (BCE with logits, summed over pixels)
    + beta * KL(q(z|x) || N(0, I)). Per-epoch train/test loss parts are printed and
    written to OUT/metrics.jsonl; export OUT/checkpoint.pt with `vae-export`.
    """
    try:
        widths = tuple(int(c) for c in channels.split(","))
    except ValueError:
        raise CliError(f"--channels must be comma-separated integers, got {channels!r}") from None
    with library_errors():
        model_config = VAEConfig(latent_dim=latent_dim, channels=widths, hidden_dim=hidden_dim,
                                 num_classes=10 if label_weight > 0 else 0)
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, beta=beta,
                             kl_warmup_epochs=kl_warmup_epochs, seed=seed, subset=subset,
                             test_subset=test_subset, lr_schedule=lr_schedule,
                             label_weight=label_weight)
        if do_download:
            data_dir = download(data_dir)
        show = sys.stderr.isatty() if progress is None else progress
        checkpoint = train(model_config, config, out_dir, data_dir=data_dir, resume=resume,
                           progress=show, log=click.echo)
    last = checkpoint["history"][-1]
    click.echo(f"done: {out_dir / 'checkpoint.pt'} (test loss {last['test_loss']:.2f} nats/image)")
