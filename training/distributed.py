"""Where a run trains: the device, and the ranks torchrun started (torch.distributed).

`torchrun --nproc-per-node N $(which vae-train) ...` starts N processes and tells each its
place through RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The CLI joins them
into one process group (nccl on GPUs, gloo on CPUs); the library (train, build_bundle) works
with whatever group its caller has set up, and alone when there is none.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEVICES = ("auto", "cpu", "cuda")
# How long a rank waits for the others (a collective, or the photo cache another rank is
# building) before the job ends with an error instead of hanging; torch's own default.
DEFAULT_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run; Ranks() is a run of one process."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0  # the rank among those on this machine (it picks the GPU)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that reads and writes the run's files."""
        return self.rank == 0


def current() -> Ranks:
    """The ranks of the process group the caller set up, or Ranks() when there is none."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(),
                 int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> the GPU when PyTorch sees one, else the CPU; "cuda" -> this rank's GPU."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: PyTorch sees no CUDA GPU here (a CPU-only torch build "
                         "or no driver); expected one, use --device cpu or auto")
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"local rank {local_rank} needs GPU {local_rank}, and PyTorch sees "
                         f"{torch.cuda.device_count()}; expected at most one rank per GPU "
                         "(--nproc-per-node)")
    return torch.device("cuda", local_rank)


def join(device: str, timeout: float = DEFAULT_TIMEOUT) -> tuple[Ranks, torch.device]:
    """For a command-line entry point: the ranks torchrun started and this rank's device.

    Under torchrun with WORLD_SIZE > 1 this joins the process group (nccl on a GPU, gloo on a
    CPU) and, on a GPU, makes this rank's GPU the current one: process-wide settings, which is
    why only the CLIs call it. Without torchrun it changes nothing.
    """
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout:g}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), resolve_device(device)
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    where = resolve_device(device, ranks.local_rank)
    if where.type == "cuda":
        torch.cuda.set_device(where)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if where.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return ranks, where


def leave() -> None:
    """Leave the process group join() set up, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def joined(device: str, timeout: float = DEFAULT_TIMEOUT) -> Iterator[tuple[Ranks, torch.device]]:
    """For a CLI: join(), then leave() at the end; a lost rank ends this one with one line."""
    from ..runtime.cli_errors import CliError, library_errors

    with library_errors():
        ranks, where = join(device, timeout)
    try:
        yield ranks, where
    except RuntimeError as exc:
        if not lost_ranks(exc):
            raise
        raise CliError(f"rank {ranks.rank} of {ranks.world} lost the others: "
                       f"{' '.join(str(exc).split()) or type(exc).__name__}; another rank "
                       "stopped (its log says why) or the network between them failed"
                       ) from None
    finally:
        leave()


@contextmanager
def one_per_machine_first(ranks: Ranks) -> Iterator[None]:
    """Local rank 0 runs the block first (building a cache on its machine) while the others on
    that machine wait; then they run it (reusing the cache)."""
    if ranks.world > 1 and ranks.local_rank != 0:
        dist.barrier()
    yield
    if ranks.world > 1 and ranks.local_rank == 0:
        dist.barrier()


def from_leader(obj, ranks: Ranks):
    """Rank 0's obj on every rank (any picklable object; plain data and CPU tensors)."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(values: list[float], ranks: Ranks, device: torch.device) -> list[float]:
    """Each value summed over the ranks, in float64."""
    if ranks.world == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def everyone(obj, ranks: Ranks) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def gather_to_leader(obj, ranks: Ranks) -> list | None:
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None on the others."""
    if ranks.world == 1:
        return [obj]
    out = [None] * ranks.world if ranks.leader else None
    dist.gather_object(obj, out, dst=0)
    return out


def lost_ranks(exc: BaseException) -> bool:
    """Whether exc is a collective that failed: a rank stopped, or the network between them.
    gloo reports it as a plain RuntimeError, raised from torch.distributed's code."""
    if isinstance(exc, dist.DistError):
        return True
    if not isinstance(exc, RuntimeError) or exc.__traceback__ is None:
        return False
    frame = exc.__traceback__
    while frame.tb_next is not None:
        frame = frame.tb_next
    return "torch/distributed/" in frame.tb_frame.f_code.co_filename.replace("\\", "/")
