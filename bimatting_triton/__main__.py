"""``python -m bimatting_triton``: the ``bimatting`` command line (see :mod:`bimatting_triton.cli`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
