"""``python -m wcfmt``: the same command line as the ``wcfmt`` script."""

import sys

from .cli import main

sys.exit(main())
