"""pararnn.linear against its twin F.linear: values, first and second derivatives, torch.compile,
and the cases that must stay on F.linear (small products, other dtypes, autocast, torch.func)."""
import pytest
import torch
import torch.nn.functional as F

import pararnn.linear as PL
from pararnn.linear import Linear, linear, uses_onednn
from pararnn.models import ParaGRU

needs_onednn = pytest.mark.skipif(PL._onednn is None, reason="torch built without oneDNN")


def _args(shape=(3, 2800, 64), d_out=96, bias=True, dtype=torch.float32):  # strided too: >= ONEDNN_MIN_MACS
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    w = (torch.randn(d_out, shape[-1], generator=g, dtype=dtype) / shape[-1] ** 0.5).requires_grad_()
    b = torch.randn(d_out, generator=g, dtype=dtype, requires_grad=True) if bias else None
    return x, w, b


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strided", [False, True])
def test_onednn_path_matches_f_linear_values_and_gradients(bias, strided):
    x, w, b = _args(bias=bias)
    xin = x[:, ::2] if strided else x  # a non-contiguous input
    assert uses_onednn(xin, w, b)
    y, y_ref = linear(xin, w, b), F.linear(xin, w, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(y, params, g, create_graph=True)
    grads_ref = torch.autograd.grad(y_ref, params, g, create_graph=True)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)
    # second order: gradients of a function of the gradients (the backward is differentiable)
    s = sum((a * a).sum() for a in grads[:2])
    s_ref = sum((a * a).sum() for a in grads_ref[:2])
    for a, r in zip(torch.autograd.grad(s, (x, w)), torch.autograd.grad(s_ref, (x, w))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-3)


@needs_onednn
def test_onednn_op_registrations_pass_opcheck():
    x, w, b = _args(shape=(2, 300, 64))
    torch.library.opcheck(PL._linear_onednn, (x, w, b))
    torch.library.opcheck(PL._linear_onednn, (x.detach(), w, None))


@pytest.mark.parametrize("case", ["small", "fp64", "autocast", "vmap", "meta"])
def test_what_stays_on_f_linear(case):
    x, w, b = _args(shape=(2, 3, 64)) if case == "small" else _args(dtype=torch.float64 if case == "fp64" else torch.float32)
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not uses_onednn(x, w, b)
            assert linear(x, w, b).dtype == torch.bfloat16  # autocast's F.linear
        return
    if case == "vmap":
        y = torch.func.vmap(lambda xi: linear(xi, w, b))(x)
        torch.testing.assert_close(y, F.linear(x, w, b))
        return
    if case == "meta":
        x, w, b = (t.detach().to("meta") for t in (x, w, b))
    assert not uses_onednn(x, w, b)
    assert linear(x, w, b).shape == (*x.shape[:-1], w.shape[0])


@needs_onednn
def test_linear_compiles_and_matches():
    x, w, b = _args()
    fn = torch.compile(lambda x: linear(x, w, b).tanh().sum(), dynamic=True, fullgraph=True)
    ref = F.linear(x, w, b).tanh().sum()
    out = fn(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-3)
    for a, r in zip(torch.autograd.grad(out, (x, w, b)), torch.autograd.grad(ref, (x, w, b))):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_linear_module_is_an_nn_linear_with_the_same_state_dict():
    torch.manual_seed(0)
    ref = torch.nn.Linear(64, 96)
    torch.manual_seed(0)
    mod = Linear(64, 96)
    assert isinstance(mod, torch.nn.Linear)
    assert mod.state_dict().keys() == ref.state_dict().keys()
    for k in ref.state_dict():
        assert torch.equal(mod.state_dict()[k], ref.state_dict()[k])  # same initialisation
    x = torch.randn(4, 600, 64)
    torch.testing.assert_close(mod(x), ref(x), rtol=1e-5, atol=1e-5)
    cell = ParaGRU(64, 64)
    assert isinstance(cell.proj, Linear)
