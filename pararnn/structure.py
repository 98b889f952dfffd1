"""Jacobian structures: how a cell's dh_t/dh_{t-1} is stored, applied, probed and checked.

Three structures, for a state of size d:

=====================  =======================  ====================================
structure              Jacobian storage         meaning
=====================  =======================  ====================================
``Diagonal()``         ``[..., d]``             J = diag(j)
``Block(k)``           ``[..., d // k, k, k]``  J = blockdiag(J_1, ..., J_{d/k})
``Block(k, True)``     ``[..., k, k]``          J = blockdiag(A, ..., A) = I_{d/k} ⊗ A
``Dense()``            ``[..., d, d]``          J (row i = d f_i / d h)
=====================  =======================  ====================================

Users may write ``"diagonal"`` and ``"dense"``; :func:`as_structure` turns every declaration into
one of these objects once, and everything after that asks the object (storage shape, matvec,
transpose, the dL/dA outer product, autodiff probe tangents, clipping, dense conversion, cost
width). A new structure is a new subclass of :class:`Structure`; the scan backends ask it whether
they support it (``isinstance`` or :meth:`Structure.as_blocks`).

``Block(k, shared=True)`` is the transition of a matrix state ``S [d/k, k]`` (stored row-major,
e.g. the transposed DeltaNet state) updated as ``S' = S A^T``: one k×k matrix acts on every
column, and the ``(d)²`` Jacobian is never materialised.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class Structure:
    """Base class of the Jacobian structures (immutable value objects; compare with ``==``):
    :class:`Diagonal`, :class:`Block` and :class:`Dense`. Its methods are the solver's protocol
    (storage shapes, products, assembling J from probes); see docs/internals.md.

    Example:
        >>> pararnn.Block(2) == pararnn.Block(2)
        True
    """

    shared: bool = False  # one block stored per time step for all blocks (Block(k, shared=True))

    # ---------------------------------------------------------------- shape
    def validate(self, d: int) -> None:
        """Raise ValueError if the structure cannot describe a state of size ``d``."""

    def storage_shape(self, d: int) -> tuple[int, ...]:
        """Trailing shape of one Jacobian in storage form."""
        raise NotImplementedError

    def width(self, d: int) -> int:
        """Non-zeros per Jacobian row (1 diagonal, k blocks, d dense): the cost model's k."""
        raise NotImplementedError

    def identity(self, d: int, dtype, device) -> torch.Tensor:
        """The identity transition in storage form ``[*storage_shape(d)]`` (a padded step)."""
        return self.from_dense(torch.eye(d, dtype=dtype, device=device))

    # ---------------------------------------------------------------- algebra
    def matvec(self, J: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J @ v`` for J ``[..., *storage_shape]`` and v ``[..., d]``."""
        raise NotImplementedError

    def transpose(self, J: torch.Tensor) -> torch.Tensor:
        """Conjugate transpose of each Jacobian (the adjoint's transition)."""
        return J.transpose(-1, -2).conj()

    def outer(self, lam: torch.Tensor, hprev: torch.Tensor) -> torch.Tensor:
        """``dL/dA_t`` of ``h_t = A_t h_prev + b_t`` given the adjoint ``λ_t``: ``λ_t ⊗ conj(h_prev)``
        projected onto the storage form. ``lam, hprev [..., d]``."""
        raise NotImplementedError

    def clip(self, J: torch.Tensor, c: float) -> None:
        """In place: bound each J_t so products of them cannot grow faster than ``c^t``.

        Default (blocks, dense): scale each matrix so its infinity norm (max row sum of
        moduli, an induced norm) is at most c.
        """
        norm = J.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)  # [..., 1, 1]
        J.mul_(torch.clamp(c / norm.clamp_min(1e-30), max=1.0))

    # ---------------------------------------------------------------- autodiff probes
    def probe_tangents(self, N: int, d: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Tangents ``[P, N, d]`` whose jvps through ``step`` determine J (P = width)."""
        raise NotImplementedError

    def assemble(self, cols: torch.Tensor, d: int) -> torch.Tensor:
        """J in storage form from the jvps ``cols [P, *lead, d]`` of :meth:`probe_tangents` (from
        their vector-Jacobian products, rows of J, it is J's transpose: see :meth:`transpose`)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- conversions
    def as_blocks(self, J: torch.Tensor, d: int) -> torch.Tensor:
        """View as blocks ``[..., m, k, k]`` (for block kernels); not defined for Diagonal."""
        raise NotImplementedError(f"{self} has no block form")

    def to_dense(self, J: torch.Tensor, d: int) -> torch.Tensor:
        """Expand storage form to dense ``[..., d, d]``."""
        B = self.as_blocks(J, d)
        m, k = B.shape[-3], B.shape[-1]
        lead = B.shape[:-3]
        out = B.new_zeros(*lead, m, k, m, k)
        idx = torch.arange(m, device=B.device)
        # advanced indices split by a slice put the block index first: [m, *lead, k, k]
        out[..., idx, :, idx, :] = B.movedim(-3, 0)
        return out.reshape(*lead, m * k, m * k)

    def from_dense(self, Jd: torch.Tensor) -> torch.Tensor:
        """The declared-structure part of dense ``[..., d, d]`` Jacobians, in storage form."""
        raise NotImplementedError


@dataclass(frozen=True)
class Diagonal(Structure):
    """A diagonal Jacobian ``J = diag(j)``, stored as ``[..., d]``: each state entry depends on its
    own previous value only (``Cell.structure = "diagonal"``).

    Example:
        >>> pararnn.Diagonal().storage_shape(64)
        (64,)
    """

    def __str__(self) -> str:
        return "diagonal"

    def storage_shape(self, d):
        return (d,)

    def width(self, d):
        return 1

    def matvec(self, J, v):
        return J * v

    def transpose(self, J):
        return J.conj()

    def outer(self, lam, hprev):
        return lam * hprev.conj()

    def clip(self, J, c):
        """Clamp entries (complex: their modulus) to c."""
        if J.is_complex():
            J.mul_(torch.clamp(c / J.abs().clamp_min(1e-30), max=1.0))
        else:
            J.clamp_(-c, c)

    def probe_tangents(self, N, d, dtype, device):
        return torch.ones(1, N, d, dtype=dtype, device=device)  # exact iff J really is diagonal

    def assemble(self, cols, d):
        return cols[0]

    def to_dense(self, J, d):
        return torch.diag_embed(J)

    def from_dense(self, Jd):
        return Jd.diagonal(dim1=-2, dim2=-1)


@dataclass(frozen=True)
class Dense(Structure):
    """A full Jacobian, stored as ``[..., d, d]`` (row i = d f_i / d h)
    (``Cell.structure = "dense"``).

    Example:
        >>> pararnn.Dense().storage_shape(4)
        (4, 4)
    """

    def __str__(self) -> str:
        return "dense"

    def storage_shape(self, d):
        return (d, d)

    def width(self, d):
        return d

    def matvec(self, J, v):
        return (J @ v.unsqueeze(-1)).squeeze(-1)

    def outer(self, lam, hprev):
        return lam.unsqueeze(-1) * hprev.conj().unsqueeze(-2)

    def probe_tangents(self, N, d, dtype, device):
        return torch.eye(d, dtype=dtype, device=device).unsqueeze(1).expand(d, N, d)

    def assemble(self, cols, d):
        return cols.movedim(0, -1)  # [*lead, d(row), d(col)]

    def as_blocks(self, J, d):
        return J.unsqueeze(-3)  # one block of size d

    def to_dense(self, J, d):
        return J

    def from_dense(self, Jd):
        return Jd


@dataclass(frozen=True)
class Block(Structure):
    """A k×k block-diagonal Jacobian (blocks of consecutive state entries), stored as
    ``[..., d/k, k, k]``, or ``[..., k, k]`` with ``shared=True``.

    Args:
        k: the block size; d must be a multiple of it.
        shared: every block is the same matrix (stored once per time step: a matrix state
            ``[d_k, d_v]`` whose transition acts on d_k, as DeltaNet's).

    Example:
        >>> pararnn.Block(2).storage_shape(6)
        (3, 2, 2)
    """

    k: int
    shared: bool = False

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"Block(k): k must be a positive int, got {self.k!r}")

    def __str__(self) -> str:
        return f"Block({self.k}, shared=True)" if self.shared else f"Block({self.k})"

    def validate(self, d):
        if d % self.k != 0:
            raise ValueError(f"structure {self} does not divide the state size {d}: d must be a multiple of k")

    def storage_shape(self, d):
        return (self.k, self.k) if self.shared else (d // self.k, self.k, self.k)

    def width(self, d):
        return self.k

    def matvec(self, J, v):
        if self.shared:  # one [m, k] @ [k, k] product per row: 40× faster than m broadcast matvecs
            vb = v.reshape(*v.shape[:-1], v.shape[-1] // self.k, self.k)
            return (vb @ J.transpose(-1, -2)).reshape(v.shape)
        vb = v.reshape(*v.shape[:-1], v.shape[-1] // self.k, self.k, 1)
        return (J @ vb).reshape(v.shape)

    def outer(self, lam, hprev):
        lb = lam.reshape(*lam.shape[:-1], -1, self.k)
        hb = hprev.reshape(*hprev.shape[:-1], -1, self.k)
        if self.shared:  # sum over the m blocks of λ_b ⊗ conj(h_b), as one [k, m] @ [m, k] product
            return lb.transpose(-1, -2) @ hb.conj()
        return lb.unsqueeze(-1) * hb.conj().unsqueeze(-2)  # [..., m, k, k]

    def probe_tangents(self, N, d, dtype, device):
        # tangent j is 1 at entry j of every block: its jvp is column j of every block
        eye = torch.eye(self.k, dtype=dtype, device=device)  # [k, k]
        return eye.repeat(1, d // self.k).unsqueeze(1).expand(self.k, N, d)

    def assemble(self, cols, d):
        blocks = cols.unflatten(-1, (d // self.k, self.k))  # [k(col), *lead, m, k(row)]
        J = blocks.movedim(0, -1)  # [*lead, m, k(row), k(col)]
        return J[..., 0, :, :] if self.shared else J

    def as_blocks(self, J, d):
        if self.shared:  # a stride-0 view: nothing is materialised
            return J.unsqueeze(-3).expand(*J.shape[:-2], d // self.k, self.k, self.k)
        return J

    def from_dense(self, Jd):
        d = Jd.shape[-1]
        m = d // self.k
        blocks = Jd.reshape(*Jd.shape[:-2], m, self.k, m, self.k)
        idx = torch.arange(m, device=Jd.device)
        out = blocks[..., idx, :, idx, :].movedim(0, -3)  # [m, *lead, k, k] -> [*lead, m, k, k]
        return out[..., 0, :, :] if self.shared else out


_NAMES = {"diagonal": Diagonal, "diag": Diagonal, "dense": Dense}


def compose(later: torch.Tensor, earlier: torch.Tensor, structure: Structure) -> torch.Tensor:
    """The transition ``later · earlier`` of two storage-form transitions ``[..., *jac]``: an
    elementwise product for a diagonal, else a matrix product (every non-diagonal storage form
    ends in ``[k, k]`` matrices)."""
    return later * earlier if isinstance(structure, Diagonal) else later @ earlier


def run_transition(J: torch.Tensor, structure: Structure) -> torch.Tensor:
    """The transition of a whole run of steps, ``J_T ··· J_1`` for ``J [B, T, *jac]``, in storage
    form ``[B, *jac]``: the product over T for a diagonal, else a tree of pairwise :func:`compose`.
    Never a view of J (the solver may reuse J's buffer)."""
    if isinstance(structure, Diagonal):
        return J.prod(1)
    if J.shape[1] == 1:
        return J[:, 0].clone()
    while J.shape[1] > 1:
        n = J.shape[1] // 2 * 2
        pairs = compose(J[:, 1:n:2], J[:, 0:n:2], structure)  # [B, n/2, *jac]
        J = torch.cat([pairs, J[:, n:]], 1) if n < J.shape[1] else pairs
    return J[:, 0]


def as_structure(structure, d: int | None = None) -> Structure:
    """Normalise a declaration (``"diagonal"``, ``"dense"``, a :class:`Structure`) to an object.

    ``Block(1)`` becomes :class:`Diagonal`. With ``d``, also checks that it fits the state size.
    Raises ValueError / TypeError naming ``structure``.
    """
    if isinstance(structure, str):
        cls = _NAMES.get(structure.lower())
        if cls is None:
            raise ValueError(f"structure must be 'diagonal', 'dense' or pararnn.Block(k), got {structure!r}")
        structure = cls()
    elif not isinstance(structure, Structure):
        raise TypeError(
            f"structure must be 'diagonal', 'dense' or pararnn.Block(k), got {type(structure).__name__}")
    if isinstance(structure, Block) and structure.k == 1 and not structure.shared:
        structure = Diagonal()
    if d is not None:
        structure.validate(d)
    return structure


def from_str(spec: str) -> Structure | None:
    """The structure whose ``str()`` is ``spec`` (``"diagonal"``, ``"dense"``, ``"Block(4)"``,
    ``"Block(4, shared=True)"``), or None for a spec that is not one of these: the string form a
    custom op can carry (see :mod:`pararnn.scan.op`)."""
    if spec in _NAMES:
        return _NAMES[spec]()
    m = _BLOCK_STR.fullmatch(spec)
    return Block(int(m.group(1)), shared=m.group(2) is not None) if m else None


_BLOCK_STR = re.compile(r"Block\((\d+)(, shared=True)?\)")

def shifted_adjoint_transitions(A: torch.Tensor, structure: Structure, reverse: bool,
                                edge: torch.Tensor | None = None) -> torch.Tensor:
    """``A'_t = A_{t±1}^H`` as a tensor: the transitions of the adjoint of a scan.

    The adjoint of a forward scan is the reverse scan ``λ_t = A_{t+1}^H λ_{t+1} + g_t``, and vice
    versa: the last visited step needs the transition beyond the chunk, ``edge [B, *jac]`` (the
    next chunk's first, or the previous chunk's last with ``reverse``; zero, i.e. never read, for
    a whole sequence). Built from differentiable ops, so the adjoint can itself be differentiated.
    """
    edge = (torch.zeros_like(A[:, 0]) if edge is None else edge).unsqueeze(1)
    shifted = torch.cat([A[:, 1:], edge], 1) if not reverse else torch.cat([edge, A[:, :-1]], 1)
    return structure.transpose(shifted)


__all__ = ["shifted_adjoint_transitions", "Block", "Dense", "Diagonal", "Structure", "as_structure", "compose", "from_str", "run_transition"]
