"""Variable lengths (right-padded batches): every sequence as if it ran alone, in both modes."""
import pytest
import torch
from helpers import KINDS, make_cell, rel_err

import pararnn
from pararnn.models import LSTM, SequenceModel


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_padded_batch_equals_each_sequence_alone(kind, mode):
    torch.manual_seed(0)
    cell = make_cell(kind)
    T, lengths = 17, torch.tensor([17, 1, 9, 5])
    x = torch.randn(4, T, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, cell.state_size, dtype=torch.float64, requires_grad=True)
    rnn = pararnn.RNN(cell, mode=mode)
    y, hT = rnn(x, h0, lengths=lengths)
    gy = torch.randn_like(y)
    gx, gh0 = torch.autograd.grad((y * gy).sum() + hT.square().sum(), [x, h0])
    for b, L in enumerate(lengths.tolist()):
        xb = x[b:b + 1, :L].detach().requires_grad_()
        hb = h0[b:b + 1].detach().requires_grad_()
        yb, hTb = pararnn.RNN(cell, mode="sequential")(xb, hb)
        assert rel_err(y[b, :L], yb[0]) < 1e-10 and rel_err(hT[b], hTb[0]) < 1e-10
        assert bool((y[b, L:] == 0).all())  # padded outputs are zero
        gxb, ghb = torch.autograd.grad((yb * gy[b:b + 1, :L]).sum() + hTb.square().sum(), [xb, hb])
        assert rel_err(gx[b, :L], gxb[0]) < 1e-9 and rel_err(gh0[b], ghb[0]) < 1e-9
        assert bool((gx[b, L:] == 0).all())  # padded inputs get no gradient


def test_lengths_with_a_readout_cell_and_the_layers():
    torch.manual_seed(0)
    cell = LSTM(3, 4).double()  # state (h, c) packed, output h
    x = torch.randn(3, 12, 3, dtype=torch.float64)
    lengths = torch.tensor([12, 4, 7])
    y, hT = pararnn.RNN(cell)(x, lengths=lengths)
    for b, L in enumerate(lengths.tolist()):
        yb, hTb = pararnn.RNN(cell)(x[b:b + 1, :L])
        assert rel_err(hT[b], hTb[0]) < 1e-10 and rel_err(y[b, :L], yb[0]) < 1e-10
    model = SequenceModel(5, 2, d_model=8, n_layers=2).double()
    tok = torch.randint(0, 5, (3, 12))
    _, states = model(tok, lengths=lengths)
    for b, L in enumerate(lengths.tolist()):
        _, sb = model(tok[b:b + 1, :L])
        assert all(rel_err(s[b], s1[0]) < 1e-9 for s, s1 in zip(states, sb))


@pytest.mark.parametrize("lengths, match", [
    (torch.tensor([3.0, 2.0]), "integer"),
    (torch.tensor([3]), "lengths must be an integer tensor"),
    (torch.tensor([0, 2]), r"\[1, T\]"),
    (torch.tensor([5, 2]), r"\[1, T\]"),
])
def test_bad_lengths_are_refused(lengths, match):
    rnn = pararnn.RNN(make_cell("diagonal"))
    with pytest.raises(ValueError, match=match):
        rnn(torch.randn(2, 4, 3, dtype=torch.float64), lengths=lengths)


@pytest.mark.parametrize("kind", ["diagonal", "block2"])
def test_lengths_with_the_triton_backend(kind):
    pytest.importorskip("triton")
    from pararnn.kernels import triton_scan

    if not (triton_scan.HAVE_TRITON and (torch.cuda.is_available() or triton_scan.interpreting())):
        pytest.skip("no CUDA and no Triton interpreter")
    import triton_interp

    triton_interp.install()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cell = make_cell(kind, dtype=torch.float32).to(device)
    x = torch.randn(3, 40, 3, device=device)
    lengths = torch.tensor([40, 1, 23])
    y, hT = pararnn.RNN(cell, backend="triton")(x, lengths=lengths)
    ys, hTs = pararnn.RNN(cell, mode="sequential")(x, lengths=lengths)
    assert rel_err(y, ys) < 1e-5 and rel_err(hT, hTs) < 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_packed_batch_equals_each_sequence_alone(kind, mode):
    torch.manual_seed(1)
    cell = make_cell(kind)
    cu = torch.tensor([0, 5, 6, 20])
    x = torch.randn(1, 20, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, cell.state_size, dtype=torch.float64, requires_grad=True)
    y, hT = pararnn.RNN(cell, mode=mode)(x, h0, cu_seqlens=cu)
    assert y.shape == (1, 20, cell.output_size) and hT.shape == (3, cell.state_size)
    gx, gh0 = torch.autograd.grad(y.square().sum() + hT.sum(), [x, h0])
    for n in range(3):
        s, e = int(cu[n]), int(cu[n + 1])
        xb, hb = x[:, s:e].detach().requires_grad_(), h0[n:n + 1].detach().requires_grad_()
        yb, hTb = pararnn.RNN(cell, mode="sequential")(xb, hb)
        assert rel_err(y[:, s:e], yb) < 1e-10 and rel_err(hT[n], hTb[0]) < 1e-10
        gxb, ghb = torch.autograd.grad(yb.square().sum() + hTb.sum(), [xb, hb])
        assert rel_err(gx[:, s:e], gxb) < 1e-9 and rel_err(gh0[n], ghb[0]) < 1e-9


@pytest.mark.parametrize("structure", ["diagonal", pararnn.Block(2), pararnn.Block(2, shared=True), "dense"])
@pytest.mark.parametrize("reverse", [False, True])
def test_linear_scan_cu_seqlens(structure, reverse):
    st = pararnn.structure.as_structure(structure, 4)
    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 1, 7, 12])
    A = (0.5 * torch.randn(1, 12, *st.storage_shape(4), generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(1, 12, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    h = pararnn.linear_scan(A, b, h0, structure, reverse=reverse, cu_seqlens=cu)
    gh = torch.randn_like(h)
    grads = torch.autograd.grad((h * gh).sum(), [A, b, h0])
    want, wgrads = [], [torch.zeros_like(A), torch.zeros_like(b), torch.zeros_like(h0)]
    for n in range(3):
        s, e = int(cu[n]), int(cu[n + 1])
        An, bn, hn = A[:, s:e].detach().requires_grad_(), b[:, s:e].detach().requires_grad_(), \
            h0[n:n + 1].detach().requires_grad_()
        hs = pararnn.linear_scan(An, bn, hn, structure, reverse=reverse, backend="reference")
        want.append(hs)
        gA, gb, gh0 = torch.autograd.grad((hs * gh[:, s:e]).sum(), [An, bn, hn])
        wgrads[0][:, s:e], wgrads[1][:, s:e], wgrads[2][n] = gA, gb, gh0[0]
    assert rel_err(h, torch.cat(want, 1)) < 1e-12
    for g_, w in zip(grads, wgrads):
        assert rel_err(g_, w) < 1e-11


@pytest.mark.parametrize("cu, match", [(torch.tensor([0, 3, 3, 6]), "rise strictly"),
                                       (torch.tensor([1, 6]), "rise strictly"),
                                       (torch.tensor([0.0, 6.0]), "integer")])
def test_bad_cu_seqlens_are_refused(cu, match):
    with pytest.raises(ValueError, match=match):
        pararnn.RNN(make_cell("diagonal"))(torch.randn(1, 6, 3, dtype=torch.float64), cu_seqlens=cu)
    with pytest.raises(ValueError, match=match):
        pararnn.linear_scan(torch.rand(1, 6, 4), torch.randn(1, 6, 4), cu_seqlens=cu)


def test_packed_batch_through_the_sequence_model():
    torch.manual_seed(0)
    model = SequenceModel(5, 2, d_model=8, n_layers=2).double()
    cu = torch.tensor([0, 4, 11])
    tok = torch.randint(0, 5, (1, 11))
    out, states = model(tok, cu_seqlens=cu)
    for n in range(2):
        s, e = int(cu[n]), int(cu[n + 1])
        o, sb = model(tok[:, s:e])
        assert rel_err(out[:, s:e], o) < 1e-9 and all(rel_err(a[n], c[0]) < 1e-9 for a, c in zip(states, sb))


def test_step_decoding_with_a_mask_equals_lengths():
    """Decoding a padded batch token by token with mask = (t < length) gives forward(lengths=)'s
    outputs and final states, through the whole model."""
    torch.manual_seed(0)
    model = SequenceModel(7, 3, d_model=8, n_layers=2, cell="paralstm").double()
    x = torch.randint(0, 7, (3, 20))
    lengths = torch.tensor([20, 1, 9])
    out, states = model(x, lengths=lengths)
    s, outs = None, []
    for t in range(20):
        o, s = model.step(x[:, t], s, mask=t < lengths)
        outs.append(o)
    for a, b in zip(s, states):
        torch.testing.assert_close(a, b)
    valid = (torch.arange(20) < lengths[:, None])[..., None]
    torch.testing.assert_close(torch.stack(outs, 1) * valid, out * valid)
    rnn = model.blocks[0].rnn
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        rnn.step(torch.randn(3, 8, dtype=torch.float64), None, mask=torch.ones(3))
