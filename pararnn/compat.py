"""Every private torch API pararnn touches, in one place, each with a fallback.

Tested on torch 2.11.0, 2.12.1 and 2.14.1 (their CUDA wheels, run on CPU) and 2.13.0 (the CPU build), the range
``pyproject.toml`` declares. When one of these moves in a later torch, the fallback keeps the
library correct (possibly slower) and this module is the one file to update.
"""
from __future__ import annotations

import contextlib

import torch


def version_counter(t: torch.Tensor) -> int:
    """Autograd's version counter of ``t`` (``Tensor._version``: bumped by every in-place write);
    -1 for an inference tensor, which has none."""
    if t.is_inference():
        return -1
    return t._version


def under_torch_func() -> bool:
    """Whether a torch.func transform (grad, vmap, jvp, functional_call under them) is tracing this call."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    if peek is not None:
        return peek() is not None
    return functorch_transforms_active()


def forward_ad_active() -> bool:
    """Whether a :mod:`torch.autograd.forward_ad` dual level is open (``forward_ad._current_level``,
    -1 when none; fallback: False). A parallel solve cannot run there: its probes' own forward-mode
    products would nest in it."""
    from torch.autograd import forward_ad

    return getattr(forward_ad, "_current_level", -1) >= 0


def functorch_transforms_active() -> bool:
    """Whether any functorch transform is active (the fallback of :func:`under_torch_func` too)."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active()) if active is not None else False


def onednn_linear():
    """oneDNN's fused inner product ``torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")``
    where this build has it (x86 builds with mkldnn), else None (callers use ``F.linear``)."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def dynamo_recompile_limit() -> int:
    """torch._dynamo's recompile limit per code object (8 by default)."""
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", getattr(config, "cache_size_limit", 8))


def recompile_budget(limit: int):
    """A reusable context manager that sets dynamo's recompile limit to ``limit`` while it is entered."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: limit})


def no_duck_shapes():
    """A reusable context manager under which dynamo gives equal sizes their own symbols
    (``torch.fx.experimental._config.use_duck_shape = False``); a no-op where the setting is gone."""
    config = getattr(getattr(torch.fx, "experimental", None), "_config", None)
    if config is None or not hasattr(config, "use_duck_shape"):
        return contextlib.nullcontext()
    return config.patch(use_duck_shape=False)


def mark_static(t: torch.Tensor, dim: int) -> None:
    """Tell dynamo that dim ``dim`` of ``t`` is static under ``dynamic=True`` (``torch._dynamo.mark_static``)."""
    torch._dynamo.mark_static(t, dim)


def inductor_compile_fx():
    """Inductor's graph compiler, ``torch._inductor.compile_fx.compile_fx`` (a torch.compile backend)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx


def cacheable_functions(marks: dict[str, str]):
    """A context manager under which AOT autograd's and inductor's caches accept graphs that call
    the Python functions named in ``marks`` (``"module.name" -> version``; the version joins the
    cache key, so a changed function misses the cache): ``torch._inductor.config.
    unsafe_marked_cacheable_functions``. Without it such graphs bypass AOT autograd's cache and are
    traced again in every process; a no-op where the setting is gone.
    """
    from torch._inductor import config

    if not hasattr(config, "unsafe_marked_cacheable_functions"):
        return contextlib.nullcontext()
    return config.patch(unsafe_marked_cacheable_functions={**config.unsafe_marked_cacheable_functions, **marks})


def set_traced_outputs(gm: torch.fx.GraphModule, nodes: list) -> bool:
    """Make a ``make_fx`` graph return the tuple ``nodes`` (fx nodes of its graph): its output node
    and the pytree spec its generated code unflattens the outputs by
    (``gm.graph._codegen.pytree_info.out_spec``). Returns False, changing nothing, where this torch
    keeps that spec elsewhere."""
    from torch.utils import _pytree

    codegen = getattr(gm.graph, "_codegen", None)
    info = getattr(codegen, "pytree_info", None)
    if info is None or not hasattr(info, "_replace") or "out_spec" not in getattr(info, "_fields", ()):
        return False
    out = next(node for node in gm.graph.nodes if node.op == "output")
    out.args = (list(nodes),)
    codegen.pytree_info = info._replace(out_spec=_pytree.tree_structure(tuple(range(len(nodes)))))
    gm.recompile()
    return True
