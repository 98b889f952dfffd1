"""The gradient-context matrix: every solver feature inside every graph context a real model builds.

Each case runs one feature of :class:`pararnn.RNN` (chunking, variable lengths, packing, the
compiled evaluation, autocast, sequential mode) inside one graph context (the input used twice, a
skip connection, in-place ops on the output, gradient hooks on the outputs, gradients with respect
to the outputs themselves, ``retain_graph`` and a second backward, the module called twice in one
graph, ``torch.func.functional_call``, ``torch.compile`` around it), and compares values, the
final state and the gradients of x, h0 and every parameter, in float64, with
the same context built around a plain autograd loop written here. Padded steps hold NaN, which
must reach nothing. Sequence parallelism over two gloo ranks: tests/parallel/test_distributed.py
("contexts"); ``pararnn.nn.GRU`` with ``num_layers=2``, one way and both: the last test here.
"""
import pytest
import torch
from helpers import DiagGRU, loop
from torch import nn

import pararnn
from pararnn.models import ParaGRU

B, T, D = 3, 70, 4  # input size = state size, so that y + x and m(y) are well formed
LENGTHS = torch.tensor([70, 33, 1])
# chunk_size="auto" takes multiples of 64 steps: this budget gives 64 (+ 6) for the diagonal cells
AUTO_BUDGET = B * 8 * 8 * 2 * D * 64


def _mask(lengths: torch.Tensor, T: int) -> torch.Tensor:
    return torch.arange(T) < lengths[:, None]


class Loop(nn.Module):
    """The reference module: :func:`loop`, with the same call signature as the feature's module."""

    def __init__(self, cell, packed: bool = False, lengths: torch.Tensor | None = None):
        super().__init__()
        self.cell, self.packed, self.lengths = cell, packed, lengths

    def forward(self, x, h0):
        if self.packed:  # [1, total, D] -> one loop per sequence, packed back
            cu = torch.cat([LENGTHS.new_zeros(1), LENGTHS.cumsum(0)])
            outs = [loop(self.cell, x[:, cu[i]:cu[i + 1]], h0[i:i + 1]) for i in range(len(LENGTHS))]
            return torch.cat([y for y, _ in outs], 1), torch.cat([h for _, h in outs], 0)
        return loop(self.cell, x, h0, None if self.lengths is None else _mask(self.lengths, x.shape[1]))


class Solver(nn.Module):
    """``pararnn.RNN`` with one feature's options and call arguments."""

    def __init__(self, cell, rnn_kw: dict, call_kw: dict, autocast: bool = False):
        super().__init__()
        self.rnn, self.call_kw, self.autocast = pararnn.RNN(cell, **rnn_kw), call_kw, autocast

    @property
    def cell(self):
        return self.rnn.cell

    def forward(self, x, h0):
        with torch.autocast("cpu", torch.bfloat16, enabled=self.autocast):
            return self.rnn(x, h0, **self.call_kw)


FEATURES = {  # name: (RNN options, call arguments, packed, lengths)
    "plain": ({}, {}, False, None),
    "sequential": ({"mode": "sequential"}, {}, False, None),
    "chunk": ({"chunk_size": 16}, {}, False, None),
    "chunk_auto": ({"chunk_size": "auto", "memory_budget": AUTO_BUDGET}, {}, False, None),
    "chunk_sequential": ({"chunk_size": 16, "mode": "sequential"}, {}, False, None),
    "lengths": ({}, {"lengths": LENGTHS}, False, LENGTHS),
    "lengths_sequential": ({"mode": "sequential"}, {"lengths": LENGTHS}, False, LENGTHS),
    "lengths_chunk": ({"chunk_size": 16}, {"lengths": LENGTHS}, False, LENGTHS),
    "cu_seqlens": ({}, {"cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.long), LENGTHS.cumsum(0)])},
                   True, None),
    "compile_cell": ({"compile_cell": True}, {}, False, None),
    "autocast": ({}, {}, False, None),
}


def _weights(t: torch.Tensor) -> torch.Tensor:
    return torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape)


def _loss(y, hT):
    return (y * _weights(y)).sum() + (hT * _weights(hT)).sum()


def _grads(loss, leaves, **kw):
    return list(torch.autograd.grad(loss, leaves, allow_unused=True, **kw))


def _own(x):
    """x as the model's own layers read it: NaN padding zeroed (nan_to_num passes no gradient there)."""
    return x.nan_to_num(0.0)


# Each context: (module m, x, h0) -> (values, gradients), built the same around both modules.
def ctx_plain(m, x, h0):
    y, hT = m(x, h0)
    return [y, hT], _grads(_loss(y, hT), [x, h0, *m.cell.parameters()])


def ctx_input_twice(m, x, h0):  # x has another consumer besides the RNN
    y, hT = m(x, h0)
    return [y, hT], _grads(_loss(y, hT) + _own(x).sin().sum(), [x, h0, *m.cell.parameters()])


def ctx_skip(m, x, h0):  # a residual connection around the RNN
    y, hT = m(x, h0)
    out = y + _own(x)
    return [out, hT], _grads(_loss(out, hT), [x, h0, *m.cell.parameters()])


def ctx_inplace(m, x, h0):  # in-place ops on the output before the backward
    y, hT = m(x, h0)
    y.mul_(1.5)
    y += _own(x)
    torch.relu_(y)
    return [y, hT], _grads(_loss(y, hT), [x, h0, *m.cell.parameters()])


def ctx_hook(m, x, h0):  # gradient hooks on the outputs: each scales only its own tensor's gradient
    y, hT = m(x, h0)
    y.register_hook(lambda g: 2 * g)
    hT.register_hook(lambda g: -g)
    return [y, hT], _grads(_loss(y, hT), [x, h0, *m.cell.parameters()])


def ctx_output_grad(m, x, h0):  # gradients with respect to the outputs themselves (retain_grad, saliency)
    y, hT = m(x, h0)
    return [y, hT], _grads(_loss(y, hT), [y, hT, x, h0, *m.cell.parameters()])


def ctx_retain(m, x, h0):  # two backward passes over one graph
    y, hT = m(x, h0)
    loss, leaves = _loss(y, hT), [x, h0, *m.cell.parameters()]
    first = _grads(loss, leaves, retain_graph=True)
    return [y, hT], first + _grads(loss, leaves)


def ctx_twice(m, x, h0):  # the module called twice in one graph, the second on the first's output
    y1, h1 = m(x, h0)
    y2, h2 = m(y1, h1)
    return [y1, h1, y2, h2], _grads(_loss(y2, h2) + 0.3 * _loss(y1, h1), [x, h0, *m.cell.parameters()])


def ctx_functional_call(m, x, h0):  # the parameters swapped in by torch.func.functional_call
    params = {k: (0.9 * v.detach()).requires_grad_() for k, v in m.named_parameters()}  # not the module's values
    y, hT = torch.func.functional_call(m, params, (x, h0))
    return [y, hT], _grads(_loss(y, hT), [x, h0, *params.values()])


def ctx_checkpoint(m, x, h0):  # activation checkpointing around the module (a first call: its probes inside)
    from torch.utils.checkpoint import checkpoint

    y, hT = checkpoint(m, x, h0, use_reentrant=False)
    return [y, hT], _grads(_loss(y, hT), [x, h0, *m.cell.parameters()])


def ctx_checkpoint_reentrant(m, x, h0):  # the older reentrant checkpoint (backward re-runs the forward)
    from torch.utils.checkpoint import checkpoint

    y, hT = checkpoint(m, x, h0, use_reentrant=True)
    leaves = [x, h0, *m.cell.parameters()]
    for t in leaves:
        t.grad = None
    _loss(y, hT).backward()  # (reentrant checkpoints refuse torch.autograd.grad)
    grads = [t.grad for t in leaves]
    for t in leaves:
        t.grad = None
    return [y, hT], grads


def ctx_save_on_cpu(m, x, h0):  # saved tensors through hooks (offloading)
    with torch.autograd.graph.save_on_cpu():
        y, hT = m(x, h0)
    return [y, hT], _grads(_loss(y, hT), [x, h0, *m.cell.parameters()])


def ctx_compile(m, x, h0):  # torch.compile around the module (the reference runs it eagerly)
    if isinstance(m, Loop):
        return ctx_plain(m, x, h0)
    torch._dynamo.reset()
    y, hT = torch.compile(m, backend="aot_eager")(x, h0)
    return [y, hT], _grads(_loss(y, hT), [x, h0, *m.cell.parameters()])


CONTEXTS = {name[4:]: fn for name, fn in globals().items() if name.startswith("ctx_")}


def _inputs(packed: bool, lengths: torch.Tensor | None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (1, int(LENGTHS.sum()), D) if packed else (B, T, D)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    if lengths is not None:  # padding holds NaN: it must reach no output and no gradient
        x[~_mask(lengths, T)] = float("nan")
    h0 = 0.5 * torch.randn(len(LENGTHS) if packed else B, D, dtype=torch.float64, generator=g)
    return x.requires_grad_(), h0.requires_grad_()


CELLS = {"user": lambda: DiagGRU(D, D), "zoo": lambda: ParaGRU(D, D)}


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("cell_name", CELLS)
def test_gradients_in_every_graph_context(cell_name, feature, context):
    if cell_name == "zoo" and feature in ("compile_cell", "chunk_auto", "lengths_sequential", "chunk_sequential"):
        pytest.skip("the user cell covers this feature; the zoo cell runs the rest")
    torch.manual_seed(0)
    cell = CELLS[cell_name]().double()
    rnn_kw, call_kw, packed, lengths = FEATURES[feature]
    x, h0 = _inputs(packed, lengths)
    got_v, got_g = CONTEXTS[context](Solver(cell, rnn_kw, call_kw, autocast=feature == "autocast"), x, h0)
    want_v, want_g = CONTEXTS[context](Loop(cell, packed, lengths), x, h0)
    for a, b in zip(got_v, want_v, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"value: {m}")
    for i, (a, b) in enumerate(zip(got_g, want_g, strict=True)):
        if b is None:  # nothing reaches this leaf in the reference
            assert a is None or not bool(a.any()), i
            continue
        assert a is not None, f"gradient {i} is missing"
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=lambda m: f"gradient {i}: {m}")


@pytest.mark.parametrize("context", ["plain", "skip", "inplace", "twice", "hook", "output_grad"])
@pytest.mark.parametrize("chunk_size", [None, 16])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_nn_gru_two_layers_in_graph_contexts(context, chunk_size, bidirectional):
    """pararnn.nn.GRU(num_layers=2), both ways, against torch.nn.GRU with the same weights: with
    ``bidirectional`` both directions read x, so chunking must sum the two directions' input
    gradients; one way, the output is the last layer's states, whose last step h_n also holds."""
    torch.manual_seed(0)
    dirs = 2 if bidirectional else 1
    H = D // dirs  # output dirs·H = D features: the skip and the second call are well formed
    ref = nn.GRU(D, H, num_layers=2, bidirectional=bidirectional, batch_first=True).double()
    ours = pararnn.nn.GRU(D, H, num_layers=2, bidirectional=bidirectional, batch_first=True, mode="parallel",
                          chunk_size=chunk_size).double()
    ours.load_state_dict(ref.state_dict())

    class Wrap(nn.Module):  # the contexts' (x, h0) signature and .cell for the parameter list
        def __init__(self, m):
            super().__init__()
            self.m, self.cell = m, m

        def forward(self, x, h0):
            return self.m(x, h0)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, T, D, dtype=torch.float64, generator=g).requires_grad_()
    h0 = (0.5 * torch.randn(2 * dirs, B, H, dtype=torch.float64, generator=g)).requires_grad_()
    got_v, got_g = CONTEXTS[context](Wrap(ours), x, h0)
    want_v, want_g = CONTEXTS[context](Wrap(ref), x, h0)
    for a, b in zip(got_v, want_v, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for a, b in zip(got_g, want_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
