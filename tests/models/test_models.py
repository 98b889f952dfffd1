"""The cell zoo: every cell parallel == sequential, gradients, exactness of linear cells, torch twins."""
import pytest
import torch
import torch.nn.functional as F

import pararnn
from pararnn.models import (CELLS, GRU, LRU, LSTM, DeltaProduct, ParaGRU, ParaLSTM, SelectiveSSM,
                            SequenceModel, make_cell)
from helpers import rel_err

LINEAR = {"lru", "ssm", "ssm_neg", "cssm", "deltanet", "deltaproduct"}


def cell_and_input(name, dtype=torch.float64, B=2, T=40, d=6):
    cell = make_cell(name, d).to(dtype)
    return cell, torch.randn(B, T, d, dtype=dtype)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("with_h0", [False, True])
def test_parallel_equals_sequential_fp64(name, with_h0):
    cell, x = cell_and_input(name, T=63)
    rnn = pararnn.RNN(cell)
    h0 = None
    if with_h0:
        sd = cell.state_dtype(cell.prepare(x[:, :1]))
        h0 = 0.5 * torch.randn(2, cell.state_size, dtype=sd)
    y, hT, info = rnn(x, h0, return_info=True)
    ys, hTs = rnn(x, h0, mode="sequential")
    assert y.shape == (2, 63, cell.output_size) and hT.shape == (2, cell.state_size)
    assert rel_err(y, ys) < 1e-10 and rel_err(hT, hTs) < 1e-10
    if name in LINEAR:
        assert info.iterations == 1, "a linear cell must be solved by exactly one Newton step"


@pytest.mark.parametrize("name", CELLS)
def test_parallel_equals_sequential_fp32(name):
    cell, x = cell_and_input(name, torch.float32, T=200)
    rnn = pararnn.RNN(cell)
    assert rel_err(rnn(x)[0], rnn(x, mode="sequential")[0]) < 1e-5


@pytest.mark.parametrize("name", CELLS)
def test_gradients_match_sequential(name):
    cell, x = cell_and_input(name, T=25)
    x.requires_grad_()
    rnn = pararnn.RNN(cell)
    wrt = [x, *cell.parameters()]
    g = None
    grads = {}
    for mode in ("parallel", "sequential"):
        y, hT = rnn(x, mode=mode)
        g = torch.randn_like(y) if g is None else g
        loss = (y * g).sum() + hT.abs().sum()
        grads[mode] = torch.autograd.grad(loss, wrt, allow_unused=True)
    for a, b in zip(grads["parallel"], grads["sequential"]):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            assert rel_err(a, b) < 1e-9


@pytest.mark.parametrize("name", CELLS)
def test_gradcheck_tiny(name):
    cell = make_cell(name, 3, **({"d_k": 2, "d_v": 2} if "delta" in name else {})).double()
    rnn = pararnn.RNN(cell)
    x = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rnn(x)[0], (x,))


@pytest.mark.parametrize("name", CELLS)
def test_declared_structure_and_hand_written_jacobians(name):
    """check_structure: the declaration holds and any hand-written Jacobian equals torch.func's."""
    cell, _ = cell_and_input(name)
    pararnn.check_structure(cell)


def test_multi_head_variants_are_block_diagonal():
    for cell in (GRU(4, 8, heads=2), LSTM(4, 8, heads=4), make_cell("elman", 8, heads=2)):
        cell = cell.double()
        assert isinstance(cell.get_structure(), pararnn.Block)
        pararnn.check_structure(cell)
        x = torch.randn(2, 30, cell.input_size, dtype=torch.float64)
        rnn = pararnn.RNN(cell)
        assert rel_err(rnn(x)[0], rnn(x, mode="sequential")[0]) < 1e-10


@pytest.mark.parametrize("kind", ["gru", "lstm"])
def test_from_torch_reproduces_torch(kind):
    torch_mod = (torch.nn.GRU if kind == "gru" else torch.nn.LSTM)(5, 7, batch_first=True)
    cell = (GRU if kind == "gru" else LSTM).from_torch(torch_mod)
    x = torch.randn(3, 50, 5)
    out, state = torch_mod(x)
    for mode in ("parallel", "sequential"):
        y, sT = pararnn.RNN(cell, mode=mode)(x)
        assert rel_err(y, out) < 1e-5
        if kind == "gru":
            assert rel_err(sT, state[0]) < 1e-5
        else:
            h, c = cell.split_state(sT)
            assert rel_err(h, state[0][0]) < 1e-5 and rel_err(c, state[1][0]) < 1e-5
    back = cell.to_torch()
    out2, _ = back(x)
    assert torch.equal(out2, out)


def test_lstm_initial_state_parts():
    tl = torch.nn.LSTM(3, 4, batch_first=True).double()
    cell = LSTM.from_torch(tl)
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    h0, c0 = torch.randn(1, 2, 4, dtype=torch.float64), torch.randn(1, 2, 4, dtype=torch.float64)
    out, _ = tl(x, (h0, c0))
    y, _ = pararnn.RNN(cell)(x, cell.join_state(h0[0], c0[0]))
    assert rel_err(y, out) < 1e-12


@pytest.mark.parametrize("rng, lo, hi", [("[0,1]", 0.0, 1.0), ("[-1,1]", -1.0, 1.0)])
def test_selective_ssm_eigenvalue_range(rng, lo, hi):
    cell = SelectiveSSM(4, 16, eigenvalue_range=rng)
    a, _ = cell.transitions(10 * torch.randn(8, 100, 4))
    assert a.min() >= lo and a.max() <= hi
    if rng == "[-1,1]":
        assert a.min() < 0, "the [-1,1] range must actually produce negative eigenvalues"
    with pytest.raises(ValueError, match="eigenvalue_range"):
        SelectiveSSM(4, 16, eigenvalue_range="[0,2]")


def test_complex_ssm_rotations_are_input_dependent_and_contractive():
    from pararnn.models import ComplexSSM

    cell = ComplexSSM(3, 8)
    a, _ = cell.transitions(5 * torch.randn(4, 50, 3))
    assert a.is_complex() and a.abs().max() <= 1.0
    assert a.angle().std(dim=1).min() > 0.1  # the phase changes with the input


@pytest.mark.parametrize("neg", [False, True])
@pytest.mark.parametrize("n_h", [1, 2, 3])
def test_deltaproduct_matches_naive_loop_and_eigenvalue_range(neg, n_h):
    torch.manual_seed(1)
    cell = DeltaProduct(5, 4, 3, n_h=n_h, allow_neg_eigval=neg).double()
    x = torch.randn(2, 30, 5, dtype=torch.float64)
    # the recurrence written out here, independently of the cell's step
    beta, k, v = cell.betas_keys_values(x)
    H = torch.zeros(2, 4, 3, dtype=torch.float64)
    outs = []
    for t in range(30):
        for j in range(n_h):
            kk, vv, bb = k[:, t, j], v[:, t, j], beta[:, t, j]
            H = H - bb[:, None, None] * kk[:, :, None] * (kk[:, None, :] @ H) + bb[:, None, None] * kk[:, :, None] * vv[:, None, :]
        q = F.normalize(cell.q_proj(x[:, t]), dim=-1)
        outs.append((H.transpose(1, 2) @ q.unsqueeze(-1)).squeeze(-1))
    want = torch.stack(outs, 1)
    y, hT, info = pararnn.RNN(cell)(x, return_info=True)
    assert info.iterations == 1
    assert rel_err(y, want) < 1e-12
    assert rel_err(hT.unflatten(-1, (3, 4)).transpose(1, 2), H) < 1e-12
    # eigenvalues of A_t lie in [0, 1] (or [-1, 1] with allow_neg_eigval); each factor has
    # eigenvalue 1 - β on k, so β near 2 gives near -1.
    A = cell.transition(cell.prepare(10 * x).flatten(0, 1))
    ev = torch.linalg.eigvals(A)
    assert ev.abs().max() <= 1 + 1e-9
    if n_h == 1:
        assert ev.real.min() >= (-1 - 1e-9 if neg else -1e-9)
        if neg:
            assert ev.real.min() < -0.5


def test_lru_ring_init_and_gamma():
    cell = LRU(4, 64, r_min=0.9, r_max=0.99, max_phase=0.5)
    lam = cell.eigenvalues()
    assert lam.abs().min() >= 0.9 - 1e-6 and lam.abs().max() <= 0.99 + 1e-6
    assert lam.angle().min() >= 0 and lam.angle().max() <= 0.5 + 1e-6
    with pytest.raises(ValueError, match="r_min"):
        LRU(4, 8, r_min=0.5, r_max=0.2)


def test_lru_output_is_real_c_h_plus_d_x():
    cell = LRU(3, 5).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    y, _ = pararnn.RNN(cell)(x)
    lam = cell.eigenvalues()
    u = cell.prepare(x)
    h = torch.zeros(2, 5, dtype=torch.complex128)
    C = torch.complex(cell.C_re, cell.C_im)
    for t in range(7):
        h = lam * h + u[:, t]
        assert rel_err(y[:, t], (h @ C.T).real + cell.D * x[:, t]) < 1e-12


def test_paragru_and_paralstm_hand_written_or_autodiff_agree():
    for cell in (ParaGRU(4, 6).double(), ParaLSTM(4, 3).double()):
        u = cell.prepare(torch.randn(10, 1, 4, dtype=torch.float64))[:, 0]
        h = torch.randn(10, cell.state_size, dtype=torch.float64)
        f, J = cell.step_and_jacobian(h, u)
        f2, J2 = pararnn.autodiff_step_and_jacobian(cell.step, h, u, cell.get_structure())
        assert rel_err(f, f2) < 1e-14 and rel_err(J, J2) < 1e-13


@pytest.mark.parametrize("name", ["paragru", "lstm", "lru", "deltaproduct"])
def test_sequence_model_forward_step_and_modes(name):
    model = SequenceModel(11, 5, d_model=8, n_layers=2, cell=name).double()
    tokens = torch.randint(0, 11, (2, 13))
    out, states = model(tokens)
    out_seq, _ = model(tokens, mode="sequential")
    assert out.shape == (2, 13, 5) and rel_err(out, out_seq) < 1e-9
    st = None
    for t in range(13):
        o, st = model.step(tokens[:, t], st)
        assert rel_err(o, out[:, t]) < 1e-9
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_regression_model_and_cell_instances():
    model = SequenceModel(3, 2, d_model=8, n_layers=2, cell=ParaGRU(8, 8), regression=True)
    out, _ = model(torch.randn(4, 10, 3))
    assert out.shape == (4, 10, 2)
    assert model.blocks[0].cell is not model.blocks[1].cell
    with pytest.raises(ValueError, match="unknown cell"):
        make_cell("transformer", 8)
    with pytest.raises(ValueError, match="input_size"):  # a block feeds its cell [B, T, d_model]
        SequenceModel(3, 2, d_model=8, n_layers=1, cell=ParaGRU(4, 8), regression=True)
    with pytest.raises(TypeError, match="token ids"):
        SequenceModel(5, 2, d_model=8, n_layers=1)(torch.randn(2, 3))


def test_torch_compile_does_not_break():
    model = SequenceModel(7, 3, d_model=8, n_layers=1, cell="paragru")
    tokens = torch.randint(0, 7, (2, 9))
    ref_par, _ = model(tokens)
    ref_seq, _ = model(tokens, mode="sequential")
    compiled = torch.compile(model, backend="eager")  # graph capture; inductor codegen is not run in CI
    out_par, _ = compiled(tokens)
    out_seq, _ = compiled(tokens, mode="sequential")
    assert rel_err(out_par, ref_par) < 1e-6 and rel_err(out_seq, ref_seq) < 1e-6


def test_residual_block_registers_its_cell_once_and_loads_old_checkpoints():
    torch.manual_seed(0)
    block = pararnn.models.ResidualBlock(8, "paragru")
    keys = list(block.state_dict())
    assert not any(k.startswith("cell.") for k in keys) and any(k.startswith("rnn.cell.") for k in keys)
    assert block.cell is block.rnn.cell
    # an old checkpoint: every cell tensor under both cell.* and rnn.cell.*
    old = {**block.state_dict(), **{k[len("rnn."):]: v + 1 for k, v in block.state_dict().items()
                                    if k.startswith("rnn.cell.")}}
    fresh = pararnn.models.ResidualBlock(8, "paragru")
    fresh.load_state_dict(old)  # strict: no unexpected or missing keys
    torch.testing.assert_close(fresh.cell.a, block.cell.a)  # the rnn.cell.* copy wins
    model = SequenceModel(5, 3, d_model=8, n_layers=2)
    assert sum(1 for k in model.state_dict() if ".cell." in k) == sum(1 for k in model.state_dict() if "rnn.cell." in k)


def test_bound_recurrent_weights():
    from pararnn.models import Elman, bound_recurrent_weights

    torch.manual_seed(0)
    cell = ParaGRU(4, 8).double()
    with torch.no_grad():
        cell.a.normal_(0, 3.0)
    bound_recurrent_weights(cell, 0.9)
    assert cell.a.abs().max() < 0.9
    x = torch.randn(2, 40, 4, dtype=torch.float64)
    y, _ = pararnn.RNN(cell)(x)
    assert rel_err(y, pararnn.RNN(cell, mode="sequential")(x)[0]) < 1e-10
    orig = cell.parametrizations.a.original
    (g_par,) = torch.autograd.grad(y.square().sum(), orig)  # trained through the bound
    (g_seq,) = torch.autograd.grad(pararnn.RNN(cell, mode="sequential")(x)[0].square().sum(), orig)
    assert g_par.abs().max() > 0 and rel_err(g_par, g_seq) < 1e-8
    gru = GRU(4, 6).double()
    with torch.no_grad():
        gru.weight_hh.mul_(10)
    bound_recurrent_weights(gru, 0.5)
    norms = torch.linalg.matrix_norm(gru.weight_hh.reshape(3, 6, 6), ord=2)
    assert bool((norms <= 0.5 + 1e-9).all())
    pararnn.check_structure(gru)  # the hand-written Jacobian sees the bounded weight
    assert set(Elman.recurrent_parameters) == {"weight_hh"}
    with pytest.raises(ValueError, match="recurrent_parameters"):
        bound_recurrent_weights(LRU(4, 8), 0.9)
    with pytest.raises(ValueError, match="bound"):
        bound_recurrent_weights(ParaGRU(4, 8), 0.0)


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_half_precision_autocast_every_cell(name, mode, low, device):
    torch.manual_seed(0)
    cell = make_cell(name, 8).to(device)
    x = torch.randn(2, 40, 8, device=device)
    ref = pararnn.RNN(cell, mode="sequential")(x)[0]
    with torch.autocast(device, dtype=low):
        y, _, info = pararnn.RNN(cell, mode=mode)(x, return_info=True)
        y_lp = pararnn.RNN(cell, mode=mode)(x.to(low))[0]  # half activations from an autocast layer
    assert info.all_converged and info.iterations <= 5  # not max_iters and a fallback
    assert rel_err(y.float(), ref.double().float()) < 3e-2 and rel_err(y_lp.float(), ref) < 5e-2
    y.float().sum().backward()
    assert all(p.grad is not None for p in cell.parameters() if p.requires_grad)


def test_save_pretrained_round_trip(tmp_path):
    from pararnn.models import SequenceModelConfig
    model = SequenceModel(11, 7, d_model=8, n_layers=2, cell="gru", solver_options={"max_iters": 50},
                          mlp_ratio=2, heads=2).double()
    model.save_pretrained(tmp_path / "m")
    loaded = SequenceModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config == SequenceModelConfig(
        11, 7, 8, 2, "gru", "parallel", False, 2, {"max_iters": 50}, {"heads": 2})
    assert next(loaded.parameters()).dtype == torch.float64
    assert loaded.blocks[0].rnn.options.max_iters == 50 and loaded.blocks[0].cell.heads == 2
    x = torch.randint(0, 11, (2, 9))
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    assert SequenceModel.from_config(model.config).config == model.config
    with pytest.raises(ValueError, match="cell given by name"):
        SequenceModel(5, 2, d_model=8, n_layers=1, cell=ParaGRU(8, 8)).save_pretrained(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="config.json"):
        SequenceModel.from_pretrained(tmp_path / "nothing")


@pytest.mark.parametrize("cell", ["paragru", "lstm", "deltanet"])
def test_generate_after_parallel_prefill_equals_a_sequential_run(cell):
    torch.manual_seed(0)
    model = SequenceModel(13, 13, d_model=8, n_layers=2, cell=cell).double()
    prompt = torch.randint(0, 13, (3, 40))
    greedy = model.generate(prompt, 12, temperature=0)
    assert greedy.shape == (3, 52) and torch.equal(greedy[:, :40], prompt)
    # the same tokens, decoded one step at a time from the start
    states, tokens = None, [prompt[:, 0]]
    for t in range(51):
        logits, states = model.step(tokens[-1] if t >= 40 else prompt[:, t], states)
        if t >= 39:
            tokens.append(logits.argmax(-1))
    torch.testing.assert_close(greedy[:, 40:], torch.stack(tokens[1:], 1))
    sampled = [model.generate(prompt, 8, temperature=0.8, top_k=4, generator=torch.Generator().manual_seed(5),
                              mode=m) for m in ("parallel", "sequential")]
    assert torch.equal(sampled[0], sampled[1])
    assert torch.equal(model.generate(prompt, 5, top_k=1), greedy[:, :45])  # top-1 sampling is greedy
    for bad in ({"max_new_tokens": -1}, {"max_new_tokens": 2, "temperature": -1.0}, {"max_new_tokens": 2, "top_k": 0}):
        with pytest.raises(ValueError, match=next(iter(bad)) if len(bad) == 1 else list(bad)[1]):
            model.generate(prompt, **bad)


def test_deltaproduct_heads_are_independent_cells():
    """n_heads = 2 equals two one-head cells given the matching slices of the projections, in
    parallel and sequential mode, with gradients; its Block(d_k) Jacobian passes the dense check."""
    torch.manual_seed(2)
    H, dk, dv, n_h = 2, 3, 4, 2
    cell = DeltaProduct(5, dk, dv, n_h=n_h, allow_neg_eigval=True, n_heads=H).double()
    heads = [DeltaProduct(5, dk, dv, n_h=n_h, allow_neg_eigval=True).double() for _ in range(H)]
    with torch.no_grad():
        for h, c in enumerate(heads):
            for name, size in (("k_proj", n_h * dk), ("v_proj", n_h * dv), ("b_proj", n_h), ("q_proj", dk)):
                big, small = getattr(cell, name), getattr(c, name)
                small.weight.copy_(big.weight[h * size:(h + 1) * size])
                small.bias.copy_(big.bias[h * size:(h + 1) * size])
    x = torch.randn(2, 25, 5, dtype=torch.float64)
    want = torch.cat([pararnn.RNN(c, mode="sequential")(x)[0] for c in heads], -1)
    y, _, info = pararnn.RNN(cell)(x, return_info=True)
    assert info.iterations <= 2 and rel_err(y, want) < 1e-12
    assert rel_err(pararnn.RNN(cell, mode="sequential")(x)[0], want) < 1e-12
    xp = x.clone().requires_grad_()
    (gp,) = torch.autograd.grad(pararnn.RNN(cell)(xp)[0].square().sum(), xp)
    (gs,) = torch.autograd.grad(pararnn.RNN(cell, mode="sequential")(xp)[0].square().sum(), xp)
    assert rel_err(gp, gs) < 1e-10
    pararnn.verify.verify_cell(cell, torch.randn(4, cell.state_size, dtype=torch.float64),
                             cell.prepare(torch.randn(4, 1, 5, dtype=torch.float64))[:, 0])


@pytest.mark.parametrize("name", CELLS)
def test_diagnose_states_what_the_solve_does_for_every_cell(name):
    """diagnose's advice on the zoo: the Newton steps (and sweeps) the parallel solve takes on the
    input, equal to what RNN then does; linear cells take one step; none falls back."""
    cell, x = cell_and_input(name, torch.float32, T=300)
    est = pararnn.diagnose(cell, x)
    _, _, info = pararnn.RNN(cell)(x, return_info=True)
    assert est.will_fall_back is False and not info.fell_back.any()
    assert est.newton_iterations == info.iterations and est.sweeps == info.sweeps
    assert f"took {info.iterations} Newton steps" in est.advice
    if name in LINEAR:
        assert info.iterations == 1
