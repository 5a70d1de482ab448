import os
import sys

from align.cli import main

try:
    code = main()
finally:
    if "torch" in sys.modules and "TORCHELASTIC_RUN_ID" not in os.environ:
        from core.dist import close  # one process that made a group of its own (FSDP2) takes it down

        close()
if "TORCHELASTIC_RUN_ID" in os.environ:
    # A launched worker has finished and written everything (trackers are finished explicitly): it leaves without
    # the interpreter's teardown, in which the process group's threads can abort a finished run ("terminate called
    # without an active exception", seen after FSDP2 runs that had gated and completed their artifact).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
