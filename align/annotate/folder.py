"""The annotation folder: its file names and limits, and the durable append-only JSON Lines log every judgment
is written to.

Every record is whole or absent (issue 34 B3, B4):
- an append is one write(2) on an O_APPEND descriptor, fsync'd, under a thread lock and an exclusive flock on the
  file (other processes: `annotate export`, a second server); a write that fails half-way (a full disk) is cut
  back to the length before it, under the same locks, and the judgment is refused, never acknowledged;
- a torn tail (a process killed inside a write) is repaired only by the writer, under the exclusive flock, when it
  opens the log;
- readers take a shared flock (a consistent snapshot: no append in flight), never modify the file, leave out an
  unterminated last line, and skip any line that does not parse, naming it, so one damaged line loses no other.

The locks are flock(2) on the log itself, not filelock's (which align uses for its folder and cache locks): readers
need a *shared* lock beside the writer's exclusive one, and the lock must be on the very file descriptor that is
appended to and truncated back, neither of which filelock's separate exclusive lock file gives.
"""

import contextlib
import fcntl
import json
import os
import re
import threading
from pathlib import Path

FLAGS = ("unsafe", "nonsense")


ANNOTATIONS = "rankings.jsonl"  # the judgments of a folder


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@contextlib.contextmanager
def flocked(fd: int, kind: int):
    fcntl.flock(fd, kind)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


class JsonlLog:
    """An append-only JSON Lines file whose appends are whole lines on disk before `append` returns, or nothing."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        new = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        with flocked(self.fd, fcntl.LOCK_EX):
            self.torn_bytes = _cut_torn_tail(self.path)
        if new:
            _fsync_dir(self.path.parent)

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def append(self, obj: dict) -> None:
        """Write one line durably; on any error the file is cut back to where it was and the error raised."""
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock, flocked(self.fd, fcntl.LOCK_EX):
            before = os.fstat(self.fd).st_size
            try:
                view = memoryview(data)
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
                os.fsync(self.fd)
            except OSError:
                with contextlib.suppress(OSError):  # no half line may stay for the next one to join
                    os.ftruncate(self.fd, before)
                    os.fsync(self.fd)
                raise

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[dict]:
    """The whole lines of a JSON Lines file, read under a shared flock (never modified); a line that does not
    parse is skipped and named in `problems` (file:line: why)."""
    path = Path(path)
    if not path.exists():
        return []
    with open(path, "rb") as f, flocked(f.fileno(), fcntl.LOCK_SH):
        data = f.read()
    rows = []
    lines = data.split(b"\n")
    for i, raw in enumerate(lines[:-1], start=1):  # the last piece has no newline: in flight or torn
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            if problems is not None:
                problems.append(f"{path}:{i}: not a whole JSON line ({type(e).__name__}); skipped")
            continue
        if isinstance(row, dict):
            rows.append(row)
        elif problems is not None:
            problems.append(f"{path}:{i}: not a JSON object; skipped")
    return rows


def snapshot_text(path: Path) -> str:
    """The file's whole lines as text, read under a shared flock (a consistent snapshot for export)."""
    with open(path, "rb") as f, flocked(f.fileno(), fcntl.LOCK_SH):
        data = f.read()
    return data[: data.rfind(b"\n") + 1].decode("utf-8", errors="replace")


def _cut_torn_tail(path: Path) -> int:
    """Truncate a file to its last newline; return how many bytes were cut (0 when it ends cleanly). Only the
    writer calls it, holding the exclusive flock."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if f.read(1) == b"\n":
            return 0
        pos, chunk = size, 1 << 16
        keep = 0
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            block = f.read(pos - start)
            i = block.rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
