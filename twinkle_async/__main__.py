"""``python -m twinkle_async``: the ``twinkle-async`` command line."""

import sys

from twinkle_async.cli import main

if __name__ == "__main__":
    sys.exit(main())
