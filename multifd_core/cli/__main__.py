"""``python -m multifd_core.cli``: the ``multifd`` command."""

import sys

from .dispatch import main

sys.exit(main())
