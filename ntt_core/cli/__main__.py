"""``python -m ntt_core.cli``: the ``ntt`` program."""

import sys

from .program import main

if __name__ == "__main__":
    sys.exit(main())
