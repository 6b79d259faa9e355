"""``python -m drone_hf`` runs the ``drone-hf`` command line (default: the built-in demo)."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:] or ["compress"]))
