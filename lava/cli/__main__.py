"""``python -m lava.cli ...`` (and ``torchrun -m lava.cli eval ...``) run the ``lava`` command."""

import sys

from . import main

sys.exit(main())
