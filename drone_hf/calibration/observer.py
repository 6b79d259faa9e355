"""``GramObserver``: the streamed input statistics of one layer.

DRONE needs only ``G = Σ x xᵀ`` over the real calibration tokens, never the activations
themselves: memory is ``O(n²)`` per layer whatever the number of tokens. Each batch's product is
computed in float32 (float64 for a float64 model) on the layer's device and added to a float64
running sum, so a long calibration does not lose the small eigenvalues to round-off.
"""

from __future__ import annotations

import torch


class GramObserver:
    """Accumulates ``Σ x xᵀ`` and the token count for one layer input of width ``features``."""

    def __init__(self, features: int, name: str = "") -> None:
        self.features = features
        self.name = name
        self.gram: torch.Tensor | None = None
        self.num_tokens = 0

    @staticmethod
    def batch_product(tokens: torch.Tensor) -> torch.Tensor:
        """``tokensᵀ tokens`` for [N, n] real tokens, in float32 (float64 for float64 inputs)."""
        wide = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        t = tokens.to(wide)
        return t.T @ t

    def add(self, product: torch.Tensor, num_tokens: int, batch_index: int = -1) -> None:
        """Add one batch's product (from :meth:`batch_product`) covering ``num_tokens`` tokens."""
        if not bool(torch.isfinite(product).all()):
            raise ValueError(
                f"Non-finite activations (NaN/inf) reached layer {self.name!r} in calibration batch {batch_index}. "
                "Load the model in float32 (dtype=torch.float32) or check the calibration texts."
            )
        if self.gram is None:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float64, device=product.device)
        self.gram += product.to(torch.float64)
        self.num_tokens += num_tokens
