"""``python -m blip2``: the same command line as the ``blip2`` script (see ``blip2.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
