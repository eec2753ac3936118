"""Data-parallel calibration on torch.distributed: who this process is, its share of the work, reductions.

Started by ``torchrun`` (the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` environment), ``onecomp run`` joins
the process group with ``init_from_env()``; gloo on CPU, nccl when the backend's device is a GPU. Without
a process group every helper here is the identity of a world of one, so single-process code pays nothing.

Statistics are summed in float64 and cast back to float32 once (``all_reduce_sum_``): each batch's
float32 contribution is the same on any number of processes, and float64 sums of them are exact unless an
entry's terms differ by more than about 2**28 in magnitude, so the float32 result does not depend on
how the batches were spread over processes.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from .errors import RunError

#: seconds a collective waits for a peer before failing (``ONECOMP_DIST_TIMEOUT`` overrides it)
DEFAULT_TIMEOUT = 1800


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """The process that writes checkpoints, reports and run state (rank 0, or the only one)."""
    return rank() == 0


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment; True when this run is data-parallel.

    Nothing is done when ``WORLD_SIZE`` is unset or 1, or when a group already exists (a caller that
    set one up itself, as the tests do)."""
    if dist.is_available() and dist.is_initialized():
        return active()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("ONECOMP_DIST_TIMEOUT", DEFAULT_TIMEOUT)))
    dist.init_process_group(backend, timeout=timeout)
    return active()


def shard(n: int) -> range:
    """This process's contiguous share of ``n`` items (calibration batches): sizes differ by at most one."""
    world, r = world_size(), rank()
    if n < world:
        raise RunError(f"calibration has {n} batches for {world} processes; use more calibration.samples, "
                       "a smaller calibration.batch_size or fewer processes")
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def _collective(what: str, fn):
    """Run a collective, turning a peer's death or a timeout into a RunError that says what to do."""
    try:
        return fn()
    except RuntimeError as exc:  # gloo/nccl report a lost peer or a timeout as RuntimeError
        raise RunError(f"rank {rank()} of {world_size()}: {what} failed, a peer process died or timed out "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); finished blocks are "
                       "kept: rerun with --resume") from exc


def all_reduce_sum_(t: torch.Tensor | None) -> torch.Tensor | None:
    """Sum ``t`` (a float64 or integer tensor) over all processes, in place."""
    if t is None or not active():
        return t
    where = "cuda" if dist.get_backend() == "nccl" else "cpu"  # nccl sums GPU tensors, gloo CPU ones
    buf = t if t.device.type == where else t.to(where)
    _collective("summing calibration statistics", lambda: dist.all_reduce(buf, op=dist.ReduceOp.SUM))
    if buf is not t:
        t.copy_(buf)
    return t


def all_gather(obj) -> list:
    """Every process's ``obj`` in rank order (pickled: for small objects and tensors)."""
    if not active():
        return [obj]
    out = [None] * world_size()
    _collective("gathering from every process", lambda: dist.all_gather_object(out, obj))
    return out


def broadcast(obj, src: int = 0):
    """``obj`` as process ``src`` has it, on every process."""
    if not active():
        return obj
    box = [obj]
    _collective(f"receiving from rank {src}", lambda: dist.broadcast_object_list(box, src=src))
    return box[0]


def barrier() -> None:
    if active():
        _collective("waiting for every process", dist.barrier)


def leave() -> None:
    """Wait for every process, then end the process group: what follows runs on each process alone."""
    if active():
        barrier()
        dist.destroy_process_group()


def from_main(fn):
    """``fn()`` run by rank 0 alone, its result on every process; an error it raises is raised everywhere,
    so that no process waits for a result that will not come."""
    outcome = None
    if is_main():
        try:
            outcome = (fn(), None)
        except Exception as exc:
            if not active():
                raise
            outcome = (None, exc)
    value, error = broadcast(outcome)
    if error is not None:
        raise error
    return value
