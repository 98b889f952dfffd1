"""The compiled cell evaluation: every torch.compile use of the solver, in one place.

The private torch APIs it needs (dynamo's recompile limit, duck shapes, ``mark_static``) come
from :mod:`pararnn.compat`.
"""
from __future__ import annotations

import dataclasses
import threading
import types
import warnings

import torch

from .. import compat, fastmath
from ..cell import LOOP_PROBES, gives_scale, uses_jvp
from ..structure import Block, Structure
from ..utils.functional import autodiff_outside_inference, call_with, named_tensors

_COMPILED = {}


def compiled_piece(fn, cell=None):
    """``fn`` (:func:`~pararnn.solver.evaluate.evaluate_piece`, ``step_piece`` or ``graph_piece``)
    under ``torch.compile(dynamic=True)``: inductor fuses the cell, the stores into the solver's
    buffers and the reductions into one loop (C++/OpenMP on CPU, Triton on CUDA). Batch and time
    sizes are dynamic and feature sizes static (:func:`static_features`), so dynamo compiles once
    per cell class, parameter shapes, structure, dtype, device and kind of piece, not per B or T.
    A Newton piece of one sequence and one of several rows are two graphs (dynamo specialises a
    batch of 1, and the one-row graph reads contiguous rows); an unbacked batch size would share
    one graph but splits inductor's fused loop into several (measured slower).
    The backend (:func:`pararnn.fastmath.compile_backend`) swaps tanh for the fast one.

    Each cell class gets its own copy of ``fn``'s code, so its own dynamo cache and a budget of
    :data:`RECOMPILE_LIMIT` graphs: with one shared code object a few cells used dynamo's limit up
    and later ones ran eagerly. A cell without a hand-written Jacobian is evaluated through
    :func:`traced_jacobian`. While a compiled piece runs, dynamo's recompile
    limit and duck-shape setting are set for it and restored after (:mod:`pararnn.compat`):
    without duck shapes dynamo does not guard on chance equalities between the pieces' storage
    offsets and sizes. Where compiling fails (no C++ compiler, an op inductor cannot lower), the
    cell class runs eagerly from then on, with one warning."""
    kind = None if cell is None else type(cell)
    if (fn, kind) not in _COMPILED:
        own = fn if kind is None else types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                                                           fn.__defaults__, fn.__closure__)
        compiled = torch.compile(own, dynamic=True, backend=fastmath.compile_backend)
        # context managers made once and re-entered on every call (each patch() builds a class: ~20 µs)
        no_duck_shapes = compat.no_duck_shapes()
        limit = compat.dynamo_recompile_limit()
        budget = compat.recompile_budget(max(RECOMPILE_LIMIT, limit))

        def run(*args):
            if kind in _FAILED:
                return fn(*args)
            try:
                with no_duck_shapes, budget:
                    return compiled(*args)
            except Exception as e:  # noqa: BLE001 - a failure to compile: the eager twin serves
                out = fn(*args)  # an error of the cell itself raises here again, as itself
                _FAILED.add(kind)
                _warn_once(kind, COMPILE_FAILED_MSG.format(name=getattr(kind, "__name__", "the cell"),
                                                           error=f"{type(e).__name__}: {str(e)[:300]}"))
                return out

        _COMPILED[(fn, kind)] = run
    return _COMPILED[(fn, kind)]


# Graphs one piece function may hold per cell class: 3 measure variants × 3 kinds of piece × mask
# or not × dtypes × layer sizes (tests/solver/test_compile.py counts them).
RECOMPILE_LIMIT = 64


def static_features(first: int, *tensors: torch.Tensor) -> None:
    """Mark the feature dims (``first`` on) of these inputs static for dynamo; the batch and time
    dims before them stay dynamic (a cell's ``u.chunk(3, -1)`` of a symbolic width gives inductor
    loops of different symbolic lengths, which it does not fuse)."""
    for t in tensors:
        for dim in range(first, t.dim()):
            compat.mark_static(t, dim)


def traced_jacobian(cell, h: torch.Tensor, u: torch.Tensor):
    """For a cell whose Jacobian comes from autodiff (no hand-written ``step_and_jacobian``): its
    ``(f, J)`` as one graph with a symbolic number of rows, for the compiled evaluation to call.

    torch.compile specialises forward-mode AD (``torch.func.jvp``) on the number of rows, so the
    default Jacobian compiled per (B, T). This traces ``step`` and its vector-Jacobian products (the
    structure's probe tangents through ``torch.func.vjp``: rows of J, transposed into storage form)
    with ``make_fx(tracing_mode="symbolic")``, with the cell's parameters and buffers as inputs:
    the compiled evaluation then compiles once per cell class and shapes, whatever B and T.

    ``h [N, d]``, ``u [N, *]``: example rows (their dtype, device and feature shapes). Returns
    ``(graph, tensors)`` to call as ``graph(tensors, h, u) -> (f [N, d], J [N, *jac])``, with f's
    rounding scale ``s [N, d]`` third where ``graph.gives_scale`` (:func:`with_rounding_scale`), or None
    where ``step`` cannot be traced (data-dependent control flow, say; one warning per cell class)
    or the state is complex. Traced once per cell class, structure, parameter shapes, plain
    attributes, dtype and device. The Python values ``step`` reads are constants of the graph:
    the module's attributes are part of the key (a changed value, or a tensor attribute updated in
    place, traces again); a global variable ``step`` reads is not.
    """
    if not uses_jvp(cell) or gives_scale(cell) or h.is_complex() or u.is_complex():
        return None
    tensors = named_tensors(cell)
    key = _trace_key(cell, tensors, h, u)
    if key not in _TRACED:
        try:
            _TRACED[key] = _trace(cell, tensors, h, u)
        except Exception as e:  # noqa: BLE001 - any failure to trace: the eager evaluation serves
            _TRACED[key] = None
            _warn_once(type(cell), TRACE_FAILED_MSG.format(name=type(cell).__name__, error=f"{type(e).__name__}: {e}"))
    graph = _TRACED[key]
    return None if graph is None else (graph, [t.detach() for t in tensors.values()])


def _trace(cell, tensors: dict[str, torch.Tensor], h: torch.Tensor, u: torch.Tensor):
    from torch.fx.experimental.proxy_tensor import make_fx

    structure, names = cell.get_structure(), list(tensors)

    def step_and_jacobian(values, h, u):
        def rows_of_j(hh, uu):
            N, d = hh.shape
            f, vjp = torch.func.vjp(lambda x: cell.step(x, uu), hh)
            probes = structure.probe_tangents(N, d, hh.dtype, hh.device)  # [P, N, d]
            rows = torch.stack([vjp(e)[0] for e in probes.unbind(0)]) if probes.shape[0] <= LOOP_PROBES else \
                torch.func.vmap(lambda e: vjp(e)[0])(probes)
            return f, structure.transpose(structure.assemble(rows, d))

        return call_with(cell, dict(zip(names, values)), rows_of_j, h, u)

    n = 7  # an example row count that no other size equals (dynamo specialises 0 and 1)
    gen = torch.Generator().manual_seed(0)  # (not the global generator: the user's random stream stays theirs)

    def trace():
        # with inference mode off: under it the traced vjps were zeros (torch 2.11), kept in the cached graph;
        # with anomaly detection off (process-wide; the caller waits): its NaN checks are data-dependent
        # branches that symbolic tracing cannot take, and debugging checks are no part of the graph
        with torch.autograd.set_detect_anomaly(False), autodiff_outside_inference(), torch.no_grad():
            hx = torch.randn(n, h.shape[-1], generator=gen, dtype=h.dtype).to(h.device)
            ux = torch.randn(n, *u.shape[1:], generator=gen, dtype=u.dtype).to(u.device)
            return make_fx(step_and_jacobian, tracing_mode="symbolic")([t.detach() for t in tensors.values()], hx, ux)

    return with_rounding_scale(in_own_thread(trace))


def in_own_thread(fn):
    """``fn()`` run in a new thread, its exception re-raised here: free of this thread's autograd
    state. The trace of :func:`traced_jacobian` may be first asked for inside an activation
    checkpoint (``chunk_size``, or the user's ``torch.utils.checkpoint``) or ``save_on_cpu``, whose
    saved-tensor hooks torch.func refuses ("don't yet support saved tensor hooks"): traced there,
    the cell class would lose its compiled evaluation for good. The graph itself holds no such state.
    The default device (``torch.set_default_device``, per thread) is carried over: a ``step`` that
    makes tensors without naming a device makes them where it would in the caller's thread."""
    out, device = {}, torch.get_default_device()

    def run():
        try:
            if torch.get_default_device() != device:  # (setting it installs a function mode: only if needed)
                torch.set_default_device(device)
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e

    worker = threading.Thread(target=run, name="pararnn-trace", daemon=True)  # (Ctrl-C in join() need not wait for it)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def with_rounding_scale(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """The traced ``(f, J)`` graph of :func:`traced_jacobian` made to return ``(f, J, s)`` where it
    ends in a sum ``f = a ± alpha·b`` (possibly times numbers, ``c·(a + b)``): s ``[N, d]`` is that
    sum's triangle bound ``|c|·(|a| + |alpha|·|b|)``, what :meth:`pararnn.Cell.step_jacobian_and_scale`
    asks a cell for (terms that cancel in f still round at their own size; the bound is never
    below |f|). ``gm.gives_scale`` says whether it does. In place; returns ``gm``."""
    aten = torch.ops.aten
    graph = gm.graph
    out = next(node for node in graph.nodes if node.op == "output")
    f, J = out.args[0]
    gm.gives_scale = False
    total, factor = f, 1.0  # f = factor · total: through multiplications by a number (f = 0.9 · (a + b))
    while total.target == aten.mul.Tensor and len(total.args) == 2 and \
            sum(isinstance(t, torch.fx.Node) for t in total.args) == 1:
        factor *= abs(next(t for t in total.args if not isinstance(t, torch.fx.Node)))
        total = next(t for t in total.args if isinstance(t, torch.fx.Node))
    if total.target not in (aten.add.Tensor, aten.sub.Tensor) or len(total.args) != 2:
        return gm
    alpha = abs(total.kwargs.get("alpha", 1))
    with graph.inserting_before(out):
        a, b = (graph.call_function(aten.abs.default, (t,)) if isinstance(t, torch.fx.Node) else abs(t)
                for t in total.args)
        if alpha != 1:
            b = graph.call_function(aten.mul.Tensor, (b, alpha)) if isinstance(b, torch.fx.Node) else b * alpha
        s = graph.call_function(aten.add.Tensor, (a, b) if isinstance(a, torch.fx.Node) else (b, a))
        if factor != 1.0:
            s = graph.call_function(aten.mul.Tensor, (s, factor))
    if compat.set_traced_outputs(gm, [f, J, s]):
        gm.gives_scale = True
    else:  # the nodes just added are unused: drop them
        graph.eliminate_dead_code()
        gm.recompile()
    return gm


_SIMPLE = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _trace_key(cell, tensors: dict, h: torch.Tensor, u: torch.Tensor):
    """What a traced graph depends on: the class, structure, tensor shapes and dtypes, the modules'
    plain attributes (a hyperparameter is a constant of the graph), h's and u's dtypes, device and
    feature shapes. A module holding any other attribute gets a graph of its own (its id)."""
    attrs = []
    for name, module in cell.named_modules():
        for k, v in sorted(vars(module).items()):
            if not k.startswith("_") and k != "training":
                attrs.append((name, k, _attribute_key(v)))
        attrs.append((name, "training", module.training))
    shapes = tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in tensors.items())
    return (type(cell), str(cell.get_structure()), shapes, tuple(attrs), h.dtype, h.device, u.dtype,
            tuple(u.shape[1:]))


def _attribute_key(v):
    """A plain attribute's part of the key: its value (simple values, containers of them, a
    structure), a tensor's identity and version (an in-place update is a new graph), else the
    object's identity."""
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(i, _SIMPLE) for i in v):
        return (type(v).__name__, tuple(v))
    if isinstance(v, dict) and all(isinstance(i, _SIMPLE) for i in (*v.keys(), *v.values())):
        return ("dict", tuple(sorted(v.items(), key=repr)))
    if isinstance(v, Structure):
        return str(v)
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v), compat.version_counter(v), v.data_ptr())
    return ("object", id(v))


def _warn_once(kind, message: str) -> None:
    if kind not in _WARNED:
        _WARNED.add(kind)
        warnings.warn(message, UserWarning, stacklevel=4)


def use_compiled(option, cell, h0: torch.Tensor, B: int, T: int) -> bool:
    """Whether a solve evaluates the cell compiled (``SolverOptions.compile_cell``): ``True`` and
    ``False`` as given (real dtypes only), ``"auto"`` on CPU for a real, non-autocast solve of at
    least :data:`AUTO_COMPILE_ELEMENTS` state elements (``B·T·d``) of a cell class that compiled
    before or has not been tried, where compiling pays (:func:`fusion_pays`). Decided the same
    while torch.compile traces the module around the solve (the solve itself runs eagerly,
    :meth:`pararnn.RNN._solve`), so a compiled model keeps the fused evaluation."""
    if option != "auto":
        return bool(option) and can_compile(h0)
    return (h0.device.type == "cpu" and can_compile(h0) and type(cell) not in _FAILED and fusion_pays(cell)
            and B * T * cell.state_size >= AUTO_COMPILE_ELEMENTS and not torch.is_autocast_enabled("cpu"))


def fusion_pays(cell) -> bool:
    """Whether ``compile_cell="auto"`` compiles this cell's evaluation: not for a hand-written
    ``Block(k)`` Jacobian (k > 1, blocks not shared), whose eager evaluation was as fast as the
    compiled one or faster (``benchmarks/bench_constants.py --parts fusion``: ParaLSTM and a
    broadcast-style block tanh cell). ParaLSTM's state interleaves each block's entries and its
    Jacobian is stored entry by entry, so the fused loop's loads and stores are strided, and
    inductor's CPU code generator (torch 2.13) leaves that loop scalar. A cell whose Jacobian
    comes from autodiff still compiles (its eager jvp is the slower path), as do shared blocks
    (DeltaNet) and diagonal and dense Jacobians; ``compile_cell=True`` compiles any cell."""
    return uses_jvp(cell) or not unshared_blocks(cell.get_structure())


def unshared_blocks(structure: Structure) -> bool:
    """Whether ``structure`` is ``Block(k)`` with k > 1 and a block per k state entries (ParaLSTM's
    kind): where a hand-written Jacobian evaluates about as fast eagerly as compiled
    (:func:`fusion_pays`), so ``mode="auto"`` gives it the compiled evaluation's limits either way
    (:func:`pararnn.solver.mode.choose_mode`)."""
    return isinstance(structure, Block) and structure.k > 1 and not structure.shared


def resolve_compile(opts, cell, h0: torch.Tensor, B: int, T: int):
    """``opts`` with ``compile_cell`` decided for this solve (a bool; see :func:`use_compiled`)."""
    if isinstance(opts.compile_cell, bool):
        return opts
    return dataclasses.replace(opts, compile_cell=use_compiled(opts.compile_cell, cell, h0, B, T))


# compile_cell="auto" compiles solves of at least this many state elements: below, a solve takes
# about a millisecond eagerly, and a first compile (seconds) would not pay back within a run.
AUTO_COMPILE_ELEMENTS = 1 << 16

_TRACED: dict = {}
_WARNED: set = set()
_FAILED: set = set()  # cell classes whose compiled evaluation failed: eager from then on
COMPILE_FAILED_MSG = (
    "pararnn: compiling the evaluation of {name} failed ({error}); it runs eagerly from now on "
    "(correct, slower). Pass compile_cell=False to skip the attempt.")
TRACE_FAILED_MSG = (
    "pararnn: the compiled evaluation of {name} is off: its step could not be traced with a symbolic "
    "number of rows ({error}), so its Newton steps run eagerly (correct, slower). Write step without "
    "data-dependent Python control flow, or give the cell a hand-written step_and_jacobian.")


def can_compile(t: torch.Tensor) -> bool:
    """The compiled evaluation covers real floating dtypes (complex cells run eagerly)."""
    return t.dtype.is_floating_point


