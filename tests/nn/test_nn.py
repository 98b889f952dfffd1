"""pararnn.nn drop-ins against torch.nn.GRU/LSTM/RNN in fp64: values, final states, gradients."""
import copy
import random

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import pararnn

KINDS = ["GRU", "LSTM", "RNN"]


def _pair(kind, mode="parallel", **kw):
    ref = getattr(nn, kind)(dtype=torch.float64, **kw)
    ours = getattr(pararnn.nn, kind)(dtype=torch.float64, mode=mode, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _flat(h):
    return torch.cat(h) if isinstance(h, tuple) else h


def _random_config(rng):
    return dict(input_size=rng.randint(1, 5), hidden_size=rng.randint(1, 6), num_layers=rng.randint(1, 3),
                bias=rng.random() < 0.7, batch_first=rng.random() < 0.5, bidirectional=rng.random() < 0.5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_random_configurations_equal_torch_nn(kind, seed):
    rng = random.Random(seed)
    cfg = _random_config(rng)
    if kind == "RNN":
        cfg["nonlinearity"] = rng.choice(["tanh", "relu"])
    mode = rng.choice(["parallel", "sequential"])
    ref, ours = _pair(kind, mode, **cfg)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    B, T = 3, rng.choice([1, 7, 33])
    dirs = 2 if cfg["bidirectional"] else 1
    shape = (B, T, cfg["input_size"]) if cfg["batch_first"] else (T, B, cfg["input_size"])
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(cfg["num_layers"] * dirs, B, cfg["hidden_size"], dtype=torch.float64)
    hx = (h0, torch.randn_like(h0)) if kind == "LSTM" else h0
    packed = seed % 2 == 1  # lengths 1 and T in one batch, unsorted
    lengths = torch.tensor([T, 1, max(1, T // 2)])
    inputs = []
    for _ in range(2):
        inputs.append(pack_padded_sequence(x, lengths, batch_first=cfg["batch_first"], enforce_sorted=False)
                      if packed else x)
    (yr, hr), (yo, ho) = ref(inputs[0], hx), ours(inputs[1], hx)
    if packed:
        assert torch.equal(yo.batch_sizes, yr.batch_sizes)
        assert torch.equal(yo.unsorted_indices, yr.unsorted_indices)
        yr, yo = yr.data, yo.data
    torch.testing.assert_close(yo, yr)
    torch.testing.assert_close(_flat(ho), _flat(hr))
    loss = lambda y, h: (y.sin() * torch.linspace(0, 1, y.shape[-1], dtype=y.dtype)).sum() + _flat(h).square().sum()  # noqa: E731
    gr = torch.autograd.grad(loss(yr, hr), [x, *ref.parameters()])
    go = torch.autograd.grad(loss(yo, ho), [x, *ours.parameters()])
    for a, b in zip(go, gr):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_state_dicts_load_both_ways_and_seeds_give_torch_weights(kind):
    torch.manual_seed(3)
    ref = getattr(nn, kind)(3, 4, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    ours = getattr(pararnn.nn, kind)(3, 4, num_layers=2, bidirectional=True)
    for (n, a), (m, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert n == m
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same seed, same initial weights
    back = getattr(nn, kind)(3, 4, num_layers=2, bidirectional=True)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(back(x)[0], ours(x)[0])


def test_unbatched_and_sorted_packed_inputs():
    ref, ours = _pair("GRU", input_size=4, hidden_size=5)
    x = torch.randn(30, 4, dtype=torch.float64)
    h0 = torch.randn(1, 5, dtype=torch.float64)
    (yr, hr), (yo, ho) = ref(x, h0), ours(x, h0)
    assert yo.shape == (30, 5) and ho.shape == (1, 5)
    torch.testing.assert_close(yo, yr)
    torch.testing.assert_close(ho, hr)
    packed = pack_sequence([torch.randn(n, 4, dtype=torch.float64) for n in (9, 5, 2)])  # enforce_sorted
    (pr, hr), (po, ho) = ref(packed), ours(packed)
    assert po.sorted_indices is None
    torch.testing.assert_close(po.data, pr.data)
    torch.testing.assert_close(ho, hr)


def test_parametrizations_on_the_module_reach_the_solver():
    """weight_norm on weight_hh_l0 of the drop-in changes its output exactly as on torch.nn.GRU."""
    ref, ours = _pair("GRU", input_size=3, hidden_size=4)
    for m in (ref, ours):
        torch.nn.utils.parametrizations.weight_norm(m, "weight_hh_l0")
        with torch.no_grad():
            m.parametrizations.weight_hh_l0.original0.mul_(3)  # the norms change, the stored weight does not
    x = torch.randn(16, 2, 3, dtype=torch.float64)
    yr, yo = ref(x)[0], ours(x)[0]
    torch.testing.assert_close(yo, yr)
    for a, b in zip(torch.autograd.grad(yo.sum(), list(ours.parameters())),
                    torch.autograd.grad(yr.sum(), list(ref.parameters()))):
        torch.testing.assert_close(a, b)


def test_deepcopy_is_independent():
    ours = pararnn.nn.LSTM(3, 4)
    twin = copy.deepcopy(ours)
    x = torch.randn(6, 2, 3)
    torch.testing.assert_close(twin(x)[0], ours(x)[0])
    with torch.no_grad():
        twin.weight_hh_l0.zero_()
        twin.weight_ih_l0.zero_()
    assert not torch.allclose(twin(x)[0], ours(x)[0])


def test_dropout_between_layers_only_in_training():
    ours = pararnn.nn.GRU(3, 4, num_layers=2, dropout=0.5)
    x = torch.randn(8, 2, 3)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], ours(x)[0])
    ours.train()
    assert not torch.allclose(ours(x)[0], ours(x)[0])


def test_swapping_torch_gru_gives_the_same_loss_curve():
    def losses(cls, **kw):
        torch.manual_seed(1)
        model = cls(4, 8, num_layers=2, batch_first=True, dtype=torch.float64, **kw)
        head = nn.Linear(8, 1, dtype=torch.float64)
        opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=1e-2)
        out = []
        for _ in range(15):
            x = torch.randn(4, 48, 4, dtype=torch.float64)
            target = x.sum(-1, keepdim=True).cumsum(1).tanh()
            loss = (head(model(x)[0]) - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        return out

    ref, ours = losses(nn.GRU), losses(pararnn.nn.GRU, mode="parallel")
    assert ref[-1] < ref[0]  # it is learning
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref), rtol=1e-9, atol=0)


@pytest.mark.parametrize("call, match", [
    (lambda: pararnn.nn.LSTM(3, 4, proj_size=2), "proj_size"),
    (lambda: pararnn.nn.GRU(0, 4), "input_size"),
    (lambda: pararnn.nn.GRU(3, 4, dropout=2.0), "dropout"),
    (lambda: pararnn.nn.RNN(3, 4, nonlinearity="gelu"), "nonlinearity"),
    (lambda: pararnn.nn.GRU(3, 4)(torch.randn(5, 2, 3), torch.zeros(2, 2, 4)), r"hx must be \[num_layers"),
    (lambda: pararnn.nn.LSTM(3, 4)(torch.randn(5, 2, 3), torch.zeros(1, 2, 4)), "tuple"),
    (lambda: pararnn.nn.LSTM(3, 4)(torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 3, 4))), "c0"),
    (lambda: pararnn.nn.GRU(3, 4)(torch.randn(5, 2, 2)), "input_size"),
    (lambda: pararnn.nn.GRU(3, 4)(torch.randn(2, 5, 2, 3)), "Expected input to be 2D or 3D"),
])
def test_bad_arguments_are_named(call, match):
    """The message names the argument; the type is torch.nn's (test_trust: the forward's cases
    against torch.nn's own)."""
    with pytest.raises((ValueError, TypeError, RuntimeError, NotImplementedError), match=match):
        call()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("module", ["GRU", "LSTM", "RNN"])
def test_autocast_returns_torch_nn_s_dtypes(module, x_dtype):
    """Under CPU autocast the drop-ins return the dtypes torch.nn's modules return (which differ by
    op and input kind: on torch 2.13, LSTM and RNN the lower precision, GRU its input's, LSTM with a
    PackedSequence of unequal lengths float32), with bf16-close values, and gradients reach the
    weights."""
    torch.manual_seed(0)
    ref = getattr(torch.nn, module)(3, 8, batch_first=True)
    ours = getattr(pararnn.nn, module)(3, 8, batch_first=True)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 20, 3).to(x_dtype)
    pack = torch.nn.utils.rnn.pack_padded_sequence
    for inp in (x, pack(x, torch.tensor([20, 9]), batch_first=True), pack(x, torch.tensor([20, 20]), batch_first=True)):
        with torch.autocast("cpu", torch.bfloat16):
            want, want_h = ref(inp)
            got, got_h = ours(inp)
        if isinstance(inp, torch.nn.utils.rnn.PackedSequence):
            want, got = want.data, got.data
        want_h, got_h = (want_h, got_h) if module == "LSTM" else ((want_h,), (got_h,))
        for a, b in zip((got, *got_h), (want, *want_h), strict=True):
            assert a.dtype == b.dtype
            torch.testing.assert_close(a.float(), b.float(), rtol=0, atol=3e-2)
        got.float().sum().backward()
        assert ours.weight_hh_l0.grad is not None and bool(ours.weight_hh_l0.grad.abs().sum() > 0)


def test_the_autocast_probe_leaves_the_random_stream_alone():
    """The one-off probe of torch.nn's autocast dtype runs torch's forward, whose dropout between
    layers draws: the caller's stream after a probed call is the one after a cached call."""
    import pararnn.nn as pnn

    m = pnn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True).train()
    x = torch.randn(2, 10, 3)

    def call(probe: bool):
        if probe:
            pnn._AUTOCAST_DTYPES.clear()
        torch.manual_seed(5)
        with torch.autocast("cpu", torch.bfloat16):
            y, _ = m(x)
        return y, torch.rand(3)

    (y1, r1), (y2, r2) = call(True), call(False)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(r1, r2, rtol=0, atol=0)


def test_chunk_size_on_the_drop_ins():
    ref, ours = _pair("LSTM", "parallel", input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    chunked = pararnn.nn.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, mode="parallel",
                              chunk_size=5)
    chunked.load_state_dict(ref.state_dict())
    x = torch.randn(23, 2, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor([23, 9]), enforce_sorted=False)
    (yr, hr), (yc, hc) = ref(packed), chunked(packed)
    torch.testing.assert_close(yc.data, yr.data)
    torch.testing.assert_close(_flat(hc), _flat(hr))
    assert len(chunked.rnns[0].last_info.chunks) == 5


# ------------------------------------------------------------------ a word_language_model-style client
class _WordModel(torch.nn.Module):
    """The shape of pytorch/examples' word_language_model: encoder, RNN, dropout, decoder; the RNN
    class is the one thing that changes."""

    def __init__(self, rnn_cls, ntoken=50, ninp=16, nhid=16, nlayers=2, dropout=0.2):
        super().__init__()
        self.drop = torch.nn.Dropout(dropout)
        self.encoder = torch.nn.Embedding(ntoken, ninp)
        # time-major, as there; no dropout inside the RNN (torch's native kernel draws its masks
        # from the generator in an order of its own, so the two runs would differ by design)
        self.rnn = rnn_cls(ninp, nhid, nlayers)
        self.decoder = torch.nn.Linear(nhid, ntoken)
        self.nhid, self.nlayers = nhid, nlayers

    def forward(self, tokens, hidden):  # [T, B] -> [T·B, ntoken]
        out, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(out)).view(-1, self.decoder.out_features), hidden

    def init_hidden(self, bsz):
        w = next(self.parameters())
        h = w.new_zeros(self.nlayers, bsz, self.nhid)
        return (h, h.clone()) if isinstance(self.rnn, torch.nn.LSTM) else h


def _repackage(h):
    return tuple(_repackage(v) for v in h) if isinstance(h, tuple) else h.detach()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_word_language_model_loop_with_the_rnn_swapped(kind, tmp_path):
    """Truncated BPTT with hidden states carried (and detached) across batches, clipping, eval,
    then the whole model saved with torch.save and loaded back with weights_only=True: the same
    losses as with torch.nn, and the reloaded model gives the same loss."""
    torch.manual_seed(0)
    data = torch.randint(0, 50, (121, 4))  # [T_total, B], a batchified corpus
    losses = {}
    for name, cls in (("torch", getattr(torch.nn, kind)), ("pararnn", getattr(pararnn.nn, kind))):
        torch.manual_seed(1)
        model = _WordModel(cls)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        hidden, run = model.init_hidden(4), []
        model.train()
        for i in range(0, 100, 20):
            x, y = data[i:i + 20], data[i + 1:i + 21]
            hidden = _repackage(hidden)
            torch.manual_seed(i)  # the same dropout masks in both runs
            out, hidden = model(x, hidden)
            loss = torch.nn.functional.cross_entropy(out, y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            run.append(loss.item())
        model.eval()
        with torch.no_grad():
            out, _ = model(data[100:120], model.init_hidden(4))
            run.append(torch.nn.functional.cross_entropy(out, data[101:121].reshape(-1)).item())
        losses[name] = run
        if name == "pararnn":
            torch.save(model, tmp_path / "model.pt")
            # the client's own allow-list (its classes and torch's), plus pararnn's one-liner
            own = [_WordModel, torch.nn.Dropout, torch.nn.Embedding, torch.nn.Linear]
            with torch.serialization.safe_globals([*own, *pararnn.nn.safe_globals()]):
                loaded = torch.load(tmp_path / "model.pt", weights_only=True)
            assert isinstance(loaded.rnn, getattr(torch.nn, kind))
            with torch.no_grad():
                out, _ = loaded(data[100:120], loaded.init_hidden(4))
            assert abs(torch.nn.functional.cross_entropy(out, data[101:121].reshape(-1)).item() - run[-1]) < 1e-6
    torch.testing.assert_close(torch.tensor(losses["pararnn"]), torch.tensor(losses["torch"]), rtol=1e-4, atol=1e-4)
