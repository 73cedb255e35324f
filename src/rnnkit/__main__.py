"""``python -m rnnkit`` (and ``torchrun -m rnnkit``): the `rnnkit` command line."""

import sys

from rnnkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
