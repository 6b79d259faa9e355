"""Pure-torch solvers: ``(W, G) -> factors + every rank's error``. No transformers import here."""

from .closed_form import METHODS, Decomposition, Factorization, decompose, decompose_output_gram, factorize
from .compensated import decompose_compensated
from .peers import PEER_METHODS, CholeskyError, decompose_peer

__all__ = [
    "METHODS", "PEER_METHODS", "CholeskyError", "Decomposition", "Factorization", "decompose",
    "decompose_compensated", "decompose_output_gram", "decompose_peer", "factorize",
]
