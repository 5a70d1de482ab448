import sys

from align.cli import main

try:
    code = main()
finally:
    if "torch" in sys.modules:  # only a command that imported torch can hold a process group
        from core.dist import close

        close()
raise SystemExit(code)
