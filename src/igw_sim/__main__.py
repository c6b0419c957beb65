"""``python -m igw_sim``: see :mod:`igw_sim.cli`."""

import sys

from igw_sim.cli import main

if __name__ == "__main__":
    sys.exit(main())
