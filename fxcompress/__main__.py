"""``python -m fxcompress``: the command line (see :mod:`fxcompress.cli`)."""

import sys

from fxcompress.cli import main

sys.exit(main())
