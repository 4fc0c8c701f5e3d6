"""Run-time setup shared by the pipelines: this process's place among the ranks, its device, the process group,
the environment for child `align` processes, and the progress display."""

import os
import signal
import socket
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from rich.progress import (BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from align.backbones.llm import cpu_accelerator_without_gpu
from align.errors import AlignError, SharedError

RENDEZVOUS_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the launcher's processes (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """True on the rank that writes shared files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (no-op alone)."""
        if self.world > 1:
            dist.barrier()

    def decide(self, decision):
        """`decision()` as rank 0 takes it, on every rank: a choice read from files is made once and shared, so
        ranks on nodes that do not share a folder never disagree."""
        outcome = [None]
        if self.main:
            try:
                outcome = [("value", decision())]
            except AlignError as exc:  # every rank fails alike, rather than the others waiting forever
                outcome = [("error", str(exc))]
        if self.world > 1:
            dist.broadcast_object_list(outcome, src=0)
        kind, value = outcome[0]
        if kind == "error":
            raise SharedError(value)
        return value

    def all(self, flag: bool) -> bool:
        """True when `flag` holds on every rank."""
        return self.sum([int(bool(flag))])[0] == self.world

    def fail_together(self, problem: str | None, elsewhere: str) -> None:
        """Collective: raise on every rank when any rank had a `problem` (that rank says it, the others `elsewhere`),
        so no rank is left waiting for one that stopped."""
        everyone_ok = self.all(problem is None)
        if problem:
            raise AlignError(problem)
        if not everyone_ok:
            raise SharedError(elsewhere)

    def sees_rank0_files(self, folder: Path) -> bool:
        """Whether every rank sees the files rank 0 writes in `folder` (a folder shared by all nodes)."""
        if self.world == 1:
            return True
        probe = self.decide(lambda: f".align-shared-{os.getpid()}-{time.time_ns()}")
        if self.main:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / probe).write_text("")
        self.barrier()
        seen = self.all((folder / probe).is_file())
        self.barrier()
        if self.main:
            (folder / probe).unlink(missing_ok=True)
        return seen

    def close(self) -> None:
        """End the process group of a multi-process job, so no rank exits while its communication threads run."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()

    def sum_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """Counts by name (rejects by reason, say) summed over ranks; every rank gets the total."""
        if self.world == 1:
            return dict(counts)
        everyone: list = [None] * self.world
        dist.all_gather_object(everyone, dict(counts))
        return dict(sum(map(Counter, everyone), Counter()))

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sum over ranks."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.long)
        dist.all_reduce(tensor)
        return tensor.tolist()


def die_with_parent(*_) -> None:
    """Make this (worker) process end when the process that started it dies, even by SIGKILL: an orphan decode or
    render worker would otherwise run on, holding memory and files (Linux; elsewhere torch's own watchdog)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A TCP port free on this host now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(*, always: bool = False, deepspeed: bool = False) -> Ranks:
    """Read the rank environment (one process when there is none), set this rank's GPU, and start the process group
    (nccl on GPU, gloo on CPU) when there are several processes, or `always` (DeepSpeed needs one even alone);
    `deepspeed` starts it through DeepSpeed's communication layer."""
    cpu_accelerator_without_gpu()
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    if torch.cuda.is_available():
        torch.cuda.set_device(ranks.local_rank)
    if deepspeed:
        # DeepSpeed's ZeRO-3 calls collectives torch has renamed; the warnings would bury the progress bar.
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
        if not torch.cuda.is_available():
            compile_no_deepspeed_ops()
    if (always or ranks.world > 1) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if deepspeed:
            import deepspeed as ds

            ds.init_distributed(dist_backend=backend, verbose=False)
        else:
            dist.init_process_group(backend)
    return ranks


def compile_no_deepspeed_ops() -> None:
    """On CPU, tell DeepSpeed that none of its C++ ops is available, before it probes them: it then communicates
    through gloo instead of JIT-compiling its shared-memory op (a C++ compiler, minutes, a lock shared by every
    environment on the host). The projector trains with torch's own AdamW, so no op is needed. DeepSpeed keeps this
    table in `deepspeed.ops.__compatible_ops__` for exactly such edits."""
    import deepspeed.ops

    if "__compatible_ops__" not in vars(deepspeed.ops):
        deepspeed.ops.__compatible_ops__ = {}


def local_device(device: str | torch.device | None = None) -> torch.device:
    """`device` when given, else this rank's GPU (LOCAL_RANK), else the CPU."""
    if device is not None:
        try:
            chosen = torch.device(device)
        except RuntimeError:
            raise AlignError(f"--device {device}: expected cpu, cuda or cuda:N") from None
        if chosen.type == "cuda" and not torch.cuda.is_available():
            raise AlignError(f"--device {device}: no CUDA GPU is available here; use --device cpu")
        return chosen
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    return torch.device("cpu")


def child_environment() -> dict[str, str]:
    """os.environ without the rendezvous variables an in-process run set, so a child `align` starts its own group."""
    return {k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARIABLES}


class RateColumn(ProgressColumn):
    """How many `unit`s per second the task advances (rich's own speed estimate)."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"- {self.unit}/s")
        return Text(f"{speed:.3g} {self.unit}/s" if speed >= 0.1 else f"{1 / speed:.3g} s/{self.unit}")


def progress_columns(label: str, *fields: str, unit: str | None = None) -> list[ProgressColumn]:
    """The progress display every long job shows: label, bar, done/total, its own fields, the rate in `unit`s per
    second (when given), elapsed time and the time left."""
    return [TextColumn(label), BarColumn(), MofNCompleteColumn(), *(TextColumn(f) for f in fields),
            *([RateColumn(unit)] if unit else []), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
