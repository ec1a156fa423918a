"""Fits over several processes with ``torch.distributed``: shards of subjects, gathered moments.

A fit runs distributed when a process group is initialized, or when the
``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``) is set, in which case the group is initialized here with
the ``"nccl"`` backend for a CUDA fit and ``"gloo"`` on the CPU.

- **Shards.** The ``S`` subjects are split into contiguous shards in subject
  order: rank ``r`` of ``W`` runs the E-steps of subjects
  ``r S // W`` to ``(r + 1) S // W - 1`` (:func:`shard`), on its own device
  (``cuda:LOCAL_RANK``, or the CPU).
- **Exchange.** After every E-step the ranks all-gather the per-subject
  posterior moments in subject order (:meth:`Context.gather`), so every rank
  runs the same M-step on the moments of all subjects and holds the same
  result.  The moments are ``O(S P^2)`` numbers, small next to the data.
- :func:`local` runs code (the independent fits of ``recover`` and
  ``identify``) in one process, ignoring the process group.
- :func:`launch` starts ``K`` local processes (``torch.multiprocessing``),
  as ``torchem fit --nproc K`` and the tests do.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import socket
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["Context", "context", "local", "shard", "launch", "free_port", "is_writer", "in_group", "local_device",
           "TORCHRUN_VARS"]

#: Environment variables ``torchrun`` sets for every process.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")

_LOCAL = [0]  # depth of nested local() blocks


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within this block fits run in this process only, whatever process group exists."""
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def shard(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(lo, hi)``: rank ``rank`` of ``world_size`` holds items ``lo <= i < hi`` of ``n`` (contiguous, in order).

    Shards differ in size by at most one item; every rank gets ``n // world_size`` or one more.
    """
    return rank * n // world_size, (rank + 1) * n // world_size


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def local_device(device: torch.device) -> torch.device:
    """This process's device under ``torchrun``: ``cuda:LOCAL_RANK`` for a CUDA device without an index."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@dataclass
class Context:
    """The process group a fit runs in: ``rank`` of ``world_size``, and the device collectives use."""

    rank: int
    world_size: int
    device: torch.device

    def shard(self, n: int) -> tuple[int, int]:
        """This rank's ``(lo, hi)`` of ``n`` items (see :func:`shard`)."""
        return shard(n, self.rank, self.world_size)

    def gather(self, tensors: Sequence[torch.Tensor], n: int) -> list[torch.Tensor]:
        """All-gather every rank's shard rows of ``tensors`` into ``n`` rows in rank (= subject) order.

        Parameters
        ----------
        tensors : sequence of Tensor
            This rank's ``(n_r, ...)`` rows, ``n_r`` the size of its shard of ``n`` (:meth:`shard`).
        n : int
            Rows in all.

        Returns
        -------
        list of Tensor
            ``(n, ...)`` each, identical on every rank.  Tensors of one dtype travel together in one
            collective (bool as ``uint8``); shards are padded to the largest one.
        """
        width = -(-n // self.world_size)
        sizes = [hi - lo for lo, hi in (shard(n, r, self.world_size) for r in range(self.world_size))]
        out: list[torch.Tensor | None] = [None] * len(tensors)
        groups: dict[torch.dtype, list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(t.dtype, []).append(i)
        for dtype, members in groups.items():
            wire = torch.uint8 if dtype == torch.bool else dtype
            flat = [tensors[i].reshape(tensors[i].shape[0], -1).to(wire) for i in members]
            cols = [f.shape[1] for f in flat]
            buf = torch.cat(flat, 1) if len(flat) > 1 else flat[0]
            rows = buf.shape[0]
            pad = torch.zeros(width, buf.shape[1], dtype=wire, device=self.device)
            pad[:rows] = buf.to(self.device)
            parts = [torch.empty_like(pad) for _ in range(self.world_size)]
            dist.all_gather(parts, pad)
            full = torch.cat([p[:s] for p, s in zip(parts, sizes)])
            for i, piece in zip(members, full.split(cols, 1)):
                t = tensors[i]
                out[i] = piece.to(dtype).to(t.device).reshape(n, *t.shape[1:])
        return out  # type: ignore[return-value]

    def all_reduce_max(self, value: int) -> int:
        """The largest ``value`` over the ranks (a host sync; used for error flags)."""
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._object_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order (picklable objects)."""
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


_INITIALIZED_HERE = [False]


def _init_from_env(device: torch.device) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=_env_world())
    _INITIALIZED_HERE[0] = True
    atexit.register(_destroy)


def _destroy() -> None:
    if _INITIALIZED_HERE[0] and dist.is_initialized():
        dist.destroy_process_group()
        _INITIALIZED_HERE[0] = False


def context(device: torch.device | str = "cpu") -> Context | None:
    """The process group a fit on ``device`` runs in, or ``None`` (one process, or inside :func:`local`).

    An initialized group is used as it is; otherwise the ``torchrun`` variables
    (:data:`TORCHRUN_VARS`, with ``WORLD_SIZE`` > 1) start one: ``"nccl"`` for a
    CUDA ``device``, ``"gloo"`` for the CPU.

    Raises
    ------
    ValueError
        A CUDA fit in an NCCL group whose device is not this rank's ``cuda:LOCAL_RANK``.
    """
    if _LOCAL[0] or not dist.is_available():
        return None
    device = local_device(torch.device(device))
    if not dist.is_initialized():
        if not all(v in os.environ for v in TORCHRUN_VARS) or _env_world() < 2:
            return None
        _init_from_env(device)
    world = dist.get_world_size()
    if world < 2:
        return None
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError("the process group uses NCCL, which exchanges CUDA tensors only; fit on the rank's CUDA "
                         "device (device='cuda') or start the group with the gloo backend for CPU fits")
    return Context(dist.get_rank(), world, device)


def in_group() -> bool:
    """Whether this process belongs to a process group of several processes (initialized or from ``torchrun``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return all(v in os.environ for v in TORCHRUN_VARS) and _env_world() > 1


def is_writer() -> bool:
    """Whether this process writes outputs: rank 0 of a process group, a process without one, or inside
    :func:`local` (a fit of this process alone)."""
    if _LOCAL[0]:
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0 or _env_world() < 2


def free_port() -> int:
    """A TCP port that is free on this machine now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, fn: Callable, args: tuple, nprocs: int, port: int, threads: int, path: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": str(threads)})
    torch.set_num_threads(threads)
    try:
        out = fn(*args)
        if rank == 0:
            with open(path, "wb") as fh:
                pickle.dump(out, fh)
    finally:
        _destroy()
        sys.stdout.flush()


def launch(fn: Callable, nprocs: int, args: tuple = (), threads: int = 1) -> Any:
    """Run ``fn(*args)`` in ``nprocs`` new local processes forming a process group; return rank 0's value.

    Each process gets the ``torchrun`` variables (``RANK`` = ``LOCAL_RANK``, ``WORLD_SIZE``, a free
    ``MASTER_PORT`` on 127.0.0.1) and ``threads`` intra-op threads (``OMP_NUM_THREADS``), so a fit inside
    ``fn`` finds the group by itself (gloo on the CPU, NCCL with ``cuda:rank`` for CUDA fits).  ``fn``
    must be importable (a module-level function) and its return value picklable.

    Raises
    ------
    torch.multiprocessing.ProcessRaisedException
        A process raised; the others are stopped.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="torchem-launch-") as folder:
        path = os.path.join(folder, "rank0.pkl")
        mp.spawn(_worker, args=(fn, args, nprocs, free_port(), threads, path), nprocs=nprocs, join=True)
        with open(path, "rb") as fh:
            return pickle.load(fh)
