"""One build per directory: `prep build` holds an exclusive lock on `--out` from before it looks at
the directory until it exits, so two builds (two shells, two nodes of a job array, a requeued job
whose first run is still alive) never write the same files, and `--overwrite` never deletes a
directory another build is writing.

The lock is `fcntl.flock` on `--out/.prep-lock`. The kernel releases it when its holder exits in
any way, SIGKILL included, so a dead build never blocks the next one; whether a build may run is
decided by the lock alone, never by what the file says. The file records the holder's pid and host
(a cluster's builds run on several machines) only to name it in the refusal. On NFS, Linux turns
flock into a POSIX lock that the server arbitrates, so it holds across machines too.

The file is kept after the build, emptied: unlinking a locked file lets the next build create and lock
a new file under the same name while a third still holds the old one open, and then two builds run
at once. The record is emptied on the way out, so a finished build directory is the same bytes
whichever process wrote it; `prep verify` ignores the file by name (prep.shards.LOCK).
"""

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from prep.shards import LOCK, disk_full, is_disk_full


class Locked(ValueError):
    """Another live build holds the directory: a user error, one line."""


@contextmanager
def lock_build(out: Path):
    """Hold the build lock of `out` (created if needed) for the duration of the block; raises Locked
    at once when another build holds it."""
    path = out / LOCK
    try:
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:  # no permission, a file where a parent directory should be, a read-only disk
        if is_disk_full(error):
            raise disk_full("build lock", path, 4096) from None  # a directory block
        where = "" if error.filename in (None, str(out)) else f" ({error.filename})"
        raise ValueError(f"can't create --out {out}: {error.strerror}{where}; choose a directory you can write to") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"{out} is being built by {holder(path)}; wait for it to finish, stop it, or choose another "
                         "--out") from None
        # In place, not through a temp file: a new file would be a new inode, which the lock doesn't cover.
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, record, 0)
        except OSError as error:
            if is_disk_full(error):
                raise disk_full("build lock", path, len(record)) from None
            raise
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the record names a live holder only
    finally:
        os.close(fd)  # releases the lock


def holder(path: Path) -> str:
    """'pid N on HOST' from the lock file. The holder writes it right after taking the lock, so a
    refusal that lands in between waits a moment for it."""
    for _ in range(20):
        try:
            record = json.loads(path.read_bytes())
            return f"pid {record['pid']} on {record['host']}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.01)
    return "another process (its pid and host are not recorded yet)"
