"""Run the align CLI with one function armed to kill the process (SIGKILL, as `kill -9` or the OOM killer would) on
one of its calls. The armed function is patched here, in the test harness: production code carries no hook.

    python -m tests.faults.runner MODULE:ATTR[.ATTR] N before|after [SUBSTRING] -- ALIGN ARGS...

N: the call to kill on (1 = the first); SUBSTRING: count only calls whose arguments mention it (e.g. 'adapter')."""

from __future__ import annotations

import importlib
import os
import signal
import sys


def arm(target: str, nth: int, when: str, needle: str | None) -> None:
    module, _, attr = target.partition(":")
    owner = importlib.import_module(module)
    *path, name = attr.split(".")
    for p in path:
        owner = getattr(owner, p)
    original = getattr(owner, name)
    calls = [0]

    def armed(*args, **kwargs):
        hit = needle is None or needle in repr(args) + repr(kwargs)
        calls[0] += int(hit)
        if hit and calls[0] == nth and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and calls[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, armed)


def main() -> int:
    sep = sys.argv.index("--")
    target, nth, when, *needle = sys.argv[1:sep]
    arm(target, int(nth), when, needle[0] if needle else None)
    from align.cli import main as align_main

    return align_main(sys.argv[sep + 1 :])


if __name__ == "__main__":
    sys.exit(main())
