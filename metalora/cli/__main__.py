"""``python -m metalora.cli``: the ``metalora`` command."""

import sys

from metalora.cli import main

sys.exit(main())
