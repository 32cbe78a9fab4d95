import json
import os
import re

import numpy as np
import pytest
import torch

from vae_edge.training.data import Split
from vae_edge.training.model import VAEConfig
from vae_edge.training.train import (
    TrainConfig,
    beta_at,
    load_checkpoint,
    mean_loss_parts_at_mu,
    model_from_checkpoint,
    to_tensor,
    train,
)

MODEL = VAEConfig(latent_dim=4, channels=(4, 8), hidden_dim=16)


@pytest.fixture(scope="module")
def splits():
    rng = np.random.default_rng(0)
    make = lambda n: Split(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),  # noqa: E731
                           rng.integers(0, 10, n, dtype=np.uint8), {"fake": "0"})
    return make(300), make(50)


def quiet(message):
    pass


@pytest.mark.slow
def test_resume_ends_where_an_uninterrupted_run_ends(tmp_path, splits):
    config = TrainConfig(epochs=3, batch_size=32, seed=7, kl_warmup_epochs=2)
    straight = train(MODEL, config, tmp_path / "a", splits=splits, progress=False, log=quiet)

    partial_dir = tmp_path / "b"
    short = TrainConfig(**{**config.__dict__, "epochs": 1})
    train(MODEL, short, partial_dir, splits=splits, progress=False, log=quiet)
    # Pretend the run was meant to last 3 epochs and was killed after the first.
    checkpoint = load_checkpoint(partial_dir / "checkpoint.pt")
    checkpoint["train_config"]["epochs"] = 3
    torch.save(checkpoint, partial_dir / "checkpoint.pt")
    resumed = train(MODEL, config, partial_dir, splits=splits, resume=True, progress=False,
                    log=quiet)

    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(straight["history"]) == strip(resumed["history"])
    lines = (partial_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]


@pytest.mark.slow
def test_metrics_are_finite_and_decreasing(tmp_path, splits):
    checkpoint = train(MODEL, TrainConfig(epochs=2, batch_size=32), tmp_path, splits=splits,
                       progress=False, log=quiet)
    first, last = checkpoint["history"]
    for key in ("train_loss", "train_recon", "train_kl", "test_loss", "test_recon", "test_kl"):
        assert np.isfinite(last[key])
    assert last["test_loss"] == pytest.approx(last["test_recon"] + last["test_kl"])
    assert last["train_loss"] < first["train_loss"]


@pytest.mark.slow
def test_refuses_to_overwrite_and_checks_resume_config(tmp_path, splits):
    config = TrainConfig(epochs=1, batch_size=64)
    train(MODEL, config, tmp_path, splits=splits, progress=False, log=quiet)
    with pytest.raises(FileExistsError, match="exists: pass --resume to continue it"):
        train(MODEL, config, tmp_path, splits=splits, progress=False, log=quiet)
    with pytest.raises(ValueError, match="was made with another configuration"):
        train(MODEL, TrainConfig(epochs=1, batch_size=32), tmp_path, splits=splits,
              resume=True, progress=False, log=quiet)


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only(tmp_path, splits):
    train(MODEL, TrainConfig(epochs=2, lr_schedule="cosine", kl_warmup_epochs=2), tmp_path,
          splits=splits, progress=False, log=quiet)
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert checkpoint["config"] == MODEL.to_dict()
    assert set(checkpoint) >= {"config", "model", "optimizer", "epoch", "history"}


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable vae-edge checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


class RunsCode:
    """Pickles as a call to os.system: what a hostile checkpoint carries."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def test_checkpoint_carrying_code_is_refused_in_one_line(tmp_path):
    from click.testing import CliRunner

    from vae_edge.export.cli import main as export_main

    path, sentinel = tmp_path / "checkpoint.pt", tmp_path / "pwned"
    torch.save({"config": RunsCode(sentinel), "model": {}}, path)
    with pytest.raises(ValueError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert re.fullmatch(
        f"{re.escape(str(path))}: not a readable vae-edge checkpoint: it holds a pickled "
        r"Python object \((posix|nt)\.system\) besides tensors and plain data; refused, "
        "unpickling it could run code", message), message
    result = CliRunner().invoke(export_main, [str(path), "-o", str(tmp_path / "bundle")])
    assert result.exit_code == 2
    assert result.output == f"Error: {message}\n"  # one line, and no advice to unpickle it
    assert "weights_only" not in result.output
    assert not sentinel.exists()


def test_kl_warmup():
    config = TrainConfig(beta=0.5, kl_warmup_epochs=4)
    assert [beta_at(config, e) for e in range(5)] == [0.125, 0.25, 0.375, 0.5, 0.5]


@pytest.mark.slow
def test_label_weight_trains_a_classifier_on_z(tmp_path, splits):
    labelled = VAEConfig(latent_dim=4, channels=(4, 8), hidden_dim=16, num_classes=10)
    config = TrainConfig(epochs=1, batch_size=32, label_weight=1.0)
    checkpoint = train(labelled, config, tmp_path, splits=splits, progress=False, log=quiet)
    assert checkpoint["model"]["classifier.weight"].shape == (10, 4)
    assert checkpoint["config"]["num_classes"] == 10
    with pytest.raises(ValueError, match="label_weight > 0 needs a model with num_classes > 0"):
        train(MODEL, config, tmp_path / "b", splits=splits, progress=False, log=quiet)


def test_to_tensor_adds_the_channel_axis_of_grayscale_images():
    gray = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)  # (1, 2, 2)
    assert torch.equal(to_tensor(gray), torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]]))
    colour = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    tensor = to_tensor(colour)
    assert tensor.shape == (2, 3, 4, 4) and tensor.dtype == torch.float32
    assert torch.equal(tensor * 255, torch.from_numpy(colour.astype(np.float32)))
    with pytest.raises(ValueError, match=r"images must be uint8 \(N, H, W\) or \(N, C, H, W\), "
                       r"got float32 \(2, 2\)"):
        to_tensor(np.zeros((2, 2), dtype=np.float32))


def test_model_and_data_shapes_must_agree(tmp_path, splits):
    colour = VAEConfig(latent_dim=4, channels=(4, 8), hidden_dim=16, image_channels=3)
    with pytest.raises(ValueError, match=r"the model takes images of shape \(3, 28, 28\) "
                       r"\(channels, height, width\), the data holds \(1, 28, 28\)"):
        train(colour, TrainConfig(epochs=1), tmp_path / "run", splits=splits, log=quiet)
    assert not (tmp_path / "run").exists()


def test_early_stopping_ends_the_run_with_its_best_epoch(tmp_path, splits):
    # Random pictures: the held-out loss stops improving within a few epochs.
    config = TrainConfig(epochs=30, batch_size=32, lr=1e-2, patience=2)
    said = []
    result = train(MODEL, config, tmp_path, splits=splits, progress=False, log=said.append)
    losses = [row["test_loss"] for row in result["history"]]
    kept = result["kept_epoch"]
    assert kept == losses.index(min(losses)) + 1
    assert len(losses) < config.epochs and len(losses) - kept == config.patience
    assert any("early stop" in line for line in said)
    assert f"kept the weights of epoch {kept}" in said[-1]

    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert "best_model" not in saved and saved["kept_epoch"] == kept
    again = mean_loss_parts_at_mu(model_from_checkpoint(saved), splits[1].images)
    assert again["loss"] == pytest.approx(losses[kept - 1], rel=1e-5)

    resumed = train(MODEL, config, tmp_path, splits=splits, resume=True, progress=False,
                    log=quiet)
    assert resumed["history"] == result["history"]  # the run is over: nothing more trains
    for name, tensor in saved["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
