"""pararnn.nn against torch's own module test data (``torch.testing._internal.common_modules``):
every RNN/GRU/LSTM sample in fp32 and fp64, train and eval, parallel/sequential/auto (outputs,
final states and every gradient equal torch.nn's, or the same exception type), and every error
input raises torch's exception type. Plus what makes them torch.nn citizens."""
import io

import pytest
import torch
from torch import nn

import pararnn

common_modules = pytest.importorskip("torch.testing._internal.common_modules")
ModuleErrorEnum = common_modules.ModuleErrorEnum
INFOS = [m for m in common_modules.module_db if m.module_cls in (nn.GRU, nn.LSTM, nn.RNN)]
OURS = {nn.GRU: pararnn.nn.GRU, nn.LSTM: pararnn.nn.LSTM, nn.RNN: pararnn.nn.RNN}


def _flat(out):
    """The tensors of a forward's output, in order (PackedSequence data, (h, c) tuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, nn.utils.rnn.PackedSequence):
        return [out.data]
    return [t for o in out for t in _flat(o)]


def _build(cls, ctor, dtype, solver_mode=None):
    kw = dict(ctor.kwargs, dtype=dtype)
    if solver_mode is not None:
        kw["solver_mode"] = solver_mode
    return cls(*ctor.args, **kw)


def _run(module, fwd):
    args = [a.detach().clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else
            tuple(t.detach().clone().requires_grad_() for t in a) if isinstance(a, tuple) else a for a in fwd.args]
    out = _flat(module(*args, **fwd.kwargs))
    leaves = [t for a in args for t in ((a,) if isinstance(a, torch.Tensor) else a if isinstance(a, tuple) else ())
              if t.requires_grad] + list(module.parameters())
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in out)
    return out, torch.autograd.grad(loss, leaves, allow_unused=True)


@pytest.mark.parametrize("info", INFOS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_module_db_samples_equal_torch_nn(info, dtype):
    cases = 0
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 2e-5}
    for training in (True, False):
        samples = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
        for sample in samples:
            ctor, fwd = sample.constructor_input, sample.forward_input
            if ctor.kwargs.get("proj_size", 0):
                with pytest.raises(NotImplementedError, match="proj_size"):
                    _build(OURS[info.module_cls], ctor, dtype)
                continue
            torch.manual_seed(0)
            ref = _build(info.module_cls, ctor, dtype).train(training)
            want = _run(ref, fwd)
            for solver_mode in ("parallel", "sequential", "auto"):
                ours = _build(OURS[info.module_cls], ctor, dtype, solver_mode).train(training)
                ours.load_state_dict(ref.state_dict())
                got = _run(ours, fwd)
                for a, b in zip(got[0], want[0], strict=True):
                    torch.testing.assert_close(a, b, **tol)
                for a, b in zip(got[1], want[1], strict=True):
                    if b is None:
                        assert a is None or not bool(a.any())
                    else:
                        torch.testing.assert_close(a, b, **tol)
                cases += 1
    assert cases >= 30


@pytest.mark.parametrize("info", INFOS, ids=lambda m: m.name)
def test_module_db_error_inputs_raise_torchs_exception_types(info):
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32, requires_grad=False,
                                           training=True)
    assert errors
    for err in errors:
        ctor, fwd = err.module_error_input.constructor_input, err.module_error_input.forward_input
        with pytest.raises(err.error_type):
            m = OURS[info.module_cls](*ctor.args, **ctor.kwargs)
            if err.error_on == ModuleErrorEnum.FORWARD_ERROR:
                m(*fwd.args, **fwd.kwargs)


@pytest.mark.parametrize("kind, torch_mode", [("GRU", "GRU"), ("LSTM", "LSTM"), ("RNN", "RNN_TANH")])
def test_drop_ins_are_torch_nn_modules(kind, torch_mode):
    m = getattr(pararnn.nn, kind)(3, 4, num_layers=2, solver_mode="parallel")
    assert isinstance(m, getattr(nn, kind)) and isinstance(m, nn.RNNBase)
    assert m.mode == torch_mode and m.solver_mode == "parallel"
    ref = getattr(nn, kind)(3, 4, num_layers=2)
    assert m._flat_weights_names == ref._flat_weights_names
    assert [w.shape for w in m._flat_weights] == [w.shape for w in ref._flat_weights]
    assert len(m.all_weights) == 2
    x = torch.randn(5, 2, 3)
    h = torch.zeros(2, 2, 4)
    m.check_forward_args(x, (h, h) if kind == "LSTM" else h, None)
    assert m.get_expected_hidden_size(x, None) == (2, 2, 4)


def test_lstm_hx_as_a_list():
    m = pararnn.nn.LSTM(3, 4, solver_mode="parallel")
    ref = nn.LSTM(3, 4)
    m.load_state_dict(ref.state_dict())
    x, h = torch.randn(6, 2, 3), [torch.randn(1, 2, 4), torch.randn(1, 2, 4)]
    torch.testing.assert_close(m(x, h)[0], ref(x, tuple(h))[0])


def test_trace_script_and_export_refuse_clearly():
    m = pararnn.nn.GRU(3, 4, solver_mode="parallel")
    x = torch.randn(5, 2, 3)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        torch.jit.trace(m, (x,))
    with pytest.raises(RuntimeError, match="cannot be scripted"):
        torch.jit.script(m)
    with pytest.raises(Exception, match="cannot be traced"):
        torch.export.export(m, (x,))


def test_whole_module_loads_with_weights_only():
    """A whole pickled model (torch.save(model)) loads with weights_only=True under
    pararnn.nn.safe_globals(), after solves (their info and stats are pickled too)."""
    torch.manual_seed(0)
    model = nn.Sequential(pararnn.nn.LSTM(3, 4, batch_first=True, solver_mode="parallel"))
    x = torch.randn(2, 9, 3)
    y = model(x)[0]
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(buf, weights_only=True)
    buf.seek(0)
    with torch.serialization.safe_globals([*pararnn.nn.safe_globals(), nn.Sequential]):
        loaded = torch.load(buf, weights_only=True)
    torch.testing.assert_close(loaded(x)[0], y)


def test_longer_sequences_take_the_parallel_solve():
    """T = 200, B = 4, packed, with hx: the parallel solve is the one taken, and equals torch.nn."""
    torch.manual_seed(0)
    ref = nn.GRU(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = pararnn.nn.GRU(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64, solver_mode="auto")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(200, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([200, 17, 150, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    h0 = torch.randn(4, 4, 5, dtype=torch.float64)
    (yr, hr), (yo, ho) = ref(packed, h0), ours(packed, h0)
    torch.testing.assert_close(yo.data, yr.data)
    torch.testing.assert_close(ho, hr)
    assert all(r.last_info.mode == "parallel" for r in ours.rnns)
