"""DRONE for self-attention: the data-aware rank-k query-key form of every head.

Pure ``torch.linalg``, like :mod:`.closed_form`: no transformers import, no modules, tensors in and
out. Design note: ``method.md`` section 2.

Notation (shapes in brackets), for one attention layer with ``H`` heads of width ``d`` reading inputs
of width ``n``:

* ``x̃ = [x; 1]`` [n+1]: the input with a constant 1 appended, so biases ride along.
* ``W̃_Q^h = [W_Q^h, b_Q^h]`` [d, n+1] (same for keys); head h scores
  ``s_ij = x̃_iᵀ M_h x̃_j / sqrt(d)`` with ``M_h = W̃_Q^hᵀ W̃_K^h`` [n+1, n+1], rank <= d.
* ``G̃ = Σ x̃ x̃ᵀ = [[G, Σx], [Σxᵀ, N]]`` [n+1, n+1] over the N calibration tokens
  (:func:`augmented_gram`); ``G̃ = V Λ Vᵀ``, kept part ``V_t`` [n+1, t], ``S = Λ_t^{1/2}``.

Objective: the scores of *every* pair of calibration tokens, ``min_{rank M' <= k} ||X̃ᵀ (M_h - M') X̃||_F``
(``X̃`` [n+1, N] the stacked inputs). Since ``X̃ = V_t S Pᵀ`` with orthonormal ``P``, this is
``||C - S V_tᵀ M' V_t S||_F`` with ``C = S V_tᵀ M_h V_t S = Aᵀ B``, ``A = W̃_Q^h V_t S``,
``B = W̃_K^h V_t S`` [d, t]: the optimum is the truncated SVD of ``C`` and its squared error is the sum
of the discarded ``σ_j(C)²``, which are the singular values of the N x N score matrix itself.

Factored route (``C`` has rank <= d; the dense t x t product is never formed): QR ``Aᵀ = Q_a R_a``,
``Bᵀ = Q_b R_b`` (``R`` [m, d], m = min(t, d)), small SVD ``R_a R_bᵀ = U' Σ V'ᵀ`` [m, m], so
``C = (Q_a U') Σ (Q_b V')ᵀ``. The new projections are maps of the old head outputs,

    T_q = Σ_k^{-1/2} V'_kᵀ R_b  [k, d],     T_k = Σ_k^{-1/2} U'_kᵀ R_a  [k, d],
    query' = T_q W̃_Q^h P x̃,                key' = T_k W̃_K^h P x̃,          P = V_t V_tᵀ,

and ``query'ᵀ key' = x̃ᵀ V_t S⁻¹ C_k S⁻¹ V_tᵀ x̃``: exactly the optimum (substitute
``R_a R_bᵀ V'_k = U'_k Σ_k``). The only division is by the *kept* singular values ``Σ_k``, never by
small singular values of the data. Row j of ``query'`` and of ``key'`` both have norm ``σ_j^{1/2}``
on the calibration data (balanced). The last column of ``T W̃ P`` is the new bias.

``damp = δ`` replaces ``G̃`` by ``G̃ + δ·mean(diag G̃)·I`` (all directions kept, ``P = I``), as for
linear layers; ``method="svd"`` uses ``G̃ = I``: plain truncated SVD of ``M_h``, the data-free
baseline. Errors are always reported on the undamped calibration data through per-head ``d x d``
Grams: with ``Γ_q = W̃_Q G̃ W̃_Qᵀ``, ``Γ_k = W̃_K G̃ W̃_Kᵀ`` and ``D = I - T_qᵀ T_k``, the squared
score error is ``tr(Dᵀ Γ_q D Γ_k)`` and the total ``tr(Γ_q Γ_k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .closed_form import METHODS
from .numerics import EIGEN_TOL, SINGULAR_TOL, as_float64, check_damp, check_finite


def augmented_gram(gram: torch.Tensor, token_sum: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``G̃ = Σ [x; 1][x; 1]ᵀ`` [n+1, n+1] float64 from ``G = Σ x xᵀ`` [n, n], ``Σ x`` [n] and N.

    The bias of a projection multiplies the appended 1, so the query-key form with biases needs
    the token sum and count besides the Gram (:class:`~drone_hf.calibration.GramObserver` keeps them).
    """
    g = as_float64(gram)
    s = as_float64(token_sum).reshape(-1)
    n = g.shape[0]
    if g.dim() != 2 or tuple(g.shape) != (n, n) or s.numel() != n:
        raise ValueError(
            f"gram {tuple(gram.shape)} and token_sum {tuple(token_sum.shape)} do not fit: expected [n, n] and [n]."
        )
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens!r} must be a non-negative integer (the calibration token count).")
    out = g.new_empty(n + 1, n + 1)
    out[:n, :n] = g
    out[:n, n] = s
    out[n, :n] = s
    out[n, n] = float(num_tokens)
    return out


@dataclass(frozen=True)
class QKProjections:
    """Rank-k query and key projections of one layer, heads stacked head-major (row ``h·k + j``).

    Args:
        query_weight: [H·k, n] float64. query_bias: [H·k].
        key_weight: [H·k, n] float64. key_bias: [H·k].
        rank: per-head width ``k`` actually used (at most the layer's numerical rank, at least 1).
        relative_error: ``||scores - scores'||_F / ||scores||_F`` over all pairs of calibration tokens
            and all heads (``None`` without calibration data).
    """

    query_weight: torch.Tensor
    query_bias: torch.Tensor
    key_weight: torch.Tensor
    key_bias: torch.Tensor
    rank: int
    relative_error: float | None


@dataclass(frozen=True)
class QKDecomposition:
    """Everything needed to cut one attention layer's query-key form at any per-head rank.

    Built once by :func:`decompose_qk`; :meth:`projections` then costs two small products per head.

    Attributes:
        query, key: [H, d, n+1] float64, ``W̃ P`` per head (the projector ``P`` of the seen input span
            applied; ``P = I`` for ``damp > 0`` and ``"svd"``).
        query_maps, key_maps: [H, m, d] float64, rows of ``T_q`` / ``T_k`` best first; rows past a
            head's numerical rank are zero.
        singular_values: [H, m] ``σ_j(C_h)`` (zero past a head's numerical rank).
        head_ranks: numerical rank of each head's ``C_h``.
        query_gram, key_gram: [H, d, d] ``Γ_q``, ``Γ_k`` on the undamped data (``None`` without data).
        method: ``"drone"`` or ``"svd"``.
    """

    query: torch.Tensor
    key: torch.Tensor
    query_maps: torch.Tensor
    key_maps: torch.Tensor
    singular_values: torch.Tensor
    head_ranks: tuple[int, ...]
    query_gram: torch.Tensor | None
    key_gram: torch.Tensor | None
    method: str

    @property
    def num_heads(self) -> int:
        return int(self.query.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.query.shape[1])

    @property
    def in_features(self) -> int:
        return int(self.query.shape[2]) - 1

    @property
    def max_rank(self) -> int:
        """Largest per-head rank with content in any head (the width a module never needs to exceed)."""
        return max(self.head_ranks, default=0)

    def _maps(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``T_q``, ``T_k`` cut to ``rank`` rows (zero rows appended past ``m``)."""
        tq, tk = self.query_maps[:, :rank], self.key_maps[:, :rank]
        short = rank - tq.shape[1]
        if short > 0:
            tq = torch.cat([tq, tq.new_zeros(self.num_heads, short, self.head_dim)], dim=1)
            tk = torch.cat([tk, tk.new_zeros(self.num_heads, short, self.head_dim)], dim=1)
        return tq, tk

    def head_squared_errors(self, rank: int) -> torch.Tensor | None:
        """[H] squared score error ``||X̃ᵀ (M_h - M'_h) X̃||_F²`` of each head at per-head rank ``rank``."""
        if self.query_gram is None or self.key_gram is None:
            return None
        tq, tk = self._maps(rank)
        eye = torch.eye(self.head_dim, dtype=tq.dtype, device=tq.device)
        d = eye - tq.transpose(1, 2) @ tk  # [H, d, d]
        err = (d.transpose(1, 2) @ self.query_gram @ d @ self.key_gram).diagonal(dim1=1, dim2=2).sum(-1)
        return err.clamp_min(0.0)

    def head_energies(self) -> torch.Tensor | None:
        """[H] ``||X̃ᵀ M_h X̃||_F² = tr(Γ_q Γ_k)``: the squared norm of each head's calibration scores."""
        if self.query_gram is None or self.key_gram is None:
            return None
        return torch.einsum("hab,hba->h", self.query_gram, self.key_gram).clamp_min(0.0)

    def relative_error(self, rank: int) -> float | None:
        """Relative score error over all heads and token pairs at per-head rank ``rank``."""
        err, tot = self.head_squared_errors(rank), self.head_energies()
        if err is None or tot is None:
            return None
        total = float(tot.sum())
        return 0.0 if total == 0.0 else math.sqrt(float(err.sum()) / total)

    def relative_errors(self) -> torch.Tensor | None:
        """[d + 1] relative score error for every per-head rank k = 0..d."""
        if self.query_gram is None:
            return None
        return torch.tensor([self.relative_error(k) for k in range(self.head_dim + 1)], dtype=torch.float64)

    def projections(self, rank: int) -> QKProjections:
        """The rank-``rank`` query and key projections (weights and biases, float64).

        The width used is ``min(rank, max_rank)`` (at least 1): ranks beyond what calibration can
        tell apart would only add zero rows. Heads of lower numerical rank get zero rows.

        Raises:
            ValueError: ``rank`` is not an integer in [1, head_dim].
        """
        d = self.head_dim
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
            raise ValueError(
                f"attention rank={rank!r} is not valid for heads of width {d}: use an integer in [1, {d}]."
            )
        k = max(1, min(rank, self.max_rank))
        tq, tk = self._maps(k)
        q = (tq @ self.query).reshape(self.num_heads * k, -1)  # [H·k, n+1]
        kk = (tk @ self.key).reshape(self.num_heads * k, -1)
        return QKProjections(
            query_weight=q[:, :-1].contiguous(),
            query_bias=q[:, -1].contiguous(),
            key_weight=kk[:, :-1].contiguous(),
            key_bias=kk[:, -1].contiguous(),
            rank=k,
            relative_error=self.relative_error(k),
        )


def _augmented_weight(weight: torch.Tensor, bias: torch.Tensor | None, what: str) -> torch.Tensor:
    w = as_float64(weight)
    if w.dim() != 2:
        raise ValueError(f"{what} weight must be 2-D [out, in], got shape {tuple(weight.shape)}.")
    check_finite(w, f"{what} weight")
    b = w.new_zeros(w.shape[0]) if bias is None else as_float64(bias).reshape(-1)
    if b.numel() != w.shape[0]:
        raise ValueError(f"{what} bias has {b.numel()} entries but the weight has {w.shape[0]} outputs.")
    check_finite(b, f"{what} bias")
    return torch.cat([w, b[:, None]], dim=1)


def decompose_qk(
    query_weight: torch.Tensor,
    query_bias: torch.Tensor | None,
    key_weight: torch.Tensor,
    key_bias: torch.Tensor | None,
    num_heads: int,
    gram: torch.Tensor | None = None,
    *,
    method: str = "drone",
    damp: float = 0.0,
) -> QKDecomposition:
    """Decompose one layer's query-key form once so any per-head rank can be cut from it.

    Args:
        query_weight, key_weight: [H·d, n] (out x in), heads stacked head-major as every
            transformers attention splits them (``view(..., H, d)``); any float dtype.
        query_bias, key_bias: [H·d] or ``None``.
        num_heads: ``H``.
        gram: [n+1, n+1] augmented Gram ``G̃`` from :func:`augmented_gram`. Required for ``"drone"``;
            optional for ``"svd"`` (then only the errors use it).
        method: ``"drone"`` (data-aware optimum) or ``"svd"`` (truncated SVD of each ``M_h``).
        damp: relative ridge ``δ`` on ``G̃``; 0 is the exact optimum.

    Cost: one ``(n+1)²`` eigendecomposition shared by all heads, then per head two ``t x d`` QRs and
    one ``d x d`` SVD, in float64; memory ``O(n² + H·d·n)``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported: use one of {list(METHODS)}.")
    check_damp(damp)
    wq = _augmented_weight(query_weight, query_bias, "query")
    wk = _augmented_weight(key_weight, key_bias, "key")
    if wq.shape != wk.shape:
        raise ValueError(
            f"query {tuple(query_weight.shape)} and key {tuple(key_weight.shape)} weights differ in shape."
        )
    out, n1 = wq.shape
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or out % num_heads:
        raise ValueError(f"num_heads={num_heads!r} must be a positive integer dividing the {out} projection outputs.")
    d = out // num_heads
    if gram is None and method == "drone":
        raise ValueError("method='drone' needs the augmented input Gram; pass gram= or use method='svd'.")

    g = None
    if gram is not None:
        g = as_float64(gram)
        if tuple(g.shape) != (n1, n1):
            raise ValueError(
                f"gram has shape {tuple(g.shape)} but the projections take {n1 - 1} inputs: expected the augmented "
                f"({n1}, {n1}) Gram of [x; 1] (see augmented_gram)."
            )
        check_finite(g, "gram")
        g = 0.5 * (g + g.T)

    projector = None  # [n+1, t] basis of the seen span (drone, damp = 0 only)
    if method == "svd":
        root = torch.eye(n1, dtype=torch.float64, device=wq.device)
    else:
        assert g is not None
        lam, vec = torch.linalg.eigh(g)
        lam_max = float(lam[-1]) if lam.numel() else 0.0
        if damp > 0:
            ridge = damp * float(torch.diagonal(g).mean())
            root = vec * (lam.clamp_min(0.0) + ridge).sqrt()
        else:
            keep = lam > EIGEN_TOL * lam_max if lam_max > 0 else torch.zeros_like(lam, dtype=torch.bool)
            root = vec[:, keep] * lam[keep].sqrt()
            projector = vec[:, keep]

    wq_h = wq.reshape(num_heads, d, n1)
    wk_h = wk.reshape(num_heads, d, n1)
    if projector is not None:
        wq_h = (wq_h @ projector) @ projector.T
        wk_h = (wk_h @ projector) @ projector.T
    t = root.shape[1]
    if t == 0:  # calibration saw nothing: no direction has content
        zeros = wq.new_zeros(num_heads, 0, d)
        maps_q = maps_k = zeros
        sing = wq.new_zeros(num_heads, 0)
        ranks = (0,) * num_heads
    else:
        a = wq.reshape(num_heads, d, n1) @ root  # [H, d, t]: A = W̃_Q V_t S
        b = wk.reshape(num_heads, d, n1) @ root
        _, r_a = torch.linalg.qr(a.transpose(1, 2), mode="reduced")  # [H, m, d]
        _, r_b = torch.linalg.qr(b.transpose(1, 2), mode="reduced")
        u, sing, vh = torch.linalg.svd(r_a @ r_b.transpose(1, 2))  # [H, m, m]
        top = sing[:, :1]
        kept = (sing > SINGULAR_TOL * top) & (top > 0)
        ranks = tuple(int(r) for r in kept.sum(dim=1))
        inv_sqrt = torch.where(kept, sing.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(), torch.zeros_like(sing))
        maps_q = inv_sqrt[:, :, None] * (vh @ r_b)  # Σ^{-1/2} V'ᵀ R_b
        maps_k = inv_sqrt[:, :, None] * (u.transpose(1, 2) @ r_a)  # Σ^{-1/2} U'ᵀ R_a
        sing = torch.where(kept, sing, torch.zeros_like(sing))

    gq = gk = None
    if g is not None:
        full_q, full_k = wq.reshape(num_heads, d, n1), wk.reshape(num_heads, d, n1)
        gq = full_q @ g @ full_q.transpose(1, 2)  # Γ_q = W̃_Q G̃ W̃_Qᵀ [H, d, d]
        gk = full_k @ g @ full_k.transpose(1, 2)
    return QKDecomposition(
        query=wq_h,
        key=wk_h,
        query_maps=maps_q,
        key_maps=maps_k,
        singular_values=sing,
        head_ranks=ranks,
        query_gram=gq,
        key_gram=gk,
        method=method,
    )
