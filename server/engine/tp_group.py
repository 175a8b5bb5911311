"""Starting and stopping a tensor-parallel group on one host (`--tensor-parallel-size N`).

The serving process is rank 0: it keeps the API, the scheduler and the adapter cache, and drives
the others (server/engine/tp_driver.py). `start_group` spawns ranks 1..N-1 as fresh processes
(the spawn method: CUDA cannot be forked), joins the group with them, and returns; each worker
loads its own shard of the checkpoint (server/model/loader.py: its rows and columns only),
builds the same pool, KV cache and runner as rank 0 (the ranks agree on their sizes), and does
rank 0's commands until told to stop.

Device r is rank r's GPU (NCCL between them, commands over gloo); on the CPU every rank is a
process with its share of the cores (gloo).

Failure: the group cannot run without any of its ranks. A worker that exits while the group is
up ends the serving process at once (exit code 70, the reason logged) rather than leave it
waiting in a collective; a worker whose parent is gone exits.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from server.config import Settings
from server.model.tensor_parallel import TensorParallel, free_tcp_address, init_tensor_parallel

log = logging.getLogger(__name__)

# How long a collective of the forward waits for the other ranks (a rank stuck this long is lost)
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
WORKER_EXIT_CODE = 70  # the serving process's exit code when a worker died
STOP_TIMEOUT_S = 30.0


@dataclass
class TensorParallelGroup:
    """Rank 0's handle on the group it started: its place in it, its device, the workers."""

    tp: TensorParallel
    device: torch.device
    workers: list = field(default_factory=list)  # multiprocessing.Process of ranks 1..N-1
    _closing: threading.Event = field(default_factory=threading.Event)

    def close(self) -> None:
        """Wait for the workers (told to stop by the driver) to exit; kill those that do not."""
        self._closing.set()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self.workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("tensor-parallel worker %s did not stop; killing it", process.name)
                process.kill()
                process.join()
        if dist.is_initialized():
            dist.destroy_process_group()

    def _watch(self) -> None:
        """End this process when a worker exits before close()."""
        sentinels = {p.sentinel: p for p in self.workers}
        ready = wait(list(sentinels))
        if self._closing.is_set():
            return
        process = sentinels[ready[0]]
        process.join()
        log.critical("tensor-parallel worker %s exited with code %s; the group cannot run without it, exiting",
                     process.name, process.exitcode)
        logging.shutdown()
        os._exit(WORKER_EXIT_CODE)


def start_group(settings: Settings, model_dir: str | Path) -> TensorParallelGroup:
    """Spawn ranks 1..N-1 (N = settings.tensor_parallel_size) and join the group as rank 0."""
    world_size = settings.tensor_parallel_size
    device = group_device(settings, 0)
    if device.type == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(f"tensor_parallel_size {world_size} needs {world_size} GPUs; "
                         f"this machine has {torch.cuda.device_count()}")
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(world_size))
    address = free_tcp_address()
    context = mp.get_context("spawn")
    group = TensorParallelGroup(None, device)
    for rank in range(1, world_size):
        process = context.Process(target=worker_main, args=(rank, world_size, address, settings, str(model_dir)),
                                  name=f"loraplex-tp-rank{rank}", daemon=True)
        process.start()
        group.workers.append(process)
    threading.Thread(target=group._watch, name="tp-worker-watch", daemon=True).start()
    try:
        group.tp = init_tensor_parallel(0, world_size, address, backend=_backend(device),
                                        timeout=COLLECTIVE_TIMEOUT, device_index=device.index)
    except BaseException:
        group._closing.set()
        for process in group.workers:
            process.kill()
        raise
    log.info("tensor-parallel group of %d ranks on %s", world_size,
             "CPU processes" if device.type == "cpu" else f"cuda:0..{world_size - 1}")
    return group


def group_device(settings: Settings, rank: int) -> torch.device:
    """Rank `rank`'s device: its own GPU (cuda:rank) when the settings ask for CUDA, else the CPU."""
    if settings.device == "cpu" or (settings.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if settings.device not in ("auto", "cuda"):
        raise ValueError(f"device {settings.device!r}: with tensor_parallel_size > 1 the device is auto, cuda "
                         "(rank r on cuda:r) or cpu")
    return torch.device("cuda", rank)


def worker_main(rank: int, world_size: int, address: str, settings: Settings, model_dir: str) -> None:
    """A worker process: join the group, load this rank's shard, follow rank 0 until it stops."""
    from server.engine.engine import build_device_state, resolve_device_dtype
    from server.engine.tp_driver import worker_loop
    from server.model.loader import load_model

    logging.basicConfig(level=logging.INFO, format=f"%(levelname)s:     rank {rank}: %(name)s: %(message)s")
    _exit_with_parent()
    device = group_device(settings, rank)
    if device.type == "cpu":
        torch.set_num_threads(_cpu_threads(world_size))
    tp = init_tensor_parallel(rank, world_size, address, backend=_backend(device), timeout=COLLECTIVE_TIMEOUT,
                              device_index=device.index)
    _, dtype = resolve_device_dtype(settings.device, settings.dtype)
    model = load_model(model_dir, dtype, device, quantize=settings.quantize or None, tp=tp)
    pool, _, _, runner = build_device_state(model, settings)
    worker_loop(runner, pool, tp)
    dist.destroy_process_group()


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _cpu_threads(world_size: int) -> int:
    """Each rank's share of the cores (ranks run their steps at the same time)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def _exit_with_parent() -> None:
    """Exit when the process that started this one is gone (rank 0 killed: nothing would ever
    send the stop command)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()
