"""Accelerate's process state, with one fix: on a machine without CUDA it must be told `cpu=True`,
or processes started by `accelerate launch`/`torchrun` each think they are alone."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def use_cpu() -> bool:
    """True when there is no GPU to use (or ACCELERATE_USE_CPU asks for the CPU)."""
    return not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def accelerator(**kwargs: Any) -> Any:
    """An `accelerate.Accelerator` that sees every launched process, on GPUs or on the CPU (gloo)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # Accelerate keeps one global state, fixed by the first Accelerator; a single process may
    # start several runs (a notebook, the tests) with other settings, so it is reset there.
    if AcceleratorState._shared_state and PartialState().num_processes == 1:
        AcceleratorState._reset_state()
    return Accelerator(cpu=use_cpu(), **kwargs)


def process_state() -> Any:
    """`accelerate.PartialState` (rank, world size, device) under the same rule."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


def shutdown() -> bool:
    """Destroy the process group, if one was made, before the interpreter exits: left to interpreter
    shutdown, gloo's threads can abort a process that has finished its work (SIGABRT, "terminate
    called without an active exception"), failing a run whose results are already written.
    True when there was a group of several processes."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return False
    several = td.get_world_size() > 1
    td.destroy_process_group()
    return several


def finish(rc: int) -> None:
    """End a process of a multi-process launch with status `rc`: destroy the group, flush, and leave
    without the interpreter's teardown, where gloo's threads can still abort a process whose work
    is written and closed. Returns (does nothing more) outside such a launch."""
    if shutdown():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
