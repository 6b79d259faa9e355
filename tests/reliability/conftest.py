"""Make ``tests/`` importable (``tiny_models``) from this subfolder, whatever the collection order."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
