"""Test-only patch: a log-depth `tl.associative_scan` for Triton's CPU interpreter.

The interpreter's generic scan is a per-element Python fold: slow, and it only ever combines in
sequential order. This replacement runs a Hillis-Steele scan (log2(n) rounds), calling the
kernel's own combine function on whole numpy blocks, so it is fast and it combines in tree
order, as a GPU does: a non-associative combine would be caught here, not by the fold.
"""
from __future__ import annotations

import numpy as np


def _tree_scan(self, input):
    axis = self.axis
    data = [np.array(arg.handle.data, copy=True) for arg in input]
    n = data[0].shape[axis]
    nd = data[0].ndim

    def sl(lo, hi):
        idx = [slice(None)] * nd
        idx[axis] = slice(lo, hi)
        return tuple(idx)

    off = 1
    while off < n:
        # Blocks must keep power-of-2 shapes, so combine full-size blocks: element i gets
        # combine(x[i - off], x[i]); the first `off` (wrapped-around) results are discarded.
        left = [self.to_tensor(np.ascontiguousarray(np.roll(d, off, axis=axis)), input[i].dtype)
                for i, d in enumerate(data)]
        right = [self.to_tensor(d, input[i].dtype) for i, d in enumerate(data)]
        with np.errstate(all="ignore"):
            ret = self.combine_fn.fn(*left, *right)
        ret = ret if isinstance(ret, tuple) else (ret,)
        new = []
        for j, r in enumerate(ret):
            val = np.broadcast_to(np.asarray(r.handle.data if hasattr(r, "handle") else r, dtype=data[j].dtype),
                                  data[j].shape)
            nj = data[j].copy()
            nj[sl(off, n)] = val[sl(off, n)]
            new.append(nj)
        data = new
        off *= 2
    return [self.to_tensor(d, input[i].dtype) for i, d in enumerate(data)]


def fix_index_for_numpy_2_4(interpreter=None) -> None:
    """Triton 3.6's interpreter turns a scalar tensor into an index with ``int(ndarray)``, which
    numpy 2.4 refuses for arrays of one element and one dimension: ``.item()`` works on both."""
    if interpreter is None:
        try:
            from triton.runtime import interpreter
        except Exception:
            return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_pararnn_index", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched._pararnn_index = True
    interpreter._patch_lang_tensor = patched


def install() -> bool:
    """Patch the interpreter's generic scan; returns False if this Triton has no such hook."""
    try:
        from triton.runtime import interpreter
    except Exception:
        return False
    fix_index_for_numpy_2_4(interpreter)
    ops = getattr(interpreter, "ScanOps", None)
    if ops is None or not hasattr(ops, "generic_scan"):
        return False
    if getattr(ops.generic_scan, "_pararnn_tree", False):
        return True
    _tree_scan._pararnn_tree = True
    ops._sequential_generic_scan = ops.generic_scan
    ops.generic_scan = _tree_scan
    return True
