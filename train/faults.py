"""Faults a cluster throws, turned into exits a restart script can act on.

Exit codes of `python -m train` (each rank's, under torchrun):
  0   done: the model is exported
  75  preempted: SIGTERM or SIGUSR1 reached a rank (or torchrun, which forwards the signals named by
      its --signals-to-handle); every rank finished the step it was in, a checkpoint was written,
      and `--resume` continues to the same losses and weights as an uninterrupted run
  74  a write failed (disk full, quota, read-only file system): one line says what, where, and how
      much space it needed; the last complete checkpoint is intact, so free space and `--resume`
  2   a setting or an input the user must fix (one line)
  1   anything else, e.g. a rank died: the others' next collective fails (gloo at once, NCCL after
      --dist-timeout, or torchrun stops them within its --shutdown-timeout)

The signal handlers only set a flag; the loop reads it after each step, and the ranks agree on it
in one all-reduce (`agree`), so a signal that reaches one rank stops them all at the same step.
"""

import shutil
import signal
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from prep.shards import DiskFull, is_disk_full
from train.parallel import all_reduce_sum

EXIT_PREEMPTED, EXIT_WRITE_FAILED = 75, 74


class WriteError(Exception):
    """A file of the run could not be written. `elsewhere`: this rank stays silent, rank 0 says it."""

    def __init__(self, message: str, elsewhere: bool = False):
        super().__init__(message)
        self.elsewhere = elsewhere


class Preemption:
    """While open: SIGTERM and SIGUSR1 ask the run to stop after the current step; `signal` names the
    first one. On close the handlers before it are back (tests run the trainer in their own process)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: str | None = None
        self.before = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # Python lets only the main thread handle signals
            self.before = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.before.items():
            signal.signal(signum, handler)

    def handle(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name


def agree(*flags: float, device: torch.device) -> list[float]:
    """The sum of each flag over the ranks: one all-reduce (none with one process)."""
    return all_reduce_sum(torch.tensor(flags, dtype=torch.float64, device=device)).tolist()


def gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e7 else f"{num_bytes / 1e6:.2f} MB"


def free_bytes(path: Path) -> int:
    """Free space on the file system of `path`, or of its nearest existing parent."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(error: BaseException | None, needed: int, free: int) -> bool:
    """torch's writers report a full disk as a short write ("unexpected pos"), not as ENOSPC, so a
    write that needed more than was free counts as a full disk too."""
    return isinstance(error, DiskFull) or is_disk_full(error) or needed > free


def write_error(what: str, path: Path, error: BaseException | None, needed: int = 0,
                free: int | None = None) -> WriteError:
    """One line for a failed write: what, where, why, and the space it needed against the space that
    was free when it failed. `error` None: this rank's part worked, another rank's did not."""
    free = free_bytes(path) if free is None else free
    if disk_full(error, needed, free):
        reason = "no space left on device"
    elif error is None:
        reason = "the write failed on another rank (its error is above)"
    else:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    space = f" (it needs about {gb(needed)}, {gb(free)} free)" if needed else f" ({gb(free)} free)"
    return WriteError(f"could not write {what} to {path}: {reason}{space}; make room, then rerun with --resume")


def together(work: Callable[[], None], what: str, path: Path, rank: int, device: torch.device, needed: int = 0,
             cleanup: Callable[[], None] = lambda: None) -> None:
    """Run this rank's part of a write (`work`), then agree with the other ranks that every part worked,
    so that no rank goes on to a collective that a failed one will never join. When a part failed
    anywhere: `cleanup()` on rank 0, and WriteError on every rank. Rank 0 says it in one line, with the
    bytes `needed` summed over the ranks and the space free when the writes ended; another rank adds
    a line only for a failure of its own that isn't a full disk.
    torch's writers raise RuntimeError for I/O errors, DCP its CheckpointException (a BaseException)."""
    error = None
    try:
        work()
    except (Exception, CheckpointException) as e:  # whatever the writer raises (safetensors has its own error)
        error = e
    failed, total_needed = agree(float(error is not None), float(needed), device=device)
    if not failed:
        return
    free = free_bytes(path)  # before the cleanup: what the writes ran into
    message = write_error(what, path, error, int(total_needed), free)
    if rank == 0:
        cleanup()
    if rank == 0 or (error is not None and not disk_full(error, int(total_needed), free)):
        raise message from None
    raise WriteError(f"another rank could not write {what}", elsewhere=True)


def peer_gone(error: BaseException) -> bool:
    """A collective failed because another rank is gone: NCCL and timeouts raise DistError, but gloo
    raises its socket errors ("connection closed/reset by peer") as RuntimeError from inside torch.distributed."""
    if isinstance(error, dist.DistError):
        return True
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return isinstance(error, RuntimeError) and frame is not None and \
        "torch/distributed" in frame.tb_frame.f_code.co_filename.replace("\\", "/")
