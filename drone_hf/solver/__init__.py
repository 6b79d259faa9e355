"""Pure-torch solvers: ``(W, G) -> factors + every rank's error``. No transformers import here."""

from .closed_form import METHODS, Decomposition, Factorization, decompose, decompose_output_gram, factorize
from .compensated import decompose_compensated, decompose_kfac_compensated
from .kfac import DEFAULT_KFAC_DAMP, decompose_kfac
from .peers import PEER_METHODS, CholeskyError, decompose_peer

__all__ = [
    "DEFAULT_KFAC_DAMP", "METHODS", "PEER_METHODS", "CholeskyError", "Decomposition", "Factorization", "decompose",
    "decompose_compensated", "decompose_kfac", "decompose_kfac_compensated", "decompose_output_gram",
    "decompose_peer", "factorize",
]
