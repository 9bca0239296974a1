"""Processes launched by ``torchrun``: joining the process group, agreeing, and splitting
sampling work by image index.

``ddpm train``, ``ddpm sample`` and ``ddpm eval`` all start here. One process (no ``torchrun``,
or ``WORLD_SIZE`` 1) is a :class:`Dist` of world 1, for which every function below is a no-op,
so the commands have one code path. Training splits each batch over the ranks
(:mod:`ddpm.train.loop`); sampling gives rank r a contiguous block of image indices
(:func:`shard`), and because every image is seeded by its index alone
(:func:`ddpm.core.samplers.image_seed`) the gathered images are those of a single process.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ..errors import DDPMError
from .policy import resolve_device

T = TypeVar("T")

__all__ = ["Dist", "init_distributed", "process_group", "lost_peer", "any_rank", "from_rank_0", "on_rank_0", "shard", "gather_images"]


@dataclass(frozen=True)
class Dist:
    """This process's place among the ``world`` processes torchrun started (rank 0 writes)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one process that writes files and prints."""
        return self.rank == 0


def init_distributed(device_pref: str | None) -> Dist:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1), else return a
    single process's :class:`Dist`.

    Each rank takes its own GPU (``--device`` read by :func:`ddpm.runtime.policy.resolve_device` with the
    rank's ``LOCAL_RANK``) and NCCL; CPU ranks use gloo. A peer that dies turns into an error on
    the others after ``DDPM_DIST_TIMEOUT_MIN`` minutes (default 10) instead of a hang. Raises
    :class:`~ddpm.errors.DDPMError` (from ``resolve_device``) for a device this rank cannot use.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank=local_rank, world=world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("DDPM_DIST_TIMEOUT_MIN", "10"))))
    return Dist(rank, world, local_rank)


@contextlib.contextmanager
def process_group(device_pref: str | None, *, meet_at_exit: bool = True) -> Iterator[Dist]:
    """:func:`init_distributed` for the length of a command; the group is destroyed on any exit.

    ``meet_at_exit``: on a clean exit the ranks meet once more, so that none tears the group down
    while rank 0 still uses it (training: rank 0 draws the last grid alone). Sampling and
    evaluation pass False: their last collective is the gather, after which rank 0 scores and
    writes alone for as long as that takes, with no rank waiting on a collective's timeout.
    """
    d = init_distributed(device_pref)
    finished = False
    try:
        yield d
        finished = True
    finally:
        if d.world > 1 and dist.is_initialized():
            if finished and meet_at_exit:
                dist.barrier()
            dist.destroy_process_group()


# What a collective's error says when the transport to a peer is gone (gloo, NCCL, the store).
_TRANSPORT_FAILURES = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
                       "socket timeout", "timed out", "nccl communicator was aborted", "nccl error",
                       "nccl watchdog", "recvbytes", "sendbytes")


def lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is how a collective fails when another process of the group has ended,
    been killed or stopped answering: torch's ``DistError`` family (backend, network, store
    errors), or a ``RuntimeError`` carrying a transport failure (gloo raises those from
    ``backward()``'s all-reduce). A caller turns it into one line instead of a traceback that
    points at the network."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(k in str(error).lower() for k in _TRANSPORT_FAILURES)


def any_rank(flag: bool, d: Dist, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any: ranks must take the same branch."""
    if d.world == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def from_rank_0(value: Any, d: Dist) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object; one process gets its own back), so
    that the ranks act on one decision, e.g. which checkpoint is the newest while a training run
    may be writing the next one."""
    if d.world == 1:
        return value
    box = [value if d.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank_0(d: Dist, device: torch.device, fn: Callable[[], T], what: str) -> T | None:
    """The rank-0 protocol, written once: rank 0 runs ``fn`` (the other ranks do not), and every
    rank learns whether it failed, so that all stop together instead of waiting at the next
    collective for a rank that has gone.

    Returns ``fn()``'s result on rank 0 and None on the others. A :class:`DDPMError` raised by
    ``fn`` is raised again on rank 0; every other rank raises ``DDPMError("rank 0 could not
    {what} (its message says why)")``. Other exceptions are bugs and propagate on rank 0 alone.
    With one process it is ``fn()``.
    """
    if d.world == 1:
        return fn()
    result: T | None = None
    failed: DDPMError | None = None
    if d.main:
        try:
            result = fn()
        except DDPMError as e:
            failed = e
    if any_rank(failed is not None, d, device):
        raise failed or DDPMError(f"rank 0 could not {what} (its message says why)")
    return result


def shard(n: int, d: Dist) -> range:
    """The image indices rank ``d.rank`` draws of ``n``: a contiguous block, the blocks of all
    ranks covering ``0 .. n-1`` in order, their sizes differing by at most one (a rank may get
    none when ``n`` is smaller than the world)."""
    return range(n * d.rank // d.world, n * (d.rank + 1) // d.world)


def gather_images(local: torch.Tensor, n: int, d: Dist, device: torch.device) -> torch.Tensor | None:
    """All ``n`` images on rank 0, in index order, from each rank's block of :func:`shard`.

    ``local`` is this rank's uint8 [m, C, H, W] (any device; ``m = len(shard(n, d))``). Rank 0
    gets uint8 [n, C, H, W] on the CPU, the other ranks None; one process gets ``local`` back
    on the CPU. The blocks travel to rank 0 alone (``dist.gather``: the other ranks hold only
    their own) through ``device`` (the rank's GPU under NCCL, the CPU under gloo), padded to the
    largest block so that one collective carries them.
    """
    if d.world == 1:
        return local.cpu()
    sizes = [len(shard(n, Dist(r, d.world))) for r in range(d.world)]
    width = max(sizes)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    blocks = [torch.empty_like(padded) for _ in range(d.world)] if d.main else None
    dist.gather(padded, gather_list=blocks, dst=0)
    if blocks is None:
        return None
    return torch.cat([b[:m].cpu() for b, m in zip(blocks, sizes)])
