"""pararnn against a Newton (DEER) solver written in JAX and jitted by XLA, same cell, same weights.

The JAX side is our own code: ParaGRU's step, its diagonal Jacobian by ``jax.jvp`` (one ones
tangent), a ``jax.lax.while_loop`` of Newton steps whose linear recurrence is
``jax.lax.associative_scan``, stopping when max|r| over the batch is at most 1e-6 (pararnn's
test is per entry and relative, see ``SolverOptions``; the step counts are reported), and a
``jax.custom_vjp`` whose backward is one reverse associative scan (the adjoint) and a vjp of the
step at the solution, as pararnn's. Both sides run in one process, interleaved (medians of
per-call means over turns of about ``TURN_S`` seconds, each method warmed up with and without
gradients first, see :func:`pararnn.utils.timing.interleaved_medians`), pinned to the same cores:
``os.sched_setaffinity`` restricts the process to --threads cores, torch and numba get
--threads threads, and XLA runs with ``--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=N`` (XLA_FLAGS, set before jax is imported), so neither side can
use more cores than the other. Skips cleanly (exit 0, a message) when jax is not installed.

Usage: python benchmarks/bench_jax.py [--threads 1] [--repeats 5] [--compile-cell] [--out results/bench_jax_1thread.json]
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

SHAPES = [(1, 16384, 64), (1, 4096, 64), (8, 4096, 256), (8, 1024, 256)]  # (B, T, d)
TURN_S = 0.1  # each method's turn in a round repeats it for about this long (at least once)


def jax_solver(jax, jnp, n_iters_max: int, tol: float):
    """``solve(params, x) -> y [B, T, d]``: jitted Newton with an adjoint backward."""

    def prepare(params, x):
        return x @ params["W"].T + params["b"]  # [B, T, 3d]

    def step(a, h, u):
        uz, ur, uc = jnp.split(u, 3, axis=-1)
        z = jax.nn.sigmoid(uz + a[0] * h)
        r = jax.nn.sigmoid(ur + a[1] * h)
        c = jnp.tanh(uc + a[2] * (r * h))
        return h + z * (c - h)

    def combine(left, right):  # (A, b) pairs: h -> A h + b, left first
        return right[0] * left[0], right[0] * left[1] + right[1]

    def scan(A, b, reverse=False):
        return jax.lax.associative_scan(combine, (A, b), axis=1, reverse=reverse)[1]

    def f_and_J(a, H, u):
        prev = jnp.concatenate([jnp.zeros_like(H[:, :1]), H[:, :-1]], axis=1)
        return jax.jvp(lambda hp: step(a, hp, u), (prev,), (jnp.ones_like(prev),))

    def newton(a, u):
        H0 = step(a, jnp.zeros_like(u[..., : u.shape[-1] // 3]), u)  # h_t = f(0, u_t)

        def cond(c):
            it, _, err = c
            return (it < n_iters_max) & (err > tol)

        def body(c):
            it, H, _ = c
            f, J = f_and_J(a, H, u)
            r = f - H
            H = H + scan(J, r)
            return it + 1, H, jnp.max(jnp.abs(r))

        it, H, _ = jax.lax.while_loop(cond, body, (0, H0, jnp.inf))
        return H, it

    @jax.custom_vjp
    def solve_states(a, u):
        return newton(a, u)[0]

    def fwd(a, u):
        H = newton(a, u)[0]
        return H, (a, u, H)

    def bwd(res, g):
        a, u, H = res
        prev = jnp.concatenate([jnp.zeros_like(H[:, :1]), H[:, :-1]], axis=1)
        _, J = f_and_J(a, H, u)
        Jn = jnp.concatenate([J[:, 1:], jnp.zeros_like(J[:, :1])], axis=1)  # J_{t+1}
        lam = scan(Jn, g, reverse=True)  # λ_t = g_t + J_{t+1} λ_{t+1}
        _, vjp = jax.vjp(lambda aa, hp, uu: step(aa, hp, uu), a, prev, u)
        ga, _, gu = vjp(lam)
        return ga, gu

    solve_states.defvjp(fwd, bwd)

    def model(params, x):
        return solve_states(params["a"], prepare(params, x))

    return jax.jit(model), jax.jit(lambda p, x: newton(p["a"], prepare(p, x))[1]), \
        jax.jit(jax.grad(lambda p, x: model(p, x).sum()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile-cell", action="store_true", help="also time pararnn's eager twin (compile_cell=False)")
    ap.add_argument("--out", default=None, help="default results/bench_jax_{N}thread(s).json")
    args = ap.parse_args(argv)
    n = args.threads
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:n])
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={n}").strip()
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        print("bench_jax: jax is not installed (pip install jax); skipped")
        return 0
    jax.config.update("jax_enable_x64", False)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import numpy as np
    import torch

    import pararnn
    from pararnn.models import ParaGRU
    from pararnn_studies.common import (
        ensure_writable,
        progress_bar,
        markdown_table,
        run_metadata,
        set_threads,
        write_json_atomic,
        write_text,
    )
    from pararnn.utils.timing import interleaved_medians

    out = args.out or f"results/bench_jax_{n}thread{'s' if n > 1 else ''}.json"
    ensure_writable(out, "--out")
    set_threads(n)
    rows = []
    for B, T, d in progress_bar(SHAPES, desc="jax vs pararnn", unit="shape"):
        torch.manual_seed(0)
        cell = ParaGRU(d, d)
        x = torch.randn(B, T, d)
        ps = list(cell.parameters())
        rnns = {"pararnn": pararnn.RNN(cell, mode="parallel")}  # the default (compile_cell="auto")
        if args.compile_cell:
            rnns["pararnn_eager"] = pararnn.RNN(cell, mode="parallel", compile_cell=False)
        params = {"W": jnp.asarray(cell.proj.weight.detach().numpy()), "b": jnp.asarray(cell.proj.bias.detach().numpy()),
                  "a": jnp.asarray(cell.a.detach().numpy())}
        xj = jnp.asarray(x.numpy())
        with torch.no_grad():
            y_ref = rnns["pararnn"](x)[0]
        iters = rnns["pararnn"].last_info.iterations
        tol = 1e-6  # max|r| over the batch, fp32
        fwd, n_iters, grad = jax_solver(jax, jnp, 64, tol)
        yj = np.asarray(fwd(params, xj).block_until_ready())
        jax_iters = int(n_iters(params, xj))
        grad(params, xj)["a"].block_until_ready()  # compile once, outside the timings
        gj = np.asarray(grad(params, xj)["a"])
        gt = torch.autograd.grad(rnns["pararnn"](x)[0].sum(), [cell.a])[0].numpy()
        for r in rnns.values():  # compile / warm up outside the timings, with and without grad
            torch.autograd.grad(r(x)[0].sum(), ps)
            _nograd(r, x)
        methods = {"jax_fwd": functools.partial(_block, fwd, params, xj),
                   "jax_fwdbwd": functools.partial(_block, grad, params, xj)}
        for name, r in rnns.items():
            methods[f"{name}_fwd"] = functools.partial(_nograd, r, x)
            methods[f"{name}_fwdbwd"] = functools.partial(_fwdbwd, r, x, ps)
        t = interleaved_medians(methods, args.repeats, min_turn_s=TURN_S)
        row = {"B": B, "T": T, "d": d, "pararnn_iterations": iters, "jax_iterations": jax_iters,
               "max_abs_diff_y": float(np.abs(yj - y_ref.numpy()).max()),
               "grad_a_rel_diff": float(np.abs(gj - gt).max() / np.abs(gt).max()), **{f"{k}_s": v for k, v in t.items()}}
        rows.append(row)
        write_json_atomic(out, {**run_metadata({**vars(args), "shapes": SHAPES, "jax": jax.__version__,
                                                "XLA_FLAGS": os.environ["XLA_FLAGS"], "turn_s": TURN_S}),
                                "rows": rows})  # each shape kept as it ends
    names = ["pararnn"] + (["pararnn_eager"] if args.compile_cell else [])
    header = ["B", "T", "d", "Newton steps pararnn / JAX", "JAX fwd / fwd+bwd (ms)"]
    header += [f"{m} fwd / fwd+bwd (ms)" for m in names] + [f"JAX time / {m} time, fwd / fwd+bwd" for m in names]
    md = markdown_table(header, [
        [r["B"], r["T"], r["d"], f"{r['pararnn_iterations']} / {r['jax_iterations']}",
         f"{r['jax_fwd_s'] * 1e3:.0f} / {r['jax_fwdbwd_s'] * 1e3:.0f}",
         *[f"{r[f'{m}_fwd_s'] * 1e3:.0f} / {r[f'{m}_fwdbwd_s'] * 1e3:.0f}" for m in names],
         *[f"{r['jax_fwd_s'] / r[f'{m}_fwd_s']:.2f}× / {r['jax_fwdbwd_s'] / r[f'{m}_fwdbwd_s']:.2f}×" for m in names]]
        for r in rows])
    write_text(os.path.splitext(out)[0] + ".md", md)
    print(md)
    print(f"results: {out}")
    return 0


def _nograd(r, x):
    import torch

    with torch.no_grad():
        return r(x)[0]


def _fwdbwd(r, x, ps):
    import torch

    return torch.autograd.grad(r(x)[0].sum(), ps)


def _block(fn, params, x):
    import jax

    return jax.block_until_ready(fn(params, x))


if __name__ == "__main__":
    sys.exit(main())
