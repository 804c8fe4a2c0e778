"""Data-parallel runs (``torchrun`` / ``accelerate launch``) and the run-folder lock.

Under a launcher every process gets ``RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``). The bench
joins a ``torch.distributed`` group (gloo, unless the caller already initialised one), rank 0 decides which cells
are left and broadcasts the list, each rank computes ``cells[rank::world]`` into its own shard file, and after a
barrier rank 0 merges the shards into ``results.jsonl`` and writes the report. Only rank 0 takes the lock.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

LOCK_FILE = "bench.lock"


class RunLocked(RuntimeError):
    """Another bench run holds the lock on this run folder."""


@dataclass
class World:
    """This process's rank, the number of processes, and whether they share a ``torch.distributed`` group."""

    rank: int = 0
    size: int = 1
    group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group:
            dist.barrier()

    def broadcast(self, value):
        """``value`` of rank 0, on every rank (any picklable object)."""
        if not self.group:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def current_world(init: bool = True) -> World:
    """The launcher's world: an initialised ``torch.distributed`` group, else ``RANK``/``WORLD_SIZE`` from the
    environment (joining a gloo group when ``init`` and ``WORLD_SIZE > 1``), else a single process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), True)
    size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if size <= 1:
        return World()
    if not init or "MASTER_ADDR" not in os.environ or not dist.is_available():
        raise RuntimeError(
            f"WORLD_SIZE={size} but no torch.distributed group to share the work: launch with `torchrun "
            f"--nproc-per-node {size}` or `accelerate launch`, which set MASTER_ADDR and MASTER_PORT"
        )
    dist.init_process_group("gloo", rank=rank, world_size=size)
    return World(rank, size, True)


def local_device_index() -> int:
    """``LOCAL_RANK`` of this process (0 outside a launcher): the GPU a data-parallel rank should use."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run folder: ``fcntl.flock`` where available (released by the kernel if the process
    dies), else a lock file created exclusively and taken over when its process is gone."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # Windows
            self._acquire_file()
            return
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunLocked(self._message(owner)) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._handle = handle

    def _acquire_file(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = self.path.read_text(encoding="utf-8").strip()
                pid = owner.split()[1] if owner.startswith("pid ") else ""
                if pid.isdigit() and not _pid_alive(int(pid)):
                    self.path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise RunLocked(self._message(owner or "another process")) from None
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
            os.close(fd)
            self._handle = "file"
            return

    def _message(self, owner: str) -> str:
        return (
            f"another bench run ({owner}) is writing to {self.path.parent}; wait for it to finish or pass a "
            f"different --out"
        )

    def release(self) -> None:
        if self._handle is None:
            return
        if self._handle == "file":
            self.path.unlink(missing_ok=True)
        else:
            self._handle.close()  # closing the descriptor drops the flock
        self._handle = None
