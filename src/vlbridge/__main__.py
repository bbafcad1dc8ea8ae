"""``python -m vlbridge``: the same command line as the ``vlbridge`` console script."""

import sys

from vlbridge.cli import main

if __name__ == "__main__":
    sys.exit(main())
