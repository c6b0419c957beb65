import sys

from igw.cli import main

sys.exit(main())
