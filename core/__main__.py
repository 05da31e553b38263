"""``python -m arbor``: the same program as the ``arbor`` command."""

import sys

from arbor.cli import main

sys.exit(main())
