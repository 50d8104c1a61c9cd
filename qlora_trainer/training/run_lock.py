"""One run per output folder: an exclusive lock on the folder, held for the run's whole lifetime.

The lock is `fcntl.flock` on `output_dir/.lock`. The kernel drops it when the holding process exits or dies, so
the lock of a killed run is taken over by the next run with no rule about stale locks. The file records the
holder (pid, host, start time) for the message that refuses a second run. It is kept when the run ends: removing
a lock file races with a process that has just opened it. flock is reliable between processes of one machine;
two machines writing one network folder are not guarded.
"""

import errno
import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from qlora_trainer.errors import UserError

LOCK = ".lock"


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder not recorded yet"


def _make_folder(output_dir: Path) -> bool:
    """Create `output_dir` where missing; True when this call created it."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"output.dir: {output_dir} is a file; give a folder (it is created if missing)")
    if output_dir.is_dir():
        return False
    try:
        output_dir.mkdir(parents=True)
    except FileExistsError:  # created by another process meanwhile, or a file on the way
        if not output_dir.is_dir():
            raise UserError(f"output.dir: {output_dir} is not a folder (part of its path is a file)") from None
        return False
    except OSError as err:
        raise UserError(f"output.dir: cannot create {output_dir} ({err.strerror})") from None
    return True


@contextmanager
def hold_run_folder(output_dir: Path) -> Iterator[None]:
    """Create `output_dir` if needed and hold its lock until the block ends; a second run is refused naming the
    holder. A folder this call created is removed again when the block leaves nothing in it but the lock."""
    created = _make_folder(output_dir)
    path = output_dir / LOCK
    try:
        if not os.access(output_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise UserError(f"output.dir: cannot write in {output_dir} ({err.strerror})") from None
    locked = False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UserError(f"output.dir: {output_dir} is in use by another run ({_holder(path)}); wait for it "
                                "to end or choose another --output-dir") from None
            raise UserError(f"output.dir: cannot lock {path} ({err.strerror})") from None
        locked = True
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        if locked and created and [p.name for p in output_dir.iterdir()] == [LOCK]:  # a refused first run: no trace
            path.unlink()
            output_dir.rmdir()
        os.close(fd)  # releases the lock
