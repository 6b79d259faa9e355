"""Pure-torch solvers: ``(W, G) -> factors + every rank's error``. No transformers import here."""

from .closed_form import METHODS, Decomposition, Factorization, decompose, decompose_output_gram, factorize

__all__ = ["METHODS", "Decomposition", "Factorization", "decompose", "decompose_output_gram", "factorize"]
