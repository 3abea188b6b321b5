"""All torch.distributed handling in one place: init, rank, world size, print0, stop flags.

Works under the ``deepspeed`` launcher, ``torchrun``, Slurm ``srun`` (SLURM_* variables) and as a
plain process (a world of one, which listens on no network interface). On machines without CUDA it selects
DeepSpeed's CPU accelerator and the gloo backend before DeepSpeed is imported.
"""

from __future__ import annotations

import collections
import os
import socket
import sys
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_env(device: str = "auto") -> torch.device:
    """Fill RANK/WORLD_SIZE/... for a single process or Slurm; choose the accelerator."""
    import warnings
    # DeepSpeed still calls collectives that torch deprecates; the warning repeats every step.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated",
                            category=FutureWarning)
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=auto")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if int(os.environ["WORLD_SIZE"]) > 1:
            raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with "
                               "`deepspeed`, `torchrun` or set MASTER_ADDR/MASTER_PORT")
        os.environ["MASTER_PORT"] = str(_free_port())
    if use_cuda:
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def launch_world_size() -> int:
    """The world size the launcher asked for (before ``init``; 1 for a plain process)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return int(os.environ.get("SLURM_NTASKS", "1")) if "SLURM_PROCID" in os.environ else 1


def launch_rank() -> int:
    """This process's rank as the launcher set it (before ``init``; 0 for a plain process)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("SLURM_PROCID", "0"))


def launch_local_rank() -> int:
    """This process's rank on its node as the launcher set it (0 for a plain process)."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return int(os.environ.get("SLURM_LOCALID", "0"))


def op_build_note(device: torch.device) -> str | None:
    """What DeepSpeed is about to compile on this launch (a first launch on a CPU machine builds
    its shared-memory communication op, about a minute of silence otherwise), or None."""
    if device.type != "cpu":
        return None
    try:
        from deepspeed.accelerator import get_accelerator
        from torch.utils.cpp_extension import _get_build_directory
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is None:
            return None
        where = Path(_get_build_directory(builder.name, False))
    except Exception:  # an unknown DeepSpeed layout: nothing to announce
        return None
    if (where / f"{builder.name}.so").exists():
        return None
    return (f"first launch on this machine: DeepSpeed compiles its {builder.name} op (about a "
            f"minute, once; cached in {where})")


def init(device: torch.device) -> None:
    import deepspeed
    if not torch.distributed.is_initialized():
        note = op_build_note(device)
        if note and launch_rank() == 0:
            print(note, flush=True)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if launch_world_size() == 1:
            _init_alone(backend)  # DeepSpeed then finds the group made and uses it
        deepspeed.init_distributed(dist_backend=backend, verbose=False)


def _init_alone(backend: str) -> None:
    """A world of one opens no port to the network: its rendezvous store lives in the process
    (torch's env:// rendezvous would serve an unauthenticated TCP store on every interface) and
    gloo's own socket binds the loopback interface."""
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ:
        loopback = [name for _, name in socket.if_nameindex() if name == "lo"]
        if loopback:
            os.environ["GLOO_SOCKET_IFNAME"] = loopback[0]
    torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


_cpu_group = None
# The tensors of the last CPU collectives, kept referenced from Python. A gloo worker thread
# drops its reference to a finished collective a moment after the caller has the result; were
# that the last reference to a tensor with a Python object, the thread would need the GIL to free
# it, and in a process already finalising (a rank returning right after an `all_sum`) that aborts
# it: "terminate called without an active exception" (gdb: the thread in ~AsyncAllreduceWork).
# This narrows that window; only ending the group's threads before exit (`destroy`) closed it in
# the sampling command (1 abort in 10 runs with this alone, 0 in 22 with both).
_recent: collections.deque = collections.deque(maxlen=4)


def all_reduce_cpu(t: torch.Tensor) -> torch.Tensor:
    """Sum a CPU tensor over ranks in place, on a gloo group (no GPU sync); returns it."""
    global _cpu_group
    if not torch.distributed.is_initialized() or world_size() == 1:
        return t
    if _cpu_group is None:
        backend = torch.distributed.get_backend()
        _cpu_group = torch.distributed.new_group(backend="gloo") if backend != "gloo" else \
            torch.distributed.group.WORLD
    _recent.append(t)
    torch.distributed.all_reduce(t, group=_cpu_group)
    return t


def any_rank(flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (a CPU all-reduce: no GPU sync)."""
    return bool(all_reduce_cpu(torch.tensor([1 if flag else 0], dtype=torch.int32)).item())


def broadcast_object(obj):
    if not torch.distributed.is_initialized() or world_size() == 1:
        return obj
    holder = [obj]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def destroy() -> None:
    """Tear the process groups down before the interpreter does. Nothing may keep a group alive
    past this point: a gloo group's worker threads still releasing a finished collective while
    Python finalises abort the process ("terminate called without an active exception")."""
    global _cpu_group
    _cpu_group = None
    if torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception as e:  # shutting down: report, never mask the real exit status
            print(f"warning: destroy_process_group failed: {e}", file=sys.stderr)


def all_sum(value: float) -> float:
    """Sum of ``value`` over ranks (CPU collective, like ``any_rank``)."""
    return float(all_reduce_cpu(torch.tensor([float(value)], dtype=torch.float64)).item())
