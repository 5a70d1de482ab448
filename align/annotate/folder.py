"""The annotation folder: its file names and limits, and the durable append-only JSON Lines log every judgment
is written to (one write(2) on an O_APPEND descriptor, fsync'd under a lock; a torn tail cut when the folder is
next opened)."""

import json
import os
import re
import threading
from pathlib import Path

FLAGS = ("unsafe", "nonsense")


ANNOTATIONS = "rankings.jsonl"  # the judgments of a folder


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class JsonlLog:
    """An append-only JSON Lines file whose appends are whole lines on disk before `append` returns.

    One write(2) per line on an O_APPEND descriptor (several writers never interleave inside a line), fsync, all
    under a lock. Opening cuts off a torn last line (a crash inside a write) and says how many bytes it cut."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.torn_bytes = _cut_torn_tail(self.path)
        new = not self.path.exists()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if new:
            _fsync_dir(self.path.parent)

    def read(self) -> list[dict]:
        return read_jsonl(self.path)

    def append(self, obj: dict) -> None:
        data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            view = memoryview(data)
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
            os.fsync(self.fd)

    def close(self) -> None:
        with self.lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSON Lines file another writer may have been killed in (a torn tail is cut)."""
    path = Path(path)
    if not path.exists():
        return []
    _cut_torn_tail(path)
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _cut_torn_tail(path: Path) -> int:
    """Truncate a file to its last newline; return how many bytes were cut (0 when it ends cleanly)."""
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
