"""drone-hf benchmarks: runnable scripts (``python benchmarks/<name>.py``) and their shared helpers
(:mod:`benchmarks.common`). Not part of the installed package."""
