"""``GramObserver``: the streamed input statistics of one layer.

DRONE needs only ``G = Σ x xᵀ`` over the real calibration tokens, never the activations
themselves: memory is ``O(n²)`` per layer whatever the number of tokens.

The hot path is :meth:`GramObserver.accumulate`. The Gram products are about a third of the
forward pass's FLOPs, so they decide how close calibration comes to the cost of the forward pass
alone (``benchmarks/calibration.py``). Two things keep them cheap:

* **One triangle.** ``xᵀx`` is symmetric; BLAS has ``syrk`` for that but torch does not expose it
  (and a second BLAS thread pool, e.g. SciPy's, fights torch's for the cores). So the product is
  computed as row strips of ``STRIP_ROWS`` rows, each multiplied only from its diagonal block
  rightwards: ``(b+1)/2b`` of the FLOPs for ``b`` strips, in ``b`` GEMMs big enough to run at full
  speed. The other triangle is mirrored once per flush, not per batch.
* **Fused accumulation.** Strips go straight into a float32 partial sum (``addmm_``: no product
  tensor, no separate add), which is flushed into the float64 running sum after the batch that
  brings it to ``FLUSH_TOKENS`` tokens and whenever :attr:`GramObserver.gram` is read. Each
  float64 term is therefore as precise as one float32 GEMM over fewer than ``FLUSH_TOKENS`` plus
  one batch of tokens (a batch of 32 x 128 tokens alone is such a GEMM), and a long calibration
  still does not lose the small eigenvalues to round-off. Float64 models accumulate in float64.

It also keeps the token sum ``Σ x`` (optional per batch): the query-key form of attention
compression (:mod:`drone_hf.solver.attention`) needs the Gram of ``[x; 1]``, whose extra row is
``Σ x`` and the token count, because projection biases multiply the appended 1.
"""

from __future__ import annotations

import torch

#: Rows per strip of the one-triangle product (measured best between 64 and 128 on CPU).
STRIP_ROWS = 96
#: Tokens a float32 partial sum covers before it is flushed into the float64 running sum.
FLUSH_TOKENS = 4096


def _strips(n: int) -> list[tuple[int, int]]:
    """Equal row ranges of at most ``STRIP_ROWS`` rows covering ``0..n``."""
    count = -(-n // STRIP_ROWS)
    step = -(-n // count)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _wide(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` in the products' precision: float32, or float64 for float64 inputs."""
    return tokens.to(torch.float64 if tokens.dtype == torch.float64 else torch.float32)


def _mirror(upper: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose upper triangle (diagonal included) is that of ``upper``."""
    tri = torch.triu(upper)
    full = tri + tri.T
    full.diagonal().sub_(tri.diagonal())
    return full


class GramObserver:
    """Accumulates ``Σ x xᵀ`` and the token count for one layer input of width ``features``."""

    def __init__(self, features: int, name: str = "") -> None:
        self.features = features
        self.name = name
        self._strips = _strips(features)  # row ranges of the one-triangle product
        self._gram: torch.Tensor | None = None
        #: float32 (float64 for float64 inputs) upper strips of the products since the last flush.
        self._partial: torch.Tensor | None = None
        self._partial_tokens = 0
        self.num_tokens = 0
        #: float64 ``Σ x`` [features] over the batches that passed token sums.
        self.token_sum: torch.Tensor | None = None
        #: tokens covered by ``token_sum``; equals ``num_tokens`` when every batch passed its sum.
        self.summed_tokens = 0

    @property
    def gram(self) -> torch.Tensor | None:
        """The float64 ``Σ x xᵀ`` so far (``None`` before the first batch)."""
        self._flush()
        return self._gram

    @gram.setter
    def gram(self, value: torch.Tensor | None) -> None:
        self._gram, self._partial, self._partial_tokens = value, None, 0

    def _flush(self) -> None:
        if self._partial is None or self._partial_tokens == 0:
            return
        # Out of place: the sums may be inference tensors read (and flushed) outside inference mode.
        full = _mirror(self._partial).to(torch.float64)
        self._gram = full if self._gram is None else self._gram + full
        self._partial, self._partial_tokens = None, 0

    def share_from(self, leader: GramObserver) -> None:
        """Take ``leader``'s statistics (a layer reading the very same input tensor)."""
        self.gram = leader.gram
        self.num_tokens, self.token_sum, self.summed_tokens = leader.num_tokens, leader.token_sum, leader.summed_tokens

    def state(self) -> dict:
        """The accumulators as they are (partial sum not flushed), for a resumable snapshot."""
        return {
            "gram": self._gram,
            "partial": self._partial if self._partial_tokens else None,
            "partial_tokens": self._partial_tokens,
            "num_tokens": self.num_tokens,
            "token_sum": self.token_sum,
            "summed_tokens": self.summed_tokens,
        }

    def load_state(self, state: dict, device: torch.device | None = None) -> None:
        """Restore :meth:`state` (entries written before the partial sum existed have none)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.to(device) if t is not None and device is not None else t

        self._gram, self._partial = move(state["gram"]), move(state.get("partial"))
        self._partial_tokens = int(state.get("partial_tokens", 0)) if self._partial is not None else 0
        self.token_sum = move(state["token_sum"])
        self.num_tokens, self.summed_tokens = int(state["num_tokens"]), int(state["summed_tokens"])

    @staticmethod
    def batch_product(tokens: torch.Tensor) -> torch.Tensor:
        """``tokensᵀ tokens`` for [N, n] real tokens, in float32 (float64 for float64 inputs): one
        batch's full Gram, for :meth:`add`. The calibration pipeline uses :meth:`accumulate`."""
        t = _wide(tokens)
        return t.T @ t

    @staticmethod
    def batch_sum(tokens: torch.Tensor) -> torch.Tensor:
        """``Σ x`` [n] of [N, n] real tokens, in the same precision as :meth:`batch_product`."""
        return _wide(tokens).sum(dim=0)

    @property
    def has_token_sum(self) -> bool:
        """Whether ``token_sum`` covers every observed token (needed for attention compression)."""
        return self.token_sum is not None and self.summed_tokens == self.num_tokens

    def _check_finite(self, probe: torch.Tensor, batch_index: int) -> None:
        # One reduction decides: NaN/inf in any token reaches its sum (and the product's). A float32
        # overflow of x·x with finite x is caught by collect_grams' final check of the whole Gram.
        if not bool(torch.isfinite(probe).all()):
            raise ValueError(
                f"Non-finite activations (NaN/inf) reached layer {self.name!r} in calibration batch {batch_index}. "
                "Load the model in float32 (dtype=torch.float32) or check the calibration texts."
            )

    def _count(self, num_tokens: int, token_sum: torch.Tensor | None) -> None:
        self.num_tokens += num_tokens
        if token_sum is not None:
            if self.token_sum is None:
                self.token_sum = torch.zeros(self.features, dtype=torch.float64, device=token_sum.device)
            self.token_sum.add_(token_sum)
            self.summed_tokens += num_tokens

    def accumulate(
        self, tokens: torch.Tensor, batch_index: int = -1, token_sums: bool = False, count: int | None = None
    ) -> None:
        """Add [N, n] real tokens: their Gram (one triangle, into the float32 partial sum) and,
        with ``token_sums``, their sum. Raises on NaN/inf before anything of this batch is counted.

        ``count``: how many tokens the rows stand for (default ``N``); the exact Fisher adds one set
        of rows per class for the same tokens and counts them once."""
        t = _wide(tokens)
        total = t.sum(dim=0) if token_sums else None
        # Checked before anything is added, so a bad batch leaves the sums as they were.
        self._check_finite(total if total is not None else t.sum(), batch_index)
        if self._partial is None:
            self._partial = torch.zeros(self.features, self.features, dtype=t.dtype, device=t.device)
        rows = t.T
        for i0, i1 in self._strips:
            self._partial[i0:i1, i0:].addmm_(rows[i0:i1], t[:, i0:])
        self._partial_tokens += t.shape[0]
        self._count(t.shape[0] if count is None else count, total)
        if self._partial_tokens >= FLUSH_TOKENS:
            self._flush()

    def add(
        self, product: torch.Tensor, num_tokens: int, batch_index: int = -1, token_sum: torch.Tensor | None = None
    ) -> None:
        """Add one batch's full product (from :meth:`batch_product`) covering ``num_tokens`` tokens,
        and optionally its token sum (from :meth:`batch_sum`)."""
        self._check_finite(token_sum if token_sum is not None else product.sum(), batch_index)
        self._flush()
        wide = product.to(torch.float64)
        self._gram = wide if self._gram is None else self._gram + wide  # out of place, as in _flush
        self._count(num_tokens, token_sum)
