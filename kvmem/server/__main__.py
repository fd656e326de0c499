"""``python -m kvmem.server``: the ``kvmem serve`` command."""

import sys

from kvmem.server.cli import main

sys.exit(main())
