"""Jacobian structures: how a cell's dh_t/dh_{t-1} is stored, applied and checked.

Three structures, for a state of size d:

=================  =======================  ====================================
structure          Jacobian storage         meaning
=================  =======================  ====================================
``"diagonal"``     ``[..., d]``             J = diag(j)
``Block(k)``       ``[..., d // k, k, k]``  J = blockdiag(J_1, ..., J_{d/k})
``Block(k, True)`` ``[..., k, k]``          J = blockdiag(A, ..., A) = I_{d/k} ⊗ A
``"dense"``        ``[..., d, d]``          J (row i = d f_i / d h)
=================  =======================  ====================================

``Block(k, shared=True)`` is the transition of a matrix state ``S [d/k, k]`` (stored row-major,
e.g. the transposed DeltaNet state) updated as ``S' = S A^T``: one k×k matrix acts on every
column, and the ``(d)²`` Jacobian is never materialised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch


@dataclass(frozen=True)
class Block:
    """k×k block-diagonal Jacobian structure (blocks of consecutive state entries).

    ``shared=True``: every block is the same matrix (stored once per time step).
    """

    k: int
    shared: bool = False

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"Block(k): k must be a positive int, got {self.k!r}")

    def __str__(self) -> str:
        return f"Block({self.k}, shared=True)" if self.shared else f"Block({self.k})"


Structure = Union[str, Block]


def normalize_structure(structure: Structure, d: int | None = None) -> Structure:
    """Validate a structure declaration; ``Block(1)`` becomes ``"diagonal"``.

    Raises ValueError naming ``structure`` if it is unknown or does not divide ``d``.
    """
    if isinstance(structure, str):
        s = structure.lower()
        if s in ("diagonal", "diag"):
            return "diagonal"
        if s == "dense":
            return "dense"
        raise ValueError(
            f"structure must be 'diagonal', 'dense' or pararnn.Block(k), got {structure!r}"
        )
    if isinstance(structure, Block):
        if structure.k == 1 and not structure.shared:
            return "diagonal"
        if d is not None and d % structure.k != 0:
            raise ValueError(
                f"structure {structure} does not divide the state size {d}: "
                f"d must be a multiple of k"
            )
        return structure
    raise TypeError(
        f"structure must be 'diagonal', 'dense' or pararnn.Block(k), got {type(structure).__name__}"
    )


def jacobian_shape(structure: Structure, d: int) -> tuple[int, ...]:
    """Trailing shape of one Jacobian in storage form."""
    if structure == "diagonal":
        return (d,)
    if structure == "dense":
        return (d, d)
    if structure.shared:
        return (structure.k, structure.k)
    return (d // structure.k, structure.k, structure.k)


def expand_blocks(J: torch.Tensor, structure: Structure, d: int) -> torch.Tensor:
    """Block storage ``[..., d/k, k, k]`` for any block structure (a stride-0 view if shared)."""
    if isinstance(structure, Block) and structure.shared:
        return J.unsqueeze(-3).expand(*J.shape[:-2], d // structure.k, structure.k, structure.k)
    return J


def matvec(J: torch.Tensor, v: torch.Tensor, structure: Structure) -> torch.Tensor:
    """J @ v for J in storage form ``[..., *jacobian_shape]`` and v ``[..., d]``."""
    if structure == "diagonal":
        return J * v
    if structure == "dense":
        return (J @ v.unsqueeze(-1)).squeeze(-1)
    k = structure.k
    vb = v.reshape(*v.shape[:-1], v.shape[-1] // k, k, 1)
    if structure.shared:
        J = J.unsqueeze(-3)
    return (J @ vb).reshape(v.shape)


def transpose(J: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Conjugate transpose of each Jacobian (the adjoint's transition)."""
    if structure == "diagonal":
        return J.conj()
    return J.transpose(-1, -2).conj()


def to_dense(J: torch.Tensor, structure: Structure, d: int | None = None) -> torch.Tensor:
    """Expand storage form ``[..., *jacobian_shape]`` to dense ``[..., d, d]``.

    ``d`` is needed only for ``Block(k, shared=True)``.
    """
    if structure == "diagonal":
        return torch.diag_embed(J)
    if structure == "dense":
        return J
    if structure.shared:
        if d is None:
            raise ValueError("to_dense of a shared block structure needs the state size d")
        J = expand_blocks(J, structure, d)
    m, k = J.shape[-3], J.shape[-1]
    lead = J.shape[:-3]
    out = J.new_zeros(*lead, m, k, m, k)
    idx = torch.arange(m, device=J.device)
    # advanced indices split by a slice put the block index first: [m, *lead, k, k]
    out[..., idx, :, idx, :] = J.movedim(-3, 0)
    return out.reshape(*lead, m * k, m * k)


def from_dense(Jd: torch.Tensor, structure: Structure) -> torch.Tensor:
    """Take the declared-structure part of dense ``[..., d, d]`` Jacobians."""
    if structure == "diagonal":
        return Jd.diagonal(dim1=-2, dim2=-1)
    if structure == "dense":
        return Jd
    k = structure.k
    d = Jd.shape[-1]
    m = d // k
    blocks = Jd.reshape(*Jd.shape[:-2], m, k, m, k)
    idx = torch.arange(m, device=Jd.device)
    out = blocks[..., idx, :, idx, :].movedim(0, -3)  # [m, *lead, k, k] -> [*lead, m, k, k]
    return out[..., 0, :, :] if structure.shared else out
