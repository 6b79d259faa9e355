"""``GramObserver``: the streamed input statistics of one layer.

DRONE needs only ``G = Σ x xᵀ`` over the real calibration tokens, never the activations
themselves: memory is ``O(n²)`` per layer whatever the number of tokens. Each batch's product is
computed in float32 (float64 for a float64 model) on the layer's device and added to a float64
running sum, so a long calibration does not lose the small eigenvalues to round-off.

It also keeps the token sum ``Σ x`` (optional per batch): the query-key form of attention
compression (:mod:`drone_hf.solver.attention`) needs the Gram of ``[x; 1]``, whose extra row is
``Σ x`` and the token count, because projection biases multiply the appended 1.
"""

from __future__ import annotations

import torch

#: Column-block width of the symmetric Gram product (see :meth:`GramObserver.batch_product`).
SYMMETRIC_BLOCK = 192
#: Batches with fewer real tokens than this use one GEMM: their blocks are too thin to gain.
SYMMETRIC_MIN_TOKENS = 1536


class GramObserver:
    """Accumulates ``Σ x xᵀ`` and the token count for one layer input of width ``features``."""

    def __init__(self, features: int, name: str = "") -> None:
        self.features = features
        self.name = name
        self.gram: torch.Tensor | None = None
        self.num_tokens = 0
        #: float64 ``Σ x`` [features] over the batches that passed ``token_sum`` to :meth:`add`.
        self.token_sum: torch.Tensor | None = None
        #: tokens covered by ``token_sum``; equals ``num_tokens`` when every batch passed its sum.
        self.summed_tokens = 0

    @staticmethod
    def batch_product(tokens: torch.Tensor) -> torch.Tensor:
        """``tokensᵀ tokens`` for [N, n] real tokens, in float32 (float64 for float64 inputs).

        The product is symmetric, so for wide inputs only the blocks on and above the diagonal are
        multiplied (``b`` column blocks: ``(b+1)/2b`` of the FLOPs of one full GEMM) and the rest is
        mirrored. BLAS has a symmetric rank-k update for this, but torch does not expose it; blocks
        of about ``SYMMETRIC_BLOCK`` columns keep each GEMM large enough to run at full speed. Small
        products (narrow inputs or few tokens) stay one GEMM, where blocking measured no faster.
        Entries equal the one-GEMM product up to float rounding (the summation order may differ)."""
        wide = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        t = tokens.to(wide)
        n = t.shape[1]
        if n < 2 * SYMMETRIC_BLOCK or t.shape[0] < SYMMETRIC_MIN_TOKENS:
            return t.T @ t
        step = -(-n // -(-n // SYMMETRIC_BLOCK))  # equal blocks of at most SYMMETRIC_BLOCK columns
        bounds = [(i, min(i + step, n)) for i in range(0, n, step)]
        out = t.new_empty(n, n)
        rows = t.T
        for a, (i0, i1) in enumerate(bounds):
            for j0, j1 in bounds[a:]:
                block = rows[i0:i1] @ t[:, j0:j1]
                out[i0:i1, j0:j1] = block
                if j0 != i0:
                    out[j0:j1, i0:i1] = block.T
        return out

    @staticmethod
    def batch_sum(tokens: torch.Tensor) -> torch.Tensor:
        """``Σ x`` [n] of [N, n] real tokens, in the same precision as :meth:`batch_product`."""
        wide = torch.float64 if tokens.dtype == torch.float64 else torch.float32
        return tokens.to(wide).sum(dim=0)

    @property
    def has_token_sum(self) -> bool:
        """Whether ``token_sum`` covers every observed token (needed for attention compression)."""
        return self.token_sum is not None and self.summed_tokens == self.num_tokens

    def add(
        self, product: torch.Tensor, num_tokens: int, batch_index: int = -1, token_sum: torch.Tensor | None = None
    ) -> None:
        """Add one batch's product (from :meth:`batch_product`) covering ``num_tokens`` tokens, and
        optionally its token sum (from :meth:`batch_sum`)."""
        # One reduction decides: NaN/inf in any token reaches its sum (and the product's). A float32
        # overflow of x·x with finite x is caught by collect_grams' final check of the whole Gram.
        probe = token_sum if token_sum is not None else product.sum()
        if not bool(torch.isfinite(probe).all()):
            raise ValueError(
                f"Non-finite activations (NaN/inf) reached layer {self.name!r} in calibration batch {batch_index}. "
                "Load the model in float32 (dtype=torch.float32) or check the calibration texts."
            )
        if self.gram is None:
            self.gram = torch.zeros(self.features, self.features, dtype=torch.float64, device=product.device)
        self.gram.add_(product)  # float32 product into the float64 sum, no float64 copy of it
        self.num_tokens += num_tokens
        if token_sum is not None:
            if self.token_sum is None:
                self.token_sum = torch.zeros(self.features, dtype=torch.float64, device=token_sum.device)
            self.token_sum.add_(token_sum)
            self.summed_tokens += num_tokens
