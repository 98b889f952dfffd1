"""DeltaNet / DeltaProduct: a matrix state updated by n_h generalised Householder steps per token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cell import Cell
from ..linear import Linear
from ..structure import Block


class DeltaProduct(Cell):
    """Matrix state ``H ∈ R^{d_k × d_v}`` per head; per token, for j = 1..n_h:
    ``H <- (I - β_j k_j k_jᵀ) H + β_j k_j v_jᵀ``, keys an L2-normalised silu of a projection,
    ``β ∈ (0, 1)`` or ``(0, 2)`` with ``allow_neg_eigval``. So ``H_t = A_t H_{t-1} + B_t`` with
    ``A_t = Π_j (I - β_j k_j k_jᵀ)``. ``n_heads`` independent heads (each its own keys, values,
    β and query) are concatenated in the output.

    The engine's state is ``S = Hᵀ`` of every head flattened, ``[B, n_heads * d_v * d_k]``, so that
    ``S' = S A_tᵀ`` per head and the Jacobian is ``I_{d_v} ⊗ A_t`` per head: structure
    ``Block(d_k, shared=True)`` with one head (storing ``A_t [d_k, d_k]`` only), ``Block(d_k)``
    with several (each head's ``A_t`` repeated for its d_v rows). Output ``y_t = H_tᵀ q_t`` per
    head, ``[B, T, n_heads * d_v]``.

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        d_k: key size (rows of each head's matrix state).
        d_v: value size (its columns); the state is ``[B, n_heads·d_k·d_v]``.
        n_h: Householder steps per token.
        allow_neg_eigval: β ∈ (0, 2) instead of (0, 1).
        n_heads: independent heads.
    """

    def __init__(self, input_size: int, d_k: int, d_v: int, n_h: int = 1, allow_neg_eigval: bool = False,
                 n_heads: int = 1):
        super().__init__()
        if n_h < 1:
            raise ValueError(f"n_h must be >= 1, got {n_h}")
        if n_heads < 1:
            raise ValueError(f"n_heads must be >= 1, got {n_heads}")
        self.input_size, self.d_k, self.d_v, self.n_h, self.n_heads = input_size, d_k, d_v, n_h, n_heads
        self.allow_neg_eigval = allow_neg_eigval
        self.state_size = n_heads * d_k * d_v
        self.structure = Block(d_k, shared=True) if n_heads == 1 else Block(d_k)
        m = n_heads * n_h  # Householder steps per token over all heads, head-major
        self.k_proj = Linear(input_size, m * d_k)
        self.v_proj = Linear(input_size, m * d_v)
        self.b_proj = Linear(input_size, m)
        self.q_proj = Linear(input_size, n_heads * d_k)

    def betas_keys_values(self, x):
        """``β [B, T, m]``, unit keys ``k [B, T, m, d_k]`` (L2-normalised silu of a projection, as in
        the DeltaNet/DeltaProduct layers), values ``v [B, T, m, d_v]``; ``m = n_heads · n_h``, entry
        ``h · n_h + j`` being head h's j-th step."""
        m = self.n_heads * self.n_h
        beta = torch.sigmoid(self.b_proj(x)) * (2.0 if self.allow_neg_eigval else 1.0)
        k = F.normalize(F.silu(self.k_proj(x)).unflatten(-1, (m, self.d_k)), dim=-1)
        v = self.v_proj(x).unflatten(-1, (m, self.d_v))
        return beta, k, v

    def prepare(self, x):
        beta, k, v = self.betas_keys_values(x)
        return torch.cat([beta, k.flatten(-2), v.flatten(-2)], -1)  # [B, T, m (1 + d_k + d_v)]

    def _unpack(self, u):
        """``β [N, H, n_h]``, ``k [N, H, n_h, d_k]``, ``v [N, H, n_h, d_v]`` from ``u [N, *]``."""
        H, n, dk, dv = self.n_heads, self.n_h, self.d_k, self.d_v
        m = H * n
        beta = u[..., :m].unflatten(-1, (H, n))
        k = u[..., m:m + m * dk].unflatten(-1, (H, n, dk))
        v = u[..., m + m * dk:].unflatten(-1, (H, n, dv))
        return beta, k, v

    def step(self, s, u):
        beta, k, v = self._unpack(u)
        S = s.unflatten(-1, (self.n_heads, self.d_v, self.d_k))  # [N, H, d_v, d_k] = Hᵀ per head
        for j in range(self.n_h):
            kj, bj = k[:, :, j], beta[:, :, j, None, None]  # [N, H, d_k], [N, H, 1, 1]
            Sk = (S @ kj.unsqueeze(-1)).squeeze(-1)  # [N, H, d_v] = Hᵀ k
            S = S - bj * (Sk - v[:, :, j]).unsqueeze(-1) * kj.unsqueeze(-2)
        return S.flatten(-3)

    def head_transitions(self, u):
        """``A_t = Π_j (I - β_j k_j k_jᵀ)`` per head, ``[N, n_heads, d_k, d_k]`` (later steps on the left)."""
        beta, k, _ = self._unpack(u)
        A = torch.eye(self.d_k, dtype=u.dtype, device=u.device).expand(u.shape[0], self.n_heads, -1, -1)
        for j in range(self.n_h):
            kj = k[:, :, j]
            A = A - beta[:, :, j, None, None] * kj.unsqueeze(-1) * (kj.unsqueeze(-2) @ A)
        return A

    def transition(self, u):
        """The Jacobian in storage form: ``A_t [N, d_k, d_k]`` (one head), or each head's ``A_t``
        repeated for its d_v rows, ``[N, n_heads · d_v, d_k, d_k]``."""
        A = self.head_transitions(u)
        if self.n_heads == 1:
            return A[:, 0]
        N, H, k = A.shape[0], self.n_heads, self.d_k
        return A.unsqueeze(2).expand(N, H, self.d_v, k, k).reshape(N, H * self.d_v, k, k)

    def step_and_jacobian(self, s, u):
        """``(f [N, d], J)``: J = ``I ⊗ A_t`` per head in the structure's storage form."""
        return self.step(s, u), self.transition(u)

    @property
    def output_size(self) -> int:
        return self.n_heads * self.d_v

    def output(self, s, x):
        q = F.normalize(self.q_proj(x).unflatten(-1, (self.n_heads, self.d_k)), dim=-1)  # [B, T, H, d_k]
        S = s.unflatten(-1, (self.n_heads, self.d_v, self.d_k))  # [B, T, H, d_v, d_k]
        return (S @ q.unsqueeze(-1)).squeeze(-1).flatten(-2)  # Hᵀ q per head: [B, T, H * d_v]


class DeltaNet(DeltaProduct):
    """DeltaNet: DeltaProduct with one Householder step per token (n_h = 1).

    Args:
        input_size: D_in, the size of ``x [B, T, D_in]``.
        d_k: key size (rows of the matrix state).
        d_v: value size (its columns); the state is ``[B, d_k·d_v]``.
        allow_neg_eigval: β ∈ (0, 2) instead of (0, 1): transitions with eigenvalues down to -1.
    """

    def __init__(self, input_size: int, d_k: int, d_v: int, allow_neg_eigval: bool = False):
        super().__init__(input_size, d_k, d_v, n_h=1, allow_neg_eigval=allow_neg_eigval)
