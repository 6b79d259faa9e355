"""Make ``tests/`` (``tiny_models``) and this folder (``trainer_helpers``) importable; shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

for folder in (Path(__file__).resolve().parents[1], Path(__file__).resolve().parent):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


@pytest.fixture(scope="session")
def tok():
    from tiny_models import tokenizer

    return tokenizer()
