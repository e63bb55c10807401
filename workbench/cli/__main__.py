"""``python -m workbench.cli``: the ``workbench`` command (used by sweep workers started as child processes)."""

import sys

from . import main

sys.exit(main())
