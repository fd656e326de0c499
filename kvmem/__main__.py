"""``python -m kvmem``: the same as the ``kvmem`` command."""

import sys

from kvmem.cli import main

sys.exit(main())
