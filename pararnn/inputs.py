"""What :class:`pararnn.RNN` checks and derives from its inputs before a solve: shapes, dtypes,
devices, the initial state, padding masks and packed sequences."""
from __future__ import annotations

import torch

from .parallel import context_for
from .scan import check_cu_seqlens


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one min/max pass (NaN propagates through both, ±Inf
    is an extreme), with no bool temporary of t's size as ``torch.isfinite(t).all()`` writes."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return True
    t = t.detach()
    lo, hi = torch.aminmax(torch.view_as_real(t) if t.is_complex() else t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


HALF = (torch.float16, torch.bfloat16)


def autocast_dtype(device: torch.device):
    """The autocast dtype active for this device type, or None."""
    kind = device.type if device.type in ("cpu", "cuda") else None
    if kind is None or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def param_like(cell):
    """One of the cell's parameters (its dtype and device stand for all of them), or None."""
    return next(iter(cell.parameters()), None)


def check_x(cell, x: torch.Tensor) -> None:
    """Raise, naming the argument, unless ``x`` is a ``[B, T, D_in]`` floating tensor that fits the cell."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor [B, T, D_in], got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [B, T, D_in] (batch first), got shape {list(x.shape)}")
    if x.shape[1] == 0:
        raise ValueError("x has T = 0 time steps; need T >= 1")
    if x.shape[0] == 0:
        raise ValueError("x has batch size B = 0; need B >= 1")
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    isz = getattr(cell, "input_size", None)
    if isz is not None and x.shape[-1] != isz:
        raise ValueError(f"x must have D_in = cell.input_size = {isz} features, got {x.shape[-1]}")
    p = param_like(cell)
    if p is not None:
        if x.device != p.device:
            raise ValueError(f"x is on {x.device} but the cell's parameters are on {p.device}")
        lower = autocast_dtype(x.device) == x.dtype  # an autocast layer handed in its precision
        if x.dtype != p.dtype and not (x.is_complex() or p.is_complex() or lower):
            raise TypeError(f"x has dtype {x.dtype} but the cell's parameters are {p.dtype}")


def make_h0(cell, h0, u: torch.Tensor) -> torch.Tensor:
    """``h0 [B, state]`` checked against the prepared inputs ``u [B, T, *]``, or the cell's initial state."""
    B = u.shape[0]
    dtype = cell.state_dtype(u)
    if h0 is None:
        return cell.initial_state(B, dtype, u.device)
    if not isinstance(h0, torch.Tensor):
        raise TypeError(f"h0 must be a torch.Tensor [B, state], got {type(h0).__name__}")
    want = (B, cell.state_size)
    if tuple(h0.shape) != want:
        raise ValueError(f"h0 must be [B, state] = {list(want)}, got {list(h0.shape)}")
    if h0.device != u.device:
        raise ValueError(f"h0 is on {h0.device} but x is on {u.device}")
    if h0.dtype != dtype:
        raise TypeError(f"h0 has dtype {h0.dtype} but the state dtype is {dtype}")
    return h0


def padding_mask(lengths, x: torch.Tensor, process_group=None) -> torch.Tensor | None:
    """``[B, T]`` bool, True at valid steps, from ``lengths [B]``; None without lengths."""
    if lengths is None:
        return None
    B, T_local = x.shape[:2]
    offset, T = context_for(process_group).time_extent(T_local, x.device)  # this rank's steps
    if not isinstance(lengths, torch.Tensor) or lengths.dtype.is_floating_point or lengths.is_complex() \
            or lengths.dtype == torch.bool or tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be an integer tensor [B] = [{B}], got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {list(getattr(lengths, 'shape', []))}")
    if bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"lengths must be in [1, T] = [1, {T}], got {lengths.tolist()}")
    return torch.arange(offset, offset + T_local, device=x.device) < lengths.to(x.device)[:, None]


def unpack(x: torch.Tensor, cu_seqlens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed sequences ``x [1, total, D]`` with ``cu_seqlens [N+1]`` as a right-padded batch:
    ``(x_padded [N, L_max, D], lengths [N], valid [N, L_max])``; ``y[valid]`` packs an output back."""
    cu = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1]).to(x.device)
    lengths = cu[1:] - cu[:-1]  # [N]
    steps = torch.arange(int(lengths.max()), device=x.device)
    valid = steps[None, :] < lengths[:, None]  # [N, L_max]
    idx = (cu[:-1, None] + steps[None, :]).clamp(max=x.shape[1] - 1)  # [N, L_max]
    return x[0][idx] * valid[..., None].to(x.dtype), lengths, valid


def padding_from_mask(mask: torch.Tensor | None, continuing: bool = False):
    """A 0/1 padding mask as :class:`pararnn.RNN`'s ``lengths``, the convention of transformers'
    and flash-linear-attention's ``attention_mask`` (1 = token, 0 = padding).

    Args:
        mask: ``[B, T]`` bool (None: no padding).
        continuing: whether the solve continues from a state (then only right padding is allowed:
            a left-padded row would start its tokens after padded steps that hold no state).

    Returns:
        ``(lengths [B] | None, shift [B] | None)``: right padding gives lengths; left padding (a
        prompt batch) gives lengths and the per-row rotation (:func:`rotate`) to right padding.
    """
    if mask is None or bool(mask.all()):
        return None, None
    lengths = mask.sum(1)
    if bool((lengths < 1).any()):
        raise ValueError("attention_mask has a sequence with no token (a row of zeros)")
    T = mask.shape[1]
    steps = torch.arange(T, device=mask.device)
    if torch.equal(mask, steps[None] < lengths[:, None]):
        return lengths, None
    if torch.equal(mask, steps[None] >= (T - lengths)[:, None]) and not continuing:
        return lengths, T - lengths
    raise ValueError("attention_mask must be left padding (a prompt batch) or right padding: zeros only at "
                     "the start or only at the end of each row" + (" (right padding only when continuing from a "
                                                                    "cached state)" if continuing else ""))


def rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``out[b, t] = x[b, (t + shift[b]) mod T]`` for ``x [B, T, d]`` and ``shift [B]`` (``-shift``
    undoes it)."""
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device)[None] + shift[:, None]) % T  # [B, T]
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
