"""The safeguard and Jacobian clipping between Newton steps."""
from __future__ import annotations

import torch

from ..workspace import Fresh
from .options import SolverOptions


class StepPolicy:
    """The safeguard and Jacobian clipping between Newton steps (see ``SolverOptions``).

    A step that blows a sequence up (NaN/Inf, or residual :data:`BLOWUP_FACTOR` × its best so far)
    is undone for that sequence, and the sequence goes on more carefully, in two levels:

    1. a trust region (:meth:`limit`): each entry of its Newton update is at most
       :data:`TRUST_RADIUS` times the size of its state row at the restored iterate
       (``max_t max(|h_t,i|, |f_t,i|)``, fixed from then on); where the scan overflowed the update
       is cut to that radius (Inf) or to 0 (NaN). The Jacobians stay exact: near the solution the
       step is Newton's (quadratic convergence), and it still makes one more position exact per step.
    2. if it blows up again: its Jacobians are also clipped to :data:`SAFEGUARD_CLIP` (a
       quasi-Newton step that cannot amplify through products of J).
    """

    def __init__(self, opts: SolverOptions, structure, atol: float, ws=None):
        self.safeguard, self.structure, self.atol = opts.safeguard, structure, atol
        self.ws = Fresh if ws is None else ws
        self.clip = opts.jacobian_clip
        self.H_prev = self.best = None
        self.level = None  # [B] int: 0 plain, 1 trust region, 2 trust region and clipped Jacobians
        self.radius = None  # [B, 1, d]: trust radius per state row (Inf: none yet)
        self.any_trusted = self.any_clipped = False  # whether some sequence is at level 1 / 2
        self.safeguarded = False

    def blown(self, err: torch.Tensor) -> torch.Tensor | None:
        """After a step: ``[B]`` bool, the sequences it blew up (NaN/Inf, or a residual far above
        their best so far), on the device (no synchronisation); None where nothing can be undone."""
        if not self.safeguard or self.H_prev is None:
            return None
        factor = torch.full_like(err, BLOWUP_FACTOR)
        if self.level is not None:  # in the trust region, a residual that grows steadily is divergence too
            factor = torch.where(self.level == 1, TRUSTED_BLOWUP_FACTOR, factor)
        return ~torch.isfinite(err) | (err > factor * self.best.clamp_min(self.atol))

    def restore(self, blown: torch.Tensor, H: torch.Tensor) -> None:
        """Restore the previous iterate of the ``blown [B]`` sequences (the best one so far for a
        sequence that blew up in the trust region), and take them a level more carefully."""
        if self.level is None:
            self.level = torch.zeros_like(blown, dtype=torch.int8)
            self.H_best = self.H_prev.clone()  # from now on the best iterate of each sequence is kept
        H[blown] = torch.where((self.level[blown] == 1).reshape(-1, 1, 1), self.H_best[blown], self.H_prev[blown])
        self.level[blown] = (self.level[blown] + 1).clamp_max(2)
        # host copies: the steps read them without a synchronisation each
        self.any_trusted, self.any_clipped = (bool(v) for v in torch.stack([(self.level == 1).any(),
                                                                             (self.level == 2).any()]).tolist())
        self.safeguarded = True

    def record(self, err: torch.Tensor, H: torch.Tensor) -> None:
        if self.level is not None:
            better = err < self.best
            self.H_best[better] = H[better]
        self.best = err if self.best is None else torch.minimum(self.best, err)

    def before_scan(self, J: torch.Tensor) -> None:
        if self.clip is not None:
            self.structure.clip(J, self.clip)
        if self.any_clipped:
            idx = (self.level == 2).nonzero().flatten()
            Jb = J[idx]
            self.structure.clip(Jb, SAFEGUARD_CLIP)
            J[idx] = Jb

    def keeps_updates(self) -> bool:
        """Whether :meth:`limit` would leave every Newton update as it is (no sequence in its trust
        region), so the update can go straight into the next iterate."""
        return not self.any_trusted

    def limit(self, delta: torch.Tensor, H: torch.Tensor, r: torch.Tensor) -> None:
        """In place: hold the update ``delta [B, T, d]`` of safeguarded sequences in their trust region;
        ``H``, ``r`` are the iterate and its residual (the radius is set at the first call after a blow-up)."""
        if not self.any_trusted:
            return
        idx = (self.level == 1).nonzero().flatten()
        if idx.numel() == 0:
            return
        if self.radius is None:
            self.radius = torch.full((H.shape[0], 1, H.shape[2]), float("inf"), dtype=H.real.dtype, device=H.device)
        new = idx[torch.isinf(self.radius[idx, 0, 0])]
        if new.numel():  # the state rows' size at the restored iterate: max_t max(|h_t|, |f_t|), f = h + r
            Hn = H[new]
            size = torch.maximum(Hn.abs(), (Hn + r[new]).abs()).amax(1, keepdim=True)
            self.radius[new] = (TRUST_RADIUS * size).clamp_min(torch.finfo(size.dtype).tiny)
        every = idx.numel() == delta.shape[0]  # then in place on delta itself, no gathered copy
        db = delta if every else delta[idx]
        db.nan_to_num_(nan=0.0)  # an overflowing scan: NaN -> 0, Inf -> the dtype's max
        scale = self.ws.take("trust_scale", db.shape, db.real.dtype, db.device)  # one reused temporary
        torch.abs(db, out=scale)
        torch.div(self.radius if every else self.radius[idx], scale.clamp_min_(torch.finfo(scale.dtype).tiny), out=scale)
        db.mul_(scale.clamp_(max=1.0))
        if not every:
            delta[idx] = db

    def keep_previous(self, H_prev: torch.Tensor) -> None:
        """After a step: the iterate before it, ``H_prev [B, T, d]``, which the solver leaves
        untouched until its next step (the other of its two iterate buffers), for :meth:`restore`."""
        if self.safeguard:
            self.H_prev = H_prev


# A residual this many times a sequence's best so far means the step diverged (Newton's error
# squares each step near the solution, so an honest step never grows the residual by 10^4).
BLOWUP_FACTOR = 1e4
TRUSTED_BLOWUP_FACTOR = 100.0
# After a blow-up, a sequence's Newton updates are held to this multiple of its state rows' size.
TRUST_RADIUS = 1.0
# After a second blow-up, its Jacobians are clipped to this norm: < 1 makes every product of J_t
# a contraction, and 0.9 keeps most of the Newton direction for cells whose |J| is near 1.
SAFEGUARD_CLIP = 0.9


