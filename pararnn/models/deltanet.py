"""DeltaNet / DeltaProduct: a matrix state updated by n_h generalised Householder steps per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cell import Cell
from ..structure import Block


class DeltaProduct(Cell):
    """Matrix state ``H ∈ R^{d_k × d_v}``; per token, for j = 1..n_h:
    ``H <- (I - β_j k_j k_jᵀ) H + β_j k_j v_jᵀ``, keys L2-normalised, ``β ∈ (0, 1)`` or ``(0, 2)``
    with ``allow_neg_eigval``. So ``H_t = A_t H_{t-1} + B_t`` with ``A_t = Π_j (I - β_j k_j k_jᵀ)``.

    The engine's state is ``S = Hᵀ`` flattened, ``[B, d_v * d_k]``, so that ``S' = S A_tᵀ`` and the
    Jacobian is ``I_{d_v} ⊗ A_t``: structure ``Block(d_k, shared=True)``, storing ``A_t [d_k, d_k]``
    only. Output ``y_t = H_tᵀ q_t`` ``[B, T, d_v]``.
    """

    def __init__(self, input_size: int, d_k: int, d_v: int, n_h: int = 1, allow_neg_eigval: bool = False):
        super().__init__()
        if n_h < 1:
            raise ValueError(f"n_h must be >= 1, got {n_h}")
        self.input_size, self.d_k, self.d_v, self.n_h = input_size, d_k, d_v, n_h
        self.allow_neg_eigval = allow_neg_eigval
        self.state_size = d_k * d_v
        self.structure = Block(d_k, shared=True)
        self.k_proj = nn.Linear(input_size, n_h * d_k)
        self.v_proj = nn.Linear(input_size, n_h * d_v)
        self.b_proj = nn.Linear(input_size, n_h)
        self.q_proj = nn.Linear(input_size, d_k)

    def betas_keys_values(self, x):
        """``β [B, T, n_h]``, unit keys ``k [B, T, n_h, d_k]`` (L2-normalised silu of a projection, as in
        the DeltaNet/DeltaProduct layers), values ``v [B, T, n_h, d_v]``."""
        beta = torch.sigmoid(self.b_proj(x)) * (2.0 if self.allow_neg_eigval else 1.0)
        k = F.normalize(F.silu(self.k_proj(x)).unflatten(-1, (self.n_h, self.d_k)), dim=-1)  # as in the papers' layer
        v = self.v_proj(x).unflatten(-1, (self.n_h, self.d_v))
        return beta, k, v

    def prepare(self, x):
        beta, k, v = self.betas_keys_values(x)
        return torch.cat([beta, k.flatten(-2), v.flatten(-2)], -1)  # [B, T, n_h (1 + d_k + d_v)]

    def _unpack(self, u):
        n, dk, dv = self.n_h, self.d_k, self.d_v
        beta = u[..., :n]
        k = u[..., n:n + n * dk].unflatten(-1, (n, dk))
        v = u[..., n + n * dk:].unflatten(-1, (n, dv))
        return beta, k, v

    def step(self, s, u):
        beta, k, v = self._unpack(u)
        S = s.unflatten(-1, (self.d_v, self.d_k))  # [N, d_v, d_k] = Hᵀ
        for j in range(self.n_h):
            kj, bj = k[:, j], beta[:, j, None, None]  # [N, d_k], [N, 1, 1]
            Sk = (S @ kj.unsqueeze(-1)).squeeze(-1)  # [N, d_v] = Hᵀ k
            S = S - bj * (Sk - v[:, j]).unsqueeze(-1) * kj.unsqueeze(-2)
        return S.flatten(-2)

    def transition(self, u):
        """``A_t = Π_j (I - β_j k_j k_jᵀ)`` ``[N, d_k, d_k]`` (later steps on the left)."""
        beta, k, _ = self._unpack(u)
        A = torch.eye(self.d_k, dtype=u.dtype, device=u.device).expand(u.shape[0], -1, -1)
        for j in range(self.n_h):
            kj = k[:, j]
            A = A - beta[:, j, None, None] * kj.unsqueeze(-1) * (kj.unsqueeze(-2) @ A)
        return A

    def step_and_jacobian(self, s, u):
        """``(f [N, d], A_t [N, d_k, d_k])``: the Jacobian ``I ⊗ A_t`` in shared-block form."""
        return self.step(s, u), self.transition(u)

    @property
    def output_size(self) -> int:
        return self.d_v

    def output(self, s, x):
        q = F.normalize(self.q_proj(x), dim=-1)  # [B, T, d_k]
        S = s.unflatten(-1, (self.d_v, self.d_k))  # [B, T, d_v, d_k]
        return (S @ q.unsqueeze(-1)).squeeze(-1)  # Hᵀ q: [B, T, d_v]


class DeltaNet(DeltaProduct):
    """DeltaNet: DeltaProduct with one Householder step per token (n_h = 1)."""

    def __init__(self, input_size: int, d_k: int, d_v: int, allow_neg_eigval: bool = False):
        super().__init__(input_size, d_k, d_v, n_h=1, allow_neg_eigval=allow_neg_eigval)
