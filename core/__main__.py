"""``python -m arbor``: the same program as the ``arbor`` command."""

import sys

from arbor.cli.main import main

sys.exit(main())
