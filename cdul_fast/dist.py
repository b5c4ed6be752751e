"""torch.distributed for `label` and `train` under ``torchrun`` (one node or many: the same code path).

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous (MASTER_ADDR/PORT); a command started without
them is world size 1 and never touches torch.distributed. Collectives on CPU data (row gathers, errors, counts) go
through a gloo group, so they work the same next to NCCL on GPUs and in CI's CPU-only gloo runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

from . import errors
from .errors import ConfigError

T = TypeVar("T")

TIMEOUT = timedelta(hours=24)
"""How long a rank waits for the others at a collective: labelling shards finish at different times (a slow disk, an
uneven last part), so the default 30 minutes would abort healthy runs; a dead rank is caught by torchrun itself."""


@dataclass(frozen=True)
class World:
    """This process's place in the job; ``size == 1`` is a plain single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: object = None  # the gloo group for CPU collectives (None when size == 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def main_log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0, silence elsewhere: rank 0 speaks for the job (errors are still raised everywhere)."""
        return log if self.is_main else _silent

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as tdist

            tdist.barrier(group=self.group)

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj`` (picklable: numpy arrays, dicts), in rank order."""
        if not self.distributed:
            return [obj]
        import torch.distributed as tdist

        out: list = [None] * self.size
        tdist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as tdist

        box = [obj]
        tdist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def on_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` on rank 0 only, its result on every rank; an error there is raised on every rank with the same
        one-line message (so each exits with code 2 instead of waiting for a rank that already gave up)."""
        result, failure = None, None
        if self.is_main:
            try:
                result = fn()
            except errors.CdulError as exc:
                failure = (type(exc).__name__, str(exc))
                if not self.distributed:
                    raise
            except BaseException:
                if self.distributed:
                    self.broadcast((None, ("CdulError", "rank 0 failed (its error is above)")))
                raise
        result, failure = self.broadcast((result, failure))
        if failure is not None:
            exc = getattr(errors, failure[0], errors.CdulError)(failure[1])
            exc.from_rank0 = not self.is_main  # printed once, by rank 0
            raise exc
        return result

    def rows_of(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (np.array_split's sizes: the first ranks get one more)."""
        q, r = divmod(n, self.size)
        lo = self.rank * q + min(self.rank, r)
        return slice(lo, lo + q + (1 if self.rank < r else 0))


SINGLE = World()


def _silent(_: str) -> None:
    pass


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun); a value that is not a positive integer is refused."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(raw)
    except ValueError:
        size = 0
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not a positive integer (set by torchrun; unset it for one process)")
    return size


def env_rank() -> int:
    """RANK as torchrun sets it (0 without torchrun): which process prints a command's summary."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextmanager
def world(backend: str = "gloo") -> Iterator[World]:
    """The job's World for the duration of a command: a process group when torchrun started several processes
    (destroyed on exit, error or not), the single-process World otherwise (or when the group already exists)."""
    size = env_world_size()
    if size == 1:
        yield SINGLE
        return
    import torch.distributed as tdist

    if not tdist.is_available():
        raise ConfigError("this torch build has no torch.distributed: run one process (without torchrun)")
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start the command with torchrun "
                          "(torchrun --nproc-per-node N -m cdul_fast ...)")
    owned = not tdist.is_initialized()
    if owned:
        if backend == "nccl":  # NCCL binds each process to its GPU before the group exists
            import torch

            if int(os.environ["LOCAL_RANK"]) < torch.cuda.device_count():  # else rank_device says why, in one line
                torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        tdist.init_process_group(backend=backend, timeout=TIMEOUT)
    group = tdist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else tdist.group.WORLD
    try:
        yield World(rank=tdist.get_rank(), size=tdist.get_world_size(), local_rank=int(os.environ["LOCAL_RANK"]),
                    group=group)
        if owned:  # a command that ended well: no rank tears the group down while another still talks to it
            tdist.barrier(group=group)
    finally:
        if owned:
            tdist.destroy_process_group()


def rank_device(name: str, w: World):
    """``--device`` for this rank: ``auto``/``cuda`` become cuda:LOCAL_RANK under torchrun (one GPU per process)."""
    import torch

    from ._backend import has_cuda, resolve_device

    if w.distributed and name.startswith("cuda:"):
        raise ConfigError(f"--device {name} under torchrun: every process takes cuda:LOCAL_RANK; pass --device cuda "
                          "(or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if w.distributed and (name == "cuda" or (name == "auto" and has_cuda())):
        if not has_cuda() or w.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"rank {w.rank} wants cuda:{w.local_rank} but torch sees "
                              f"{torch.cuda.device_count() if has_cuda() else 0} CUDA devices on this node: use "
                              "--nproc-per-node <= the GPU count")
        torch.cuda.set_device(w.local_rank)
        return torch.device("cuda", w.local_rank)
    return resolve_device(name)

