"""Multi-process training with ``torchrun``: the process group, rank 0's decisions, DDP wrapping.

    torchrun --standalone --nproc_per_node N train.py ...

``torchrun`` starts N copies of the script with ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in the environment. Without ``WORLD_SIZE`` every function here
is the single-process identity (no process group, rank 0 of 1), so a script
that uses them runs unchanged when started with plain ``python``.

Rank 0 is the *main* process: it alone makes decisions that touch the file
system (``from_main``) and writes outputs. A ``UserError`` is raised on every
rank alike (``from_main`` hands rank 0's to the others); rank 0 alone prints it.
"""
from __future__ import annotations

import os
import socket
import sys
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from helpers import UserError

T = TypeVar("T")


def world_size() -> int:
    """Number of processes training together (1 without ``torchrun``)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in ``[0, world_size())`` (0 without ``torchrun``)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the process that decides, prints and writes outputs."""
    return rank() == 0


@contextmanager
def process_group(device: str) -> Iterator[str]:
    """Join ``torchrun``'s process group for the ``with`` body; yields the torch device this process uses.

    device: the requested device (``"cpu"``, ``"cuda"``, ``"cuda:1"``). Under
    ``torchrun`` a CUDA device (when CUDA is available) becomes ``cuda:LOCAL_RANK``
    with the ``nccl`` backend; anything else uses ``gloo``. Without ``WORLD_SIZE`` in the
    environment nothing is joined and ``device`` is yielded as it is. A
    ``UserError`` in the body, which must be raised on every rank, is printed by
    rank 0 as ``helpers.run_main`` prints it, and every rank exits with status 2
    once rank 0 has printed (the launcher stops all ranks when the first exits).
    """
    if "WORLD_SIZE" not in os.environ:
        yield device
        return
    nccl = device.startswith("cuda") and torch.cuda.is_available()
    per_machine, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count() if nccl else 0
    if nccl and per_machine > gpus:  # no group yet: every rank finds this alike, and rank 0 says it
        _say(UserError(f"{per_machine} processes on this machine need one GPU each for nccl, and it has {gpus}: "
                       "start at most that many (--nproc_per_node) or train with --device cpu"),
             int(os.environ.get("RANK", "0")) == 0)
        raise SystemExit(2)
    try:
        if nccl:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        if not nccl:
            use_loopback_for_gloo(os.environ)
        dist.init_process_group("nccl" if nccl else "gloo")
        yield device
        dist.barrier()  # tear down together: a rank that destroys its group while another works may abort
    except UserError as err:
        _say(err, is_main())
        dist.barrier()
        raise SystemExit(2) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def use_loopback_for_gloo(environ: dict, interfaces: list[str] | None = None) -> None:
    """Set ``GLOO_SOCKET_IFNAME`` in ``environ`` to the loopback interface when every rank runs on this machine.

    gloo binds to the address this machine's host name resolves to; in containers and sandboxes that name
    may resolve to an address the ranks cannot reach, and the group then hangs while joining (seen on a
    lent GPU machine, bench/RESULTS.md). All ranks on one machine (``LOCAL_WORLD_SIZE`` = ``WORLD_SIZE``)
    only need the loopback. A ``GLOO_SOCKET_IFNAME`` the user set is kept, as is everything when the ranks
    span machines or no loopback interface exists. interfaces: the machine's interface names (default:
    ``socket.if_nameindex()``).
    """
    if "GLOO_SOCKET_IFNAME" in environ or environ.get("LOCAL_WORLD_SIZE") != environ.get("WORLD_SIZE"):
        return
    names = [name for _, name in socket.if_nameindex()] if interfaces is None else interfaces
    loopback = next((name for name in ("lo", "lo0") if name in names), None)
    if loopback:
        environ["GLOO_SOCKET_IFNAME"] = loopback


def _say(err: UserError, main: bool) -> None:
    """The main process prints ``err`` as ``helpers.run_main`` would; the others print nothing."""
    if main:
        print(f"error: {err}", file=sys.stderr, flush=True)


def from_main(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 only; every rank gets its result (pickled) or raises its ``UserError``.

    For work that must happen once and be agreed on before the ranks go their
    own ways: checks against files only rank 0 may see, building data, loading a
    checkpoint. The result must be picklable and on the CPU.
    """
    if world_size() == 1:
        return decide()
    box: list = [None]
    if is_main():
        try:
            box[0] = (True, decide())
        except UserError as err:
            box[0] = (False, str(err))
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise UserError(value)
    return value


def wrap(model: nn.Module, device: str) -> nn.Module:
    """``model`` in ``DistributedDataParallel`` when several processes train, else ``model`` itself.

    DDP registers the parameters that require gradients *now*: wrap again
    whenever ``requires_grad`` changes (a new training stage). Every such
    parameter must reach the loss in every step (no ``find_unused_parameters``).
    """
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)


def mean_over_ranks(values: Mapping[str, float]) -> dict[str, float]:
    """The mean of each value over all ranks, in the order given (every rank passes the same keys)."""
    if world_size() == 1:
        return dict(values)
    keys = sorted(values)
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    means = dict(zip(keys, (total / world_size()).tolist()))
    return {k: means[k] for k in values}


def barrier() -> None:
    """Wait until every rank gets here (nothing without ``torchrun``)."""
    if world_size() > 1:
        dist.barrier()
