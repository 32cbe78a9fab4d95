"""The training loop: Adam on reconstruction + beta * KL, an atomic checkpoint every epoch.

Every epoch draws its shuffle and its epsilons from a generator seeded by (seed, epoch),
so a run resumed from any epoch's checkpoint ends exactly where an uninterrupted run does.

On N ranks (torchrun; training.distributed) every rank draws the same shuffle and epsilons,
and each batch of batch_size images is split into N consecutive parts, one per rank.
DistributedDataParallel averages the ranks' gradients; each rank's loss is its part's sum
scaled by N / batch size, so the average is the gradient of the whole batch's mean, as on one
process: the same recipe and loss curve for any N, up to float rounding.
"""

from __future__ import annotations

import json
import math
import platform
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..runtime.atomic import atomic_file, remove_stale_temporaries
from . import distributed
from .data import ImageRows, Split, TrainingData, fashion_mnist_data
from .model import VAE, VAEConfig, loss_parts

CHECKPOINT_NAME = "checkpoint.pt"
# An early-stopping run's final checkpoint holds the weights of this epoch (1-based) and is over.
KEPT_EPOCH = "kept_epoch"
METRICS_NAME = "metrics.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    beta: float = 1.0
    kl_warmup_epochs: int = 0  # beta ramps linearly from 0 over this many epochs
    seed: int = 0
    subset: int | None = None  # train on this many images (a fixed random subset)
    test_subset: int | None = None  # evaluate on the first this many test images
    lr_schedule: str = "constant"  # or "cosine" (to 0 over all epochs)
    # Optional label-aware objective: + label_weight * cross-entropy of a linear classifier on
    # the sampled z. 0 = a pure (unsupervised) VAE. Uses the catalog's class labels.
    label_weight: float = 0.0
    # Early stopping: > 0 ends the run once the held-out loss has not improved for this many
    # epochs, and the final checkpoint keeps the weights of the epoch with the lowest one.
    patience: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0:
            raise ValueError(f"patience must be >= 0, got {self.patience}")
        if self.lr <= 0 or self.beta < 0 or self.kl_warmup_epochs < 0 or self.label_weight < 0:
            raise ValueError(
                "lr must be > 0, beta >= 0, kl_warmup_epochs >= 0 and label_weight >= 0"
            )
        for name in ("subset", "test_subset"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 images (N, H, W) or (N, C, H, W) -> float32 (N, C, H, W) in [0, 1]."""
    array = np.asarray(images)
    if array.dtype != np.uint8 or array.ndim not in (3, 4):
        raise ValueError(f"images must be uint8 (N, H, W) or (N, C, H, W), got {array.dtype} "
                         f"{array.shape}")
    tensor = torch.from_numpy(array.astype(np.float32) / 255.0)
    return tensor.unsqueeze(1) if array.ndim == 3 else tensor


def subset_rows(n: int, size: int | None, seed: int) -> np.ndarray:
    """A fixed random subset of row numbers (sorted), or all rows."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def beta_at(config: TrainConfig, epoch: int) -> float:
    """beta for 0-based epoch, with the linear KL warm-up."""
    if config.kl_warmup_epochs == 0:
        return config.beta
    return config.beta * min(1.0, (epoch + 1) / config.kl_warmup_epochs)


def lr_at(config: TrainConfig, epoch: int) -> float:
    if config.lr_schedule == "cosine":
        # A plain float: a numpy scalar in the history would break weights_only loading.
        return 0.5 * config.lr * (1.0 + math.cos(math.pi * epoch / config.epochs))
    return config.lr


def to_device(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """to_tensor on the training device (through pinned memory to a GPU)."""
    tensor = to_tensor(images)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


@torch.no_grad()
def mean_loss_parts_at_mu(model: VAE, images, batch_size: int = 1000,
                          device: torch.device | None = None) -> dict:
    """Mean per-image loss parts in nats, encoding with mu (no sampling).

    images: uint8 (N, H, W) or (N, C, H, W), an array or ImageRows, read a batch at a time.
    On N ranks each rank takes every N-th batch and the sums are added up over the ranks.
    """
    model.eval()
    device = device or torch.device("cpu")
    ranks = distributed.current()
    recon_sum = kl_sum = sq_err = 0.0
    for start in range(ranks.rank * batch_size, len(images), ranks.world * batch_size):
        x = to_device(images[start : start + batch_size], device)
        mu, log_var = model.encode(x)
        logits = model.decode_logits(mu)
        recon, kl = loss_parts(logits, x, mu, log_var)
        recon_sum += recon.sum().item()
        kl_sum += kl.sum().item()
        sq_err += (torch.sigmoid(logits) - x).pow(2).mean(dim=(1, 2, 3)).sum().item()
    recon_sum, kl_sum, sq_err = distributed.sum_over_ranks([recon_sum, kl_sum, sq_err], ranks,
                                                           device)
    n = len(images)
    return {"recon": recon_sum / n, "kl": kl_sum / n, "loss": (recon_sum + kl_sum) / n,
            "mse": sq_err / n}


def save_atomic(obj, path: Path) -> None:
    """torch.save, atomically (runtime.atomic.atomic_file)."""
    with atomic_file(path) as handle:
        torch.save(obj, handle)


def write_metrics(history: list[dict], path: Path) -> None:
    """metrics.jsonl, one row per finished epoch, replaced atomically."""
    with atomic_file(path) as handle:
        handle.writelines((json.dumps(row) + "\n").encode("utf-8") for row in history)


def _load_failure(exc: Exception) -> str:
    """One line on why torch.load(weights_only=True) failed.

    torch's own text for a file holding pickled objects advises loading it with
    weights_only=False, which would run whatever code the file carries: that advice is
    never passed on, only what was refused.
    """
    message = str(exc)
    if "weights_only" not in message:
        return " ".join(message.split())
    blocked = re.search(r"GLOBAL ([\w.]+)", message)
    if blocked:
        return (f"it holds a pickled Python object ({blocked.group(1)}) besides tensors and "
                "plain data; refused, unpickling it could run code")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", message)
    return "PyTorch's weights-only reader refuses it" + (
        f" ({detail.group(1).strip()})" if detail else "")


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely (weights_only: no pickle code runs) and check its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError...
        raise ValueError(f"{path}: not a readable vae-edge checkpoint: {_load_failure(exc)}"
                         ) from None
    missing = {"config", "model", "train_config", "epoch", "history"} - set(checkpoint)
    if missing:
        raise ValueError(f"{path}: checkpoint lacks keys {sorted(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict) -> VAE:
    model = VAE(VAEConfig.from_dict(checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model


def _changes(recorded: dict, now: dict) -> str:
    """What differs between two records, one line: "epochs 1 -> 2, csv '/a.csv' -> '/b.csv'"
    (long lists, such as the held-out ids, cut short)."""
    def shown(value) -> str:
        text = repr(value)
        return text if isinstance(value, str) or len(text) <= 70 else text[:60] + " ...]"

    return ", ".join(f"{key} {shown(recorded.get(key))} -> {shown(now.get(key))}"
                     for key in sorted(set(recorded) | set(now), key=str)
                     if recorded.get(key) != now.get(key))


def train(
    model_config: VAEConfig,
    config: TrainConfig,
    out_dir: str | Path,
    data_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log=print,
    splits: tuple[Split, Split] | None = None,
    data: TrainingData | None = None,
    device: str | torch.device = "cpu",
) -> dict:
    """Train, checkpointing into out_dir after every epoch. Returns the final checkpoint.

    data: what to train on (training.catalog_data.catalog_data for a shop's catalog; default
    Fashion-MNIST from data_dir, or the given splits), read and converted a batch at a time.
    device: "cpu", "cuda", "auto" (a GPU when there is one) or a torch.device.
    In a process group (torchrun, training.distributed.join) every rank calls train with the
    same arguments: rank 0 reads the checkpoint it resumes and writes checkpoints and metrics;
    each rank returns the checkpoint as it holds it.
    """
    if data is None:
        data = fashion_mnist_data(data_dir, splits)
    train_rows, test_rows, dataset = _training_rows(model_config, config, data)
    # About a thousand 28x28 images' worth of pixels per evaluation batch, whatever the size.
    eval_batch = max(1, 784_000 // math.prod(data.image_shape))

    ranks = distributed.current()
    if not isinstance(device, torch.device):
        device = distributed.resolve_device(device, ranks.local_rank)
    out_dir = Path(out_dir)
    # Rank 0's file, also where the ranks do not share a disk.
    start = distributed.from_leader(
        _resume_point(out_dir, resume, model_config, config, dataset, ranks, log), ranks)
    model, optimizer, net = _model_and_optimizer(model_config, config, start, device, ranks,
                                                 log)
    history: list[dict] = [] if start is None else list(start["history"])
    if start is not None and ranks.leader:
        # A kill between the checkpoint and the metrics write leaves metrics.jsonl one epoch
        # behind; the checkpoint's history is the record.
        write_metrics(history, out_dir / METRICS_NAME)

    checkpoint = start
    best_model = None if start is None else start.get("best_model")
    first = 0 if start is None else config.epochs if KEPT_EPOCH in start else start["epoch"]
    for epoch in range(first, config.epochs):
        if _stalled(history, config.patience):  # a run stopped early, killed before its end
            break
        started = time.perf_counter()
        sums = _train_epoch(net, model, optimizer, train_rows, model_config, config, epoch,
                            device, ranks, progress)
        test = mean_loss_parts_at_mu(model, test_rows, eval_batch, device)
        history.append(_epoch_row(config, epoch, sums, len(train_rows), test, started))
        best_epoch = _best_epoch(history)
        if config.patience and best_epoch == epoch + 1:
            best_model = {name: value.detach().cpu().clone()
                          for name, value in model.state_dict().items()}
        checkpoint = _checkpoint(model, optimizer, model_config, config, epoch + 1, history,
                                 dataset, ranks, device)
        if config.patience:
            checkpoint["best_model"] = best_model
        if ranks.leader:
            save_atomic(checkpoint, out_dir / CHECKPOINT_NAME)
            write_metrics(history, out_dir / METRICS_NAME)
            row = history[-1]
            log(f"epoch {epoch + 1}/{config.epochs}  train loss {row['train_loss']:.2f} "
                f"(recon {row['train_recon']:.2f}, kl {row['train_kl']:.2f})  test loss "
                f"{row['test_loss']:.2f} (recon {row['test_recon']:.2f}, "
                f"kl {row['test_kl']:.2f})  {row['seconds']:.1f}s")
        if _stalled(history, config.patience):
            if ranks.leader:
                log(f"early stop: the held-out loss has not improved for {config.patience} "
                    f"epochs")
            break
    if config.patience and checkpoint is not None and KEPT_EPOCH not in checkpoint:
        checkpoint = _keep_best(checkpoint)
        if ranks.leader:
            save_atomic(checkpoint, out_dir / CHECKPOINT_NAME)
            log(f"kept the weights of epoch {checkpoint[KEPT_EPOCH]}, the lowest held-out loss "
                f"({checkpoint['history'][checkpoint[KEPT_EPOCH] - 1]['test_loss']:.2f})")
    return checkpoint  # a finished run's checkpoint, as it was


def _best_epoch(history: list[dict]) -> int:
    """The 1-based epoch with the lowest held-out loss (the first of equals)."""
    losses = [row["test_loss"] for row in history]
    return losses.index(min(losses)) + 1


def weights_epoch(checkpoint: dict) -> int:
    """The 1-based epoch whose weights the checkpoint holds: its last, or the one an
    early-stopping run kept."""
    return checkpoint.get(KEPT_EPOCH, checkpoint["epoch"])


def _stalled(history: list[dict], patience: int) -> bool:
    """Early stopping's test: the last `patience` epochs brought no lower held-out loss."""
    return patience > 0 and bool(history) and len(history) - _best_epoch(history) >= patience


def _keep_best(checkpoint: dict) -> dict:
    """The final checkpoint of an early-stopping run: the weights of its best epoch. The
    optimizer state stays the last epoch's; the run is over, nothing resumes it."""
    kept = {key: value for key, value in checkpoint.items() if key != "best_model"}
    kept["model"] = checkpoint["best_model"]
    kept[KEPT_EPOCH] = _best_epoch(checkpoint["history"])
    return kept


def _epoch_row(config: TrainConfig, epoch: int, sums: dict, n_train: int, test: dict,
               started: float) -> dict:
    """An epoch's line of the history and metrics.jsonl: per-image means."""
    return {
        "epoch": epoch + 1,
        "beta": beta_at(config, epoch),
        "lr": lr_at(config, epoch),
        "train_loss": sums["loss"] / n_train,
        "train_recon": sums["recon"] / n_train,
        "train_kl": sums["kl"] / n_train,
        "test_loss": test["loss"],
        "test_recon": test["recon"],
        "test_kl": test["kl"],
        "test_mse": test["mse"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _training_rows(model_config: VAEConfig, config: TrainConfig, data: TrainingData):
    """The rows this run trains and tests on, and the checkpoint's record of the data, once
    the data fits the model and the objective."""
    expected = (model_config.image_channels, model_config.image_size, model_config.image_size)
    if tuple(data.image_shape) != expected:
        raise ValueError(f"the model takes images of shape {expected} (channels, height, width), "
                         f"the data holds {tuple(data.image_shape)}")
    if config.label_weight > 0 and data.train.labels is None:
        raise ValueError("label_weight > 0 needs class labels, and the data has none (a catalog "
                         "CSV gives them in a label column)")
    if config.label_weight > 0 and not model_config.num_classes:
        raise ValueError("label_weight > 0 needs a model with num_classes > 0 (a classifier on z)")
    train_rows: ImageRows = data.train.take(subset_rows(len(data.train), config.subset,
                                                        config.seed))
    test_rows: ImageRows = data.test.take(slice(config.test_subset))
    dataset = data.record | {"train_rows": len(train_rows), "test_rows": len(test_rows)}
    return train_rows, test_rows, dataset


def _resume_point(out_dir: Path, resume: bool, model_config: VAEConfig, config: TrainConfig,
                  dataset: dict, ranks, log) -> dict | None:
    """On rank 0, the checkpoint this run continues (None: it starts from scratch), once it is
    one these options can continue; the other ranks get None (from_leader sends it)."""
    if not ranks.leader:
        return None
    checkpoint_path = out_dir / CHECKPOINT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (CHECKPOINT_NAME, METRICS_NAME):  # a killed run's half-written files
        remove_stale_temporaries(out_dir / name, ".tmp", log)
    if resume and checkpoint_path.is_file():
        start = load_checkpoint(checkpoint_path)
        _check_resumable(start, checkpoint_path, model_config, config, dataset)
        log(f"resuming after epoch {start['epoch']} of {config.epochs} from {checkpoint_path}"
            + (f" (written by {start.get('world_size', 1)} ranks)"
               if start.get("world_size", 1) != ranks.world else ""))
        return start
    if resume:
        log(f"--resume: no checkpoint in {out_dir}, starting from scratch")
    elif checkpoint_path.exists():
        raise FileExistsError(
            f"{checkpoint_path} exists: pass --resume to continue it, or choose another --out")
    return None


def _model_and_optimizer(model_config: VAEConfig, config: TrainConfig, start: dict | None,
                         device: torch.device, ranks, log):
    """The model (seeded, or the checkpoint's) on its device, its Adam optimizer, and the
    module a step runs: the model, or its DistributedDataParallel wrapper on several ranks."""
    torch.manual_seed(config.seed)
    model = VAE(model_config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    if start is not None:
        model.load_state_dict(start["model"])
    model.to(device)
    if start is not None:  # after the move: Adam's state follows its parameters' device
        optimizer.load_state_dict(start["optimizer"])
    net = model
    if ranks.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # A classifier that no loss term uses gets no gradient: DDP must be told to expect it.
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=model.classifier is not None and config.label_weight == 0)
    if ranks.world > 1 or device.type != "cpu":
        log(f"training on {ranks.world} rank{'s' if ranks.world > 1 else ''} ({device.type}"
            + (f", {dist.get_backend()}" if ranks.world > 1 else "")
            + f"): a batch of {config.batch_size} is "
            + (f"{-(-config.batch_size // ranks.world)} or fewer images per rank"
               if ranks.world > 1 else "one step"))
    return model, optimizer, net


def _train_epoch(net, model: VAE, optimizer, train_rows: ImageRows, model_config: VAEConfig,
                 config: TrainConfig, epoch: int, device: torch.device, ranks,
                 progress: bool) -> dict:
    """One epoch of steps; the sums over every rank's images of the loss and its parts."""
    from tqdm import tqdm

    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    beta = beta_at(config, epoch)
    for group in optimizer.param_groups:
        group["lr"] = lr_at(config, epoch)
    model.train()
    order = torch.randperm(len(train_rows), generator=generator).numpy()
    sums = {"loss": 0.0, "recon": 0.0, "kl": 0.0}
    batches = range(0, len(order), config.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
               disable=not progress or not ranks.leader, leave=False)
    for start_row in bar:
        batch = order[start_row : start_row + config.batch_size]
        # The whole batch's epsilons, drawn on the CPU whatever the device (the same noise
        # on a GPU), and this rank's consecutive part of the batch.
        eps = torch.randn((len(batch), model_config.latent_dim), generator=generator)
        bounds = np.linspace(0, len(batch), ranks.world + 1).round().astype(int)
        rows = slice(bounds[ranks.rank], bounds[ranks.rank + 1])
        part, eps = batch[rows], eps[rows].to(device)
        x = to_device(train_rows[part], device)
        logits, mu, log_var, z = net(x, eps=eps)
        recon, kl = loss_parts(logits, x, mu, log_var)
        loss = _batch_mean(recon + beta * kl, len(batch), ranks.world)
        if config.label_weight > 0:
            labels = torch.from_numpy(train_rows.labels_at(part)).to(device)
            loss = loss + config.label_weight * _batch_mean(
                F.cross_entropy(model.classifier(z), labels, reduction="none"), len(batch),
                ranks.world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sums["loss"] += (recon + kl).sum().item()
        sums["recon"] += recon.sum().item()
        sums["kl"] += kl.sum().item()
        if ranks.world == 1:
            bar.set_postfix(loss=f"{loss.item():.1f}")
    bar.close()
    return dict(zip(sums, distributed.sum_over_ranks(list(sums.values()), ranks, device)))


def _checkpoint(model: VAE, optimizer, model_config: VAEConfig, config: TrainConfig,
                epochs_done: int, history: list[dict], dataset: dict, ranks,
                device: torch.device) -> dict:
    return {
        "format": "vae-edge-checkpoint",
        "config": model_config.to_dict(),
        "train_config": asdict(config),
        "model": {name: value.cpu() for name, value in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "epoch": epochs_done,
        "history": history,
        "dataset": dataset,
        "versions": {"torch": str(torch.__version__), "python": platform.python_version()},
        "world_size": ranks.world,
        "device": device.type,
    }


def _batch_mean(values: torch.Tensor, batch_size: int, world: int) -> torch.Tensor:
    """The batch's mean of per-image values, as this rank's share: DDP averages the ranks'
    gradients, so each rank's sum is scaled by world / batch_size (parts may differ in size)."""
    if world == 1:
        return values.mean()
    return values.sum() * (world / batch_size)


def _check_resumable(checkpoint: dict, path: Path, model_config: VAEConfig, config: TrainConfig,
                     dataset: dict) -> None:
    changed = _changes({**checkpoint["config"], **checkpoint["train_config"]},
                       {**model_config.to_dict(), **asdict(config)})
    if changed:
        raise ValueError(f"{path} was made with another configuration; resume "
                         f"with the same options (recorded -> now: {changed})")
    changed = _changes(checkpoint.get("dataset") or {}, dataset or {})
    if changed:
        raise ValueError(f"{path} was made from other data; resume with the same "
                         f"data and options (recorded -> now: {changed})")
