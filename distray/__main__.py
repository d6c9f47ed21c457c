"""`python -m distray ...` is the `distray` command."""

import sys

from distray.cli import main

if __name__ == "__main__":
    sys.exit(main())
