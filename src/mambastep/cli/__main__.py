"""``python -m mambastep.cli``: the ``mambastep`` command (as ``torchrun -m mambastep.cli train`` runs it)."""

import sys

from mambastep.cli import main

sys.exit(main())
