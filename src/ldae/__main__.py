"""``python -m ldae``: the same as the ``ldae`` console script."""

import sys

from ldae.cli import main

if __name__ == "__main__":
    sys.exit(main())
