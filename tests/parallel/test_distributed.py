"""Sequence parallelism and data parallelism on torch.distributed (gloo, CPU processes)."""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import pararnn
from pararnn.structure import Block, as_structure
from helpers import rel_err

T_FULL = 11  # divisible by neither 2 nor 3


def _bounds(T, world, rank):
    idx = torch.tensor_split(torch.arange(T), world)[rank]
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _scan_case(rank, world):
    for structure in ("diagonal", Block(2), "dense"):
        for reverse in (False, True):
            st = as_structure(structure, 4)
            g = torch.Generator().manual_seed(7)
            A = 0.7 * torch.randn(2, T_FULL, *st.storage_shape(4), generator=g, dtype=torch.float64)
            b = torch.randn(2, T_FULL, 4, generator=g, dtype=torch.float64)
            h0 = torch.randn(2, 4, generator=g, dtype=torch.float64)
            gy = torch.randn(2, T_FULL, 4, generator=g, dtype=torch.float64)
            full_args = [t.clone().requires_grad_() for t in (A, b, h0)]
            full = pararnn.linear_scan(*full_args, structure=structure, reverse=reverse)
            full_grads = torch.autograd.grad((full * gy).sum(), full_args)
            sl = _bounds(T_FULL, world, rank)
            loc_args = [A[:, sl].clone().requires_grad_(), b[:, sl].clone().requires_grad_(), h0.clone().requires_grad_()]
            out = pararnn.linear_scan(*loc_args, structure=structure, reverse=reverse, process_group=dist.group.WORLD)
            assert rel_err(out, full[:, sl]) < 1e-12, (structure, reverse, rank)
            gA, gb, gh0 = torch.autograd.grad((out * gy[:, sl]).sum(), loc_args)
            assert rel_err(gA, full_grads[0][:, sl]) < 1e-10, (structure, reverse, "A")
            assert rel_err(gb, full_grads[1][:, sl]) < 1e-10, (structure, reverse, "b")
            dist.all_reduce(gh0)
            assert rel_err(gh0, full_grads[2]) < 1e-10, (structure, reverse, "h0")


def _newton_case(rank, world):
    from helpers import BlockTanh, DiagGRU, rel_err

    for make in (lambda: DiagGRU(3, 6), lambda: BlockTanh(3, 6, 2)):
        torch.manual_seed(3)
        cell = make().double()
        x = torch.randn(2, T_FULL * 3, 3, dtype=torch.float64)
        h0 = torch.randn(2, 6, dtype=torch.float64)
        gy = torch.randn(2, T_FULL * 3, 6, dtype=torch.float64)
        xf, h0f = x.clone().requires_grad_(), h0.clone().requires_grad_()
        ref, _ = pararnn.RNN(cell, mode="sequential")(xf, h0f)
        ref_grads = torch.autograd.grad((ref * gy).sum(), [xf, h0f, *cell.parameters()])
        sl = _bounds(T_FULL * 3, world, rank)
        xl, h0l = x[:, sl].clone().requires_grad_(), h0.clone().requires_grad_()
        rnn = pararnn.RNN(cell, process_group=dist.group.WORLD)
        y, _, info = rnn(xl, h0l, return_info=True)
        assert info.all_converged and rel_err(y, ref[:, sl]) < 1e-10, (rank, info.residuals)
        cell.zero_grad()
        (y * gy[:, sl]).sum().backward()
        pararnn.distributed.allreduce_gradients(cell)
        gh0 = h0l.grad if h0l.grad is not None else torch.zeros_like(h0l)  # h0 feeds rank 0 only
        assert (h0l.grad is None) == (rank != 0)
        dist.all_reduce(gh0)
        assert rel_err(xl.grad, ref_grads[0][:, sl]) < 1e-9
        assert rel_err(gh0, ref_grads[1]) < 1e-9
        for p, gr in zip(cell.parameters(), ref_grads[2:]):
            assert rel_err(p.grad, gr) < 1e-9
    # lengths: global, the same on every rank; one sequence ends inside rank 0's chunk
    lengths = torch.tensor([T_FULL * 3, 2])
    ref, ref_h = pararnn.RNN(cell, mode="sequential")(x, h0, lengths=lengths)
    y, hT = pararnn.RNN(cell, process_group=dist.group.WORLD)(x[:, sl], h0, lengths=lengths)
    assert rel_err(y, ref[:, sl]) < 1e-10
    if rank == world - 1:
        assert rel_err(hT, ref_h) < 1e-10


def _chunked_case(rank, world):
    """chunk_size under sequence parallelism: each rank solves its part in chunks, the ranks settle
    the states entering their parts by Newton, and values and gradients equal the single-process
    sequential solve (fp64) for every structure; with lengths too."""
    from helpers import BlockTanh, DenseTanh, DiagGRU, rel_err

    from pararnn.models import DeltaNet

    T = T_FULL * 3  # 33 steps: 17/16 or 11/11/11 per rank, chunks of 4 do not divide them
    for name, make in (("diag", lambda: DiagGRU(3, 6)), ("block", lambda: BlockTanh(3, 6, 2)),
                       ("dense", lambda: DenseTanh(3, 6)), ("deltanet", lambda: DeltaNet(3, 2, 3))):
        torch.manual_seed(3)
        cell = make().double()
        d = cell.state_size
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, T, 3, dtype=torch.float64, generator=g)
        h0 = 0.5 * torch.randn(2, d, dtype=torch.float64, generator=g)
        xf, h0f = x.clone().requires_grad_(), h0.clone().requires_grad_()
        ref, ref_h = pararnn.RNN(cell, mode="sequential")(xf, h0f)
        gy = torch.randn(ref.shape, dtype=torch.float64, generator=g)
        gh = torch.randn(2, d, dtype=torch.float64, generator=g)
        ref_grads = torch.autograd.grad((ref * gy).sum() + (ref_h * gh).sum(), [xf, h0f, *cell.parameters()])
        sl = _bounds(T, world, rank)
        xl, h0l = x[:, sl].clone().requires_grad_(), h0.clone().requires_grad_()
        rnn = pararnn.RNN(cell, process_group=dist.group.WORLD, chunk_size=4)
        y, hT, info = rnn(xl, h0l, return_info=True)
        assert rel_err(y, ref[:, sl]) < 1e-10, (name, rank, info)
        assert 2 <= info.boundary_passes <= world + 1, (name, info.boundary_passes)
        if name == "deltanet":  # linear: one pass from the guesses, one that confirms them
            assert info.boundary_passes == 2, info.boundary_passes
        cell.zero_grad()
        loss = (y * gy[:, sl]).sum() + ((hT * gh).sum() if rank == world - 1 else 0.0)
        loss.backward()
        pararnn.distributed.allreduce_gradients(cell)
        gh0 = h0l.grad if h0l.grad is not None else torch.zeros_like(h0l)  # h0 feeds rank 0 only
        dist.all_reduce(gh0)
        assert rel_err(xl.grad, ref_grads[0][:, sl]) < 1e-9, (name, rank)
        assert rel_err(gh0, ref_grads[1]) < 1e-9, name
        for p, gr in zip(cell.parameters(), ref_grads[2:]):
            assert rel_err(p.grad, gr) < 1e-9, name
        if rank == world - 1:
            assert rel_err(hT, ref_h) < 1e-10
    # a chunk size that covers some ranks' whole part but not others' (2 ranks: 17 and 16 steps)
    for C in (16, "auto"):
        y, hT = pararnn.RNN(cell, process_group=dist.group.WORLD, chunk_size=C)(x[:, sl], h0)
        assert rel_err(y, ref[:, sl]) < 1e-10, C
    # lengths (global, the same on every rank): one sequence ends inside rank 0's part
    lengths = torch.tensor([T, 2])
    ref, ref_h = pararnn.RNN(cell, mode="sequential")(x, h0, lengths=lengths)
    y, hT = pararnn.RNN(cell, process_group=dist.group.WORLD, chunk_size=3)(x[:, sl], h0, lengths=lengths)
    assert rel_err(y, ref[:, sl]) < 1e-10
    if rank == world - 1:
        assert rel_err(hT, ref_h) < 1e-10


def _ddp_case(rank, world):
    from pararnn.models import SequenceModel

    torch.manual_seed(0)
    model = SequenceModel(5, 3, d_model=8, n_layers=1, cell="paragru").double()
    tokens = torch.randint(0, 5, (4 * world, 17), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 3, (4 * world, 17), generator=torch.Generator().manual_seed(2))
    # single-process reference on the global batch
    ref = SequenceModel(5, 3, d_model=8, n_layers=1, cell="paragru").double()
    ref.load_state_dict(model.state_dict())
    loss_ref = torch.nn.functional.cross_entropy(ref(tokens)[0].flatten(0, 1), targets.flatten())
    loss_ref.backward()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    mine = slice(4 * rank, 4 * rank + 4)
    loss = torch.nn.functional.cross_entropy(ddp(tokens[mine])[0].flatten(0, 1), targets[mine].flatten())
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    assert abs(total.item() / world - loss_ref.item()) < 1e-12
    for p, q in zip(model.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-10


def _track_case(rank, world):
    """pararnn track's training under DDP: ranks stay in sync and report the same results."""
    from pararnn_studies import track

    cfg = track.TrackConfig(steps=3, batch=8, eval_lengths=[50], eval_batch=8)
    res = track.train_one("parity", "paragru", 0, cfg)
    got = torch.tensor([res["final_train_loss"], res["eval"]["50"]["acc"]], dtype=torch.float64)
    everyone = [torch.empty_like(got) for _ in range(world)]
    dist.all_gather(everyone, got)
    assert all(torch.equal(e, everyone[0]) for e in everyone), everyone


def _shooting_case(rank, world):
    """A hard cell (ParaGRU, recurrent vectors of std 2) that Newton alone does not settle: every rank
    sweeps its own windows (the first from the state the previous rank hands over), the same rounds
    on every rank, and values and gradients equal the single-process sequential solve."""
    from test_shooting import hard_gru

    cell = hard_gru()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1024, 16, dtype=torch.float64, generator=g)
    xf = x.clone().requires_grad_()
    ref, _ = pararnn.RNN(cell, mode="sequential")(xf)
    ref_g = torch.autograd.grad(ref.sum(), xf)[0]
    sl = _bounds(1024, world, rank)
    xl = x[:, sl].clone().requires_grad_()
    y, _, info = pararnn.RNN(cell, process_group=dist.group.WORLD)(xl, return_info=True)
    assert info.all_converged and info.sweeps > 0 and rel_err(y, ref[:, sl]) < 1e-10, (rank, info.residuals)
    y.sum().backward()
    assert rel_err(xl.grad, ref_g[:, sl]) < 1e-8


def _contexts_case(rank, world):
    """The gradient-context matrix (test_grad_contexts.py) under sequence parallelism: a skip
    connection, the input used twice, in-place ops on the output, gradient hooks on the outputs and
    a second backward, with and without chunk_size, against a plain autograd loop over the whole
    sequence (fp64)."""
    from helpers import DiagGRU, loop

    T = T_FULL * 3
    sl = _bounds(T, world, rank)
    torch.manual_seed(3)
    cell = DiagGRU(4, 4).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, T, 4, dtype=torch.float64, generator=g)
    h0 = 0.5 * torch.randn(2, 4, dtype=torch.float64, generator=g)
    gy = torch.randn(2, T, 4, dtype=torch.float64, generator=g)
    gh = torch.randn(2, 4, dtype=torch.float64, generator=g)

    def graph(y, hT, xs, gys, context, last: bool):
        if context == "skip":
            y = y + xs
        elif context == "inplace":
            y.mul_(1.5)
            y += xs
            torch.relu_(y)
        elif context == "hook":  # each hook scales only its own tensor's gradient
            y.register_hook(lambda g: 2 * g)
            hT.register_hook(lambda g: None if g is None else -g)  # None where hT is not in the loss
        loss = (y * gys).sum() + ((hT * gh).sum() if last else 0.0)
        return loss + (xs.sin().sum() if context == "input_twice" else 0.0)

    for chunk_size in (None, 4):
        for context in ("skip", "input_twice", "inplace", "hook", "retain"):
            xf, h0f = x.clone().requires_grad_(), h0.clone().requires_grad_()
            ref, ref_h = loop(cell, xf, h0f)
            ref_grads = torch.autograd.grad(graph(ref, ref_h, xf, gy, context, True), [xf, h0f, *cell.parameters()])
            xl, h0l = x[:, sl].clone().requires_grad_(), h0.clone().requires_grad_()
            rnn = pararnn.RNN(cell, process_group=dist.group.WORLD, chunk_size=chunk_size)
            y, hT = rnn(xl, h0l)
            loss = graph(y, hT, xl, gy[:, sl], context, rank == world - 1)
            leaves = [xl, h0l, *cell.parameters()]
            rounds = 2 if context == "retain" else 1
            for r in range(rounds):
                grads = torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=r + 1 < rounds)
                grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(leaves, grads)]
                for gr in grads[1:]:  # h0 and the parameters: summed over the ranks
                    dist.all_reduce(gr)
                what = (chunk_size, context, rank)
                assert rel_err(grads[0], ref_grads[0][:, sl]) < 1e-9, what
                for a, b in zip(grads[1:], ref_grads[1:]):
                    assert rel_err(a, b) < 1e-9, what


def _dropout_case(rank, world):
    """A dropout in prepare under sequence parallelism with chunk_size: every pass over the ranks'
    parts draws the same masks (each rank its own chunks', in order, from its own generator), so
    the passes solve one function of the entering states; values and gradients equal a loop over
    the whole sequence with each chunk's mask drawn as its rank drew it (fp64)."""
    from helpers import DiagGRU

    class DropoutGRU(DiagGRU):
        def prepare(self, x):
            return torch.nn.functional.dropout(super().prepare(x), 0.3, self.training)

    torch.manual_seed(0)
    cell = DropoutGRU(3, 4).double().train()
    T = T_FULL * 3
    x = torch.randn(2, T, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bounds = [_bounds(T, world, q) for q in range(world)]
    xr = x.clone().requires_grad_()
    us = []
    for sl in bounds:  # each rank draws from its own generator, seeded alike below, chunk by chunk
        torch.manual_seed(7)
        us += [cell.prepare(x_c) for x_c in xr[:, sl].split(5, dim=1)]
    h, hs = cell.initial_state(2, torch.float64, "cpu"), []
    for t_u in torch.cat(us, 1).unbind(1):
        h = cell.step(h, t_u)
        hs.append(h)
    ref = torch.stack(hs, 1)
    ref_grads = torch.autograd.grad(ref.sin().sum(), [xr, *cell.parameters()])
    torch.manual_seed(7)
    sl = bounds[rank]
    xl = x[:, sl].clone().requires_grad_()
    y, _, info = pararnn.RNN(cell, process_group=dist.group.WORLD, chunk_size=5)(xl, return_info=True)
    assert info.boundary_passes > 1 and rel_err(y, ref[:, sl]) < 1e-10, (rank, info.boundary_passes)
    grads = list(torch.autograd.grad(y.sin().sum(), [xl, *cell.parameters()]))
    for g in grads[1:]:  # the parameters: summed over the ranks
        dist.all_reduce(g)
    assert rel_err(grads[0], ref_grads[0][:, sl]) < 1e-9
    for a, b in zip(grads[1:], ref_grads[1:]):
        assert rel_err(a, b) < 1e-9


CASES = {"contexts": _contexts_case, "dropout": _dropout_case, "shooting": _shooting_case, "scan": _scan_case, "newton": _newton_case, "chunked": _chunked_case, "ddp": _ddp_case,
         "track": _track_case}


def _worker(rank, world, init_file, case):
    import faulthandler

    faulthandler.enable()  # a native abort in a rank prints where it happened
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        CASES[case](rank, world)
        dist.barrier()  # no rank tears gloo down while a peer still has work in flight
    finally:
        dist.destroy_process_group()
    # Every check of the case passed (a failure raised above and is reported by mp.spawn). Leave
    # without C++ static destructors: in about 1 run in 3 from a cold numba cache, a rank aborted
    # *after* passing, at interpreter shutdown ("terminate called without an active exception",
    # no Python frame on the stack). Cause not identified; it is not in the solver's results.
    os._exit(0)


def _spawn(case, world, tmp_path):
    mp.spawn(_worker, args=(world, str(tmp_path / "rendezvous"), case), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_linear_scan(world, tmp_path):
    _spawn("scan", world, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_newton_and_gradients(world, tmp_path):
    _spawn("newton", world, tmp_path)


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_with_chunk_size(world, tmp_path):
    _spawn("chunked", world, tmp_path)


def test_sequence_parallel_shooting_sweeps(tmp_path):
    _spawn("shooting", 2, tmp_path)


def test_sequence_parallel_in_graph_contexts(tmp_path):
    _spawn("contexts", 2, tmp_path)


def test_sequence_parallel_with_a_dropout_in_prepare(tmp_path):
    _spawn("dropout", 2, tmp_path)


def test_ddp_gradients_equal_single_process(tmp_path):
    _spawn("ddp", 2, tmp_path)


def test_track_training_under_ddp(tmp_path):
    _spawn("track", 2, tmp_path)


def test_transfer_matches_dense_product():
    """The chunk summary used by the collective: the product of the chunk's transitions."""
    from pararnn.distributed import transfer

    for structure in ("diagonal", Block(2), Block(2, shared=True), "dense"):
        st = as_structure(structure, 4)
        A = torch.randn(2, 5, *st.storage_shape(4), dtype=torch.float64)
        want = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
        for t in range(5):
            want = st.to_dense(A[:, t], 4) @ want
        got = st.to_dense(transfer(A, st, 4, reverse=False), 4)
        assert rel_err(got, want) < 1e-12, structure


if os.name == "nt":  # pragma: no cover
    pytestmark = pytest.mark.skip("gloo file rendezvous is POSIX-only here")
