"""`python -m meshlib`: the `meshlib` command line."""

import sys

from meshlib.cli import main

if __name__ == "__main__":
    sys.exit(main())
