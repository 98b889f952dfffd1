"""No silent wrong answer: saves that cannot half-succeed, convergence rules that cannot accept a
growing correction, probes that see detached couplings and follow the weights, and errors that
name the argument. (Gradients in graph contexts: test_grad_contexts.py.)"""
import json
import os

import pytest
import torch
from helpers import DiagGRU

import pararnn
from pararnn.verify import CellCheckError
from pararnn.models import ParaGRU, ParaLSTM, SequenceModel
from pararnn.solver.newton import STALL_RATIO, correction_at_floor


# ---------------------------------------------------------------- save_pretrained is atomic
def test_an_interrupted_save_fails_to_load_loudly(tmp_path, monkeypatch):
    """New weights written, then the config write fails (a full disk): the folder must not load as
    a mixture of new weights and the old config."""
    old = SequenceModel(11, 11, d_model=8, n_layers=1)
    old.save_pretrained(tmp_path)
    new = SequenceModel(11, 11, d_model=8, n_layers=1)
    real_replace = os.replace

    def full_disk(src, dst):
        if dst.endswith("config.json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        new.save_pretrained(tmp_path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temporary left behind
    with pytest.raises(ValueError, match="interrupted"):
        SequenceModel.from_pretrained(tmp_path)
    new.save_pretrained(tmp_path)  # a complete save loads again
    loaded = SequenceModel.from_pretrained(tmp_path)
    for a, b in zip(loaded.state_dict().values(), new.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("field, value, err", [
    ("n_layers", "2", TypeError), ("d_model", 8.0, TypeError), ("n_in", True, TypeError),
    ("n_out", 0, ValueError), ("cell", "gruu", ValueError), ("mode", "fast", ValueError),
    ("regression", "no", TypeError), ("solver_options", [], TypeError), ("dtype", "nn", ValueError),
    ("dtype", 3, ValueError),
])
def test_a_hand_edited_config_names_the_field(tmp_path, field, value, err):
    SequenceModel(11, 11, d_model=8, n_layers=1).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))
    with pytest.raises(err, match=field):
        SequenceModel.from_pretrained(tmp_path)


def test_generate_with_a_tiny_temperature_is_greedy():
    torch.manual_seed(0)
    model = SequenceModel(13, 13, d_model=8, n_layers=1)
    prompt = torch.randint(0, 13, (3, 5))
    tiny = model.generate(prompt, 6, temperature=1e-45, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiny, model.generate(prompt, 6, temperature=0))


# ---------------------------------------------------------------- outputs are tensors of their own
@pytest.mark.parametrize("make", [lambda: ParaGRU(6, 6), lambda: ParaLSTM(6, 3), lambda: DiagGRU(6, 6)],
                         ids=["output_is_state", "output_is_part_of_state", "user_cell"])
def test_one_step_output_does_not_alias_the_state(make):
    """``RNN.step`` returns y and the next state; an in-place op on y (``y += skip``, ``relu_``)
    must leave the state the next step reads unchanged (y was the state itself, or LSTM's h half)."""
    torch.manual_seed(0)
    rnn = pararnn.RNN(make())
    x_t = torch.randn(2, 6)
    y, h = rnn.step(x_t)
    want = h.clone()
    y.mul_(-2)
    torch.relu_(y)
    torch.testing.assert_close(h, want, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [{}, {"mode": "sequential"}, {"chunk_size": 16}, {"compile_cell": True}],
                         ids=["parallel", "sequential", "chunk_size", "compile_cell"])
@pytest.mark.parametrize("make", [lambda: ParaGRU(4, 4), lambda: ParaLSTM(4, 2)],
                         ids=["output_is_state", "output_is_part_of_state"])
def test_forward_outputs_are_tensors_of_their_own(make, extra):
    """As torch.nn.GRU's: neither output is a view (``y.detach_()`` works, as in TBPTT loops), and
    y's gradient is dL/dy alone, not h_T's added at the last step (the gradient-context matrix
    checks hooks and output gradients in every feature)."""
    torch.manual_seed(0)
    rnn = pararnn.RNN(make(), **extra)
    x = torch.randn(2, 40, 4, requires_grad=True)
    y, h = rnn(x)
    assert y._base is None and h._base is None
    gy, gh = torch.autograd.grad(y.sin().sum() + 3 * h.sum(), (y, h))
    torch.testing.assert_close(gy, y.detach().cos())
    torch.testing.assert_close(gh, torch.full_like(h, 3.0))
    y.detach_()
    assert not y.requires_grad


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("module", ["GRU", "LSTM", "RNN"])
def test_nn_outputs_are_no_views_as_in_torch(module, batch_first):
    """torch.nn's batched outputs are no views: ``h_n.detach_()`` (a TBPTT loop) works on ours too."""
    m = getattr(pararnn.nn, module)(3, 4, batch_first=batch_first)
    out, hn = m(torch.randn(5, 6, 3))
    for t in (out, *(hn if isinstance(hn, tuple) else (hn,))):
        assert t._base is None
        t.detach_()


# ---------------------------------------------------------------- the correction's stall rule
def test_a_grown_correction_is_not_at_the_rounding_floor():
    """A correction the last step did not shrink passes only near the smallest one the solve
    reached; one that grew beyond it does not, however it compares with the last."""
    least = torch.tensor([1.0, 1.0, 1.0, 1.0])
    last = torch.tensor([1.0, 1.0, 1.0, 10.0])
    big = torch.tensor([1.1, 0.4, 5.0, 9.0])  # stalled; shrank; grew 5x; stalled far above the floor
    assert correction_at_floor(big, last, least).tolist() == [True, False, False, False]
    assert not bool(correction_at_floor(torch.tensor([float("nan")]), last[:1], least[:1]))
    assert bool(correction_at_floor(least / STALL_RATIO, last, least)[0])


# ---------------------------------------------------------------- the cell probe
def test_a_detached_batch_statistic_is_found():
    """h - h.mean(0).detach() couples the rows through a value autograd does not see: the parallel
    solve would converge to a wrong answer, so the probe refuses the cell."""

    class Centred(DiagGRU):
        def step(self, h, u):
            return super().step(h - h.mean(0).detach(), u)

    torch.manual_seed(0)
    with pytest.raises(CellCheckError, match="couples batch rows"):
        pararnn.RNN(Centred(3, 4))(torch.randn(3, 20, 3))
    pararnn.RNN(DiagGRU(3, 4))(torch.randn(3, 20, 3))  # an honest cell passes


@pytest.mark.parametrize("change", ["load_state_dict", "replace", "train"])
def test_the_probes_follow_the_weights(change):
    """What the probe found (verified, affine) belongs to the weights it saw: a load, a replaced
    parameter or training renews it. A linear cell (affine: init from zeros) becomes nonlinear."""

    class MaybeLinear(DiagGRU):
        def step(self, h, u):  # affine in h while a is zero
            return torch.tanh(self.a[0] * h) + u[..., :self.state_size]

    torch.manual_seed(0)
    cell = MaybeLinear(3, 4)
    with torch.no_grad():
        cell.a.zero_()
    rnn, x = pararnn.RNN(cell), torch.randn(2, 20, 3)
    rnn(x)
    assert cell.__dict__["_pararnn_facts"].affine
    if change == "load_state_dict":
        cell.load_state_dict({**cell.state_dict(), "a": torch.ones(3, 4)})
    elif change == "replace":
        cell.a = torch.nn.Parameter(torch.ones(3, 4))
    else:
        opt = torch.optim.SGD(cell.parameters(), lr=1.0)
        cell.a.grad = -torch.ones(3, 4)
        opt.step()
    rnn(x)
    assert not cell.__dict__["_pararnn_facts"].affine


def test_training_renews_the_probe_on_a_doubling_schedule():
    """In-place updates re-run the probe at the 1st, 2nd, 4th, 8th, ... update seen."""
    torch.manual_seed(0)
    cell = DiagGRU(3, 4)
    rnn, x = pararnn.RNN(cell), torch.randn(2, 20, 3)
    calls = []
    real = pararnn.verify.verify_cell
    pararnn.verify.verify_cell = lambda *a: (calls.append(1), real(*a))[1]
    try:
        for step in range(1, 11):
            rnn(x)
            with torch.no_grad():
                cell.a.mul_(0.99)
    finally:
        pararnn.verify.verify_cell = real
    assert len(calls) == 5  # first call, then after updates 1, 2, 4, 8


# ---------------------------------------------------------------- errors name the argument
@pytest.mark.parametrize("kw, err, match", [
    ({"batch_first": "False"}, TypeError, "batch_first"), ({"bias": "False"}, TypeError, "bias"),
    ({"bidirectional": "no"}, TypeError, "bidirectional"), ({"hidden_size": 4.0}, TypeError, "hidden_size"),
    ({"num_layers": 1.0}, TypeError, "num_layers"), ({"num_layers": 0}, ValueError, "num_layers"),
])
def test_nn_arguments_raise_what_torch_raises(kw, err, match):
    """The exception type torch.nn.GRU raises (at construction or at the first call), and a
    message that names the argument."""
    args = {"input_size": 3, "hidden_size": 4, **kw}
    with pytest.raises(err):
        torch.nn.GRU(**args)(torch.randn(5, 2, 3))
    with pytest.raises(err, match=match):
        pararnn.nn.GRU(**args)


def test_nn_input_of_another_dtype_is_a_value_error_as_in_torch():
    with pytest.raises(ValueError, match="dtype"):
        pararnn.nn.GRU(3, 4)(torch.randn(5, 2, 3, dtype=torch.float64))


def _hx(module: str, *shape, dtype=torch.float32):
    h = torch.zeros(*shape, dtype=dtype)
    return (h, h.clone()) if module == "LSTM" else h


FORWARD_CASES = {  # name: (input, hx (module name -> hx)): inputs torch.nn refuses, or takes at batch 0
    "input_size": (lambda: torch.randn(5, 2, 7), lambda m: None),
    "1-D input": (lambda: torch.randn(3), lambda m: None),
    "4-D input": (lambda: torch.randn(1, 5, 2, 3), lambda m: None),
    "hx 3-D, input unbatched": (lambda: torch.randn(5, 3), lambda m: _hx(m, 1, 1, 4)),
    "hx 2-D, input batched": (lambda: torch.randn(5, 2, 3), lambda m: _hx(m, 2, 4)),
    "hx batch": (lambda: torch.randn(5, 2, 3), lambda m: _hx(m, 1, 3, 4)),
    "hx hidden size": (lambda: torch.randn(5, 2, 3), lambda m: _hx(m, 1, 2, 5)),
    "hx dtype": (lambda: torch.randn(5, 2, 3), lambda m: _hx(m, 1, 2, 4, dtype=torch.float64)),
    "T = 0": (lambda: torch.randn(0, 2, 3), lambda m: None),
    "B = 0": (lambda: torch.randn(5, 0, 3), lambda m: None),
    "B = 0 with hx": (lambda: torch.randn(5, 0, 3), lambda m: _hx(m, 1, 0, 4)),
}


@pytest.mark.parametrize("case", FORWARD_CASES)
@pytest.mark.parametrize("module", ["GRU", "LSTM", "RNN"])
def test_nn_forward_raises_what_torch_raises(module, case):
    """The drop-ins' forward refuses what torch.nn's refuses, with its exception type, and
    returns what torch.nn's returns where it accepts (batch 0: empty outputs)."""
    make_x, make_hx = FORWARD_CASES[case]
    torch.manual_seed(0)
    ref = getattr(torch.nn, module)(3, 4)
    ours = getattr(pararnn.nn, module)(3, 4)
    ours.load_state_dict(ref.state_dict())
    x, hx = make_x(), make_hx(module)
    try:
        want = ref(x, hx)
    except Exception as e:  # noqa: BLE001 - the type torch raises is the expectation
        with pytest.raises(type(e)):
            ours(x, hx)
        return
    got = ours(x, hx)
    torch.testing.assert_close(got, want)
    assert got[0].requires_grad == want[0].requires_grad


def test_linear_scan_h0_dtype_is_checked_with_and_without_cu_seqlens():
    A, b = torch.rand(1, 6, 4), torch.randn(1, 6, 4)
    h0 = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="h0 must match"):
        pararnn.linear_scan(A, b, h0, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(TypeError, match="h0 must match"):
        pararnn.linear_scan(A[:, :3].expand(2, 3, 4), b[:, :3].expand(2, 3, 4), h0)


def test_padding_is_padding_in_the_default_check():
    """NaN in the padding of a lengths= batch is not an error (the check reads valid steps only);
    NaN at a valid step still is."""
    torch.manual_seed(0)
    rnn, x = pararnn.RNN(ParaGRU(3, 4)), torch.randn(2, 10, 3)
    x[1, 6:] = float("nan")
    y, _ = rnn(x, lengths=torch.tensor([10, 6]))
    assert bool(torch.isfinite(y).all())
    with pytest.raises(ValueError, match="valid step"):
        rnn(x, lengths=torch.tensor([10, 7]))


# ---------------------------------------------------------------- host synchronisations
class _CountSyncs:
    """Counts the tensor-to-host reads (``bool``, ``float``, ``int``, ``item``, ``tolist``) made
    while active: each is a device synchronisation on CUDA (on GPU, torch.cuda.set_sync_debug_mode
    sees the same)."""

    NAMES = ("__bool__", "__float__", "__int__", "item", "tolist")

    def __enter__(self):
        self.count, self.saved = 0, {n: getattr(torch.Tensor, n) for n in self.NAMES}
        for name, real in self.saved.items():
            def counted(t, *a, _real=real, **k):
                self.count += 1
                return _real(t, *a, **k)
            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, real in self.saved.items():
            setattr(torch.Tensor, name, real)


@pytest.mark.parametrize("make, extra", [(lambda: DiagGRU(8, 16), 0), (lambda: ParaGRU(8, 16), 1)])
def test_one_host_synchronisation_per_newton_iteration(make, extra):
    """The convergence decision is the iteration's one read of a device value; a cell with a rounding
    scale adds the correction check's read in the iterations where every sequence passed."""
    from pararnn.solver.newton import newton_solve
    from pararnn.solver.options import SolverOptions

    torch.manual_seed(0)
    cell = make()
    x = torch.randn(4, 300, 8)
    with torch.no_grad():
        u = cell.prepare(x)
        h0 = torch.zeros(4, 16)
        newton_solve(cell, u, h0, SolverOptions())  # warm-up (compiles numba, fills caches)
        with _CountSyncs() as c:
            _, _, info = newton_solve(cell, u, h0, SolverOptions())
    assert info.all_converged and info.iterations >= 2
    assert c.count <= info.iterations + 1 + 2 * extra, (c.count, info.iterations)


def test_inference_mode_with_cells_made_there_and_chunks():
    """Inference tensors carry no version counter: the probe's facts and the chunked solve work
    with a cell whose parameters were created under torch.inference_mode."""
    with torch.inference_mode():
        cell = ParaGRU(3, 4)
        x = torch.randn(2, 30, 3)
        y, _ = pararnn.RNN(cell, chunk_size=8)(x)
        torch.testing.assert_close(y, pararnn.RNN(cell, mode="sequential")(x)[0])


@pytest.mark.parametrize("made_in_inference", [False, True])
def test_autodiff_jacobians_under_inference_mode(made_in_inference):
    """Under torch.inference_mode reverse mode records nothing (a vjp gave J = 0 on every torch) and
    torch 2.11's forward mode gives zero tangents: the Jacobian of a cell written with ``step``
    only, eager and traced for the compiled evaluation, and the probes' jvp, are the ones outside
    it, with the cell's parameters made in or out of inference mode."""
    from pararnn.cell import autodiff_step_and_jacobian
    from pararnn.solver.compile import _trace
    from pararnn.utils.functional import jvp, named_tensors

    torch.manual_seed(0)
    with torch.inference_mode(made_in_inference):
        cell = DiagGRU(3, 5)
        h, u = torch.randn(4, 5), torch.randn(4, 15)
    f_ref, J_ref = autodiff_step_and_jacobian(cell.step, h.clone(), u.clone(), "diagonal")
    step = lambda x: cell.step(x, u)
    jv_ref = torch.func.jvp(step, (h.clone(),), (torch.ones_like(h),))[1]
    gm = _trace(cell, named_tensors(cell), h, u)  # a trace made outside inference mode
    with torch.inference_mode():
        for structure in ("diagonal", "dense"):
            f, J = autodiff_step_and_jacobian(cell.step, h, u, structure)
            torch.testing.assert_close(f, f_ref.detach())
            J_dense = J if structure == "dense" else torch.diag_embed(J)
            torch.testing.assert_close(J_dense, torch.diag_embed(J_ref.detach()))
        torch.testing.assert_close(jvp(step, (h,), (torch.ones_like(h),))[1], jv_ref.detach())
        traced = _trace(cell, named_tensors(cell), h, u)  # traced under inference mode
        values = [t.detach() for t in named_tensors(cell).values()]
        torch.testing.assert_close(traced(values, h, u)[1], gm(values, h, u)[1])
        torch.testing.assert_close(traced(values, h, u)[1], J_ref.detach())


def test_inference_mode_jacobian_takes_reverse_mode_where_it_can(monkeypatch):
    """Reverse mode (a tenth of forward mode's cost per call on CPU) serves under inference mode
    when the cell's tensors were made outside it; a step that reads a tensor made in inference
    mode (reverse mode cannot save it) falls back to forward mode, with the same Jacobian."""
    import pararnn.cell as cell_module

    torch.manual_seed(0)
    cell = DiagGRU(3, 5)
    h, u = torch.randn(4, 5), torch.randn(4, 15)
    J_ref = cell_module.autodiff_step_and_jacobian(cell.step, h, u, "diagonal")[1].detach()
    forward = cell_module._forward_mode
    monkeypatch.setattr(cell_module, "_forward_mode", lambda *a: pytest.fail("forward mode used"))
    with torch.inference_mode():
        torch.testing.assert_close(cell_module.autodiff_step_and_jacobian(cell.step, h, u, "diagonal")[1], J_ref)
        w = torch.full((5,), 0.5)  # an inference tensor, read by a plain function

        def step(hh, uu):
            return torch.tanh(w * hh + uu[:, :5])

        monkeypatch.setattr(cell_module, "_forward_mode", forward)
        J = cell_module.autodiff_step_and_jacobian(step, h, u, "diagonal")[1]
    torch.testing.assert_close(J, 0.5 * (1 - torch.tanh(0.5 * h + u[:, :5]) ** 2))


def test_a_step_only_cell_solved_under_inference_mode_takes_newton_steps():
    """Its Jacobian was zero there (eager, reverse mode): the solve still converged, by
    multiple-shooting sweeps. Now Newton as under no_grad: the same iterations, no sweeps."""
    torch.manual_seed(0)
    cell = DiagGRU(3, 8)
    rnn = pararnn.RNN(cell, mode="parallel", compile_cell=False)
    x = torch.randn(2, 300, 3)
    with torch.no_grad():
        y_ref, _, ref = rnn(x, return_info=True)
    with torch.inference_mode():
        y, _, info = rnn(x, return_info=True)
    assert info.sweeps == ref.sweeps == 0 and info.iterations == ref.iterations
    torch.testing.assert_close(y, y_ref)


@pytest.mark.parametrize("feature", ["default", "chunk_size", "lengths", "compile_cell", "sequential"])
@pytest.mark.parametrize("cell_kind", ["zoo", "user"])
def test_no_grad_contexts_solve_alike(feature, cell_kind):
    """The same solve under no_grad, under inference_mode, and with the cell made under
    inference_mode, solved there or under no_grad (reverse mode cannot save its tensors): the same
    outputs, final state, Newton iterations and sweeps (a context where the Jacobian degrades
    still converges, only by other means: the counts see it)."""
    def run(make_in_inference: bool, context):
        torch.manual_seed(0)
        with torch.inference_mode(make_in_inference):
            cell = ParaGRU(3, 6) if cell_kind == "zoo" else DiagGRU(3, 6)
            x = torch.randn(3, 80, 3)
        kw = {"chunk_size": {"chunk_size": 32}, "compile_cell": {"compile_cell": True},
              "sequential": {"mode": "sequential"}}.get(feature, {})
        rnn = pararnn.RNN(cell, **({"mode": "parallel"} | kw))
        call = {"lengths": torch.tensor([80, 41, 7])} if feature == "lengths" else {}
        with context():
            y, h, info = rnn(x, return_info=True, **call)
        return y, h, info

    y, h, ref = run(False, torch.no_grad)
    for made_there, context in ((False, torch.inference_mode), (True, torch.inference_mode), (True, torch.no_grad)):
        y2, h2, info = run(made_there, context)
        torch.testing.assert_close(y2, y)
        torch.testing.assert_close(h2, h)
        assert (info.iterations, info.sweeps) == (ref.iterations, ref.sweeps)


def test_save_is_safetensors_and_a_legacy_model_pt_still_loads(tmp_path):
    """Weights are model.safetensors (no pickle); a folder saved by pararnn 0.1 (model.pt, no
    checksum) loads too."""
    import json

    from safetensors.torch import load_file

    model = SequenceModel(11, 11, d_model=8, n_layers=1)
    model.save_pretrained(tmp_path / "new")
    assert set(load_file(str(tmp_path / "new" / "model.safetensors"))) == set(model.state_dict())
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    raw = json.loads((tmp_path / "new" / "config.json").read_text())
    raw.pop("weights_sha256")
    (legacy / "config.json").write_text(json.dumps(raw))
    torch.save(model.state_dict(), legacy / "model.pt")
    for folder in ("new", "legacy"):
        loaded = SequenceModel.from_pretrained(tmp_path / folder)
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
