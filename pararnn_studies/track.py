"""`pararnn track`: linear vs nonlinear state tracking, trained short and tested long.

Every (task, model, seed) run is checkpointed as one JSON file under ``<out>/runs/``; a rerun
skips finished runs, so an interrupted study loses at most the runs in flight. Runs execute in
``--jobs`` processes with one torch thread each; under ``torchrun --nproc_per_node=N`` every run
is trained data-parallel with DistributedDataParallel instead (gloo on CPU, nccl on GPU). Outputs: ``<out>/summary.json``,
``<out>/table.md`` and ``<out>/plots/<task>.png``. ``--task reconstruct`` runs the reconstruction
experiment of Orvieto et al. instead.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import glob
import json
import multiprocessing
import os
import re
import signal
import statistics
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .common import (ddp_rank_world, ensure_writable, figure, init_distributed_from_env,
                     progress_bar, run_metadata, set_threads, write_json_atomic, write_text)
from .tasks import IGNORE, TASKS

# model name -> (cell name for pararnn.models.make_cell, cell kwargs).
# Suffix _pos: transition eigenvalues in [0, 1]; _neg: in [-1, 1].
MODELS = {
    "diag_pos": ("ssm", {}),
    "diag_neg": ("ssm_neg", {}),
    "lru": ("lru", {"r_min": 0.5}),
    "cdiag": ("cssm", {}),
    **{f"deltaproduct{n}_{rng}": ("deltaproduct", {"n_h": n, "d_k": 8, "allow_neg_eigval": rng == "neg"})
       for n in (1, 2, 4) for rng in ("pos", "neg")},
    "paragru": ("paragru", {}),
    "paralstm": ("paralstm", {}),
    "gru": ("gru", {}),
    "lstm": ("lstm", {}),
}

# The --quick study (3 seeds): the published contrasts, the library's own nonlinear cells trained in
# parallel, recall (MQAR, keep-n-th) and arithmetic.
QUICK_PLAN = {
    "parity": ["diag_pos", "diag_neg", "deltaproduct1_neg", "gru", "paragru", "paralstm"],
    "count_mod3": ["diag_neg", "lru", "cdiag", "deltaproduct1_neg", "deltaproduct2_neg"],
    "s3": ["deltaproduct1_neg", "deltaproduct2_pos", "deltaproduct2_neg", "gru", "paragru", "paralstm"],
    "arith_mod5": ["diag_neg", "deltaproduct1_neg", "paragru"],
    "mqar": ["diag_neg", "deltaproduct1_neg", "paragru", "paralstm"],
    "keep_nth": ["diag_pos", "paragru", "paralstm"],
}


@dataclass
class TrackConfig:
    """Training and evaluation settings of one run (recorded in every result)."""

    d_model: int = 32
    n_layers: int = 1
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    train_min: int = 3
    train_max: int = 40
    eval_lengths: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    eval_batch: int = 512


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def accuracy(pred: torch.Tensor, y: torch.Tensor, chance: float) -> dict:
    """Per-position, last-token and whole-sequence accuracy over the positions that have a target
    (``y != IGNORE``), plus scaled (acc - chance)/(1 - chance). ``pred, y [B, L]``."""
    has = y != IGNORE
    ok = pred == y  # [B, L]
    per_pos = ok[has].float().mean().item()
    last = ok[:, -1][has[:, -1]].float().mean().item()
    return {"acc": per_pos, "last_token_acc": last, "sequence_acc": (ok | ~has).all(1).float().mean().item(),
            "scaled_acc": (per_pos - chance) / (1 - chance), "scaled_last_token_acc": (last - chance) / (1 - chance)}


def train_one(task_name: str, model_name: str, seed: int, cfg: TrackConfig, progress: bool = False) -> dict:
    """Train one model on one task from ``seed``; evaluate at the training length and longer."""
    from pararnn.models import SequenceModel

    torch.manual_seed(seed)
    task = TASKS[task_name]
    cell, kwargs = MODELS[model_name]
    model = SequenceModel(task.n_in, task.n_out, d_model=cfg.d_model, n_layers=cfg.n_layers, cell=cell,
                          mode="parallel", **kwargs)
    rank, world = ddp_rank_world()
    net = model
    if world > 1:  # under torchrun: each rank trains on its share of every batch, DDP averages
        net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(10_000 + seed)  # same on every rank: same lengths
    batch = max(1, cfg.batch // world)
    losses, iters, fallbacks = [], [], 0
    steps = range(cfg.steps)
    if progress:
        steps = progress_bar(steps, desc=f"{task_name}/{model_name}", leave=False)
    t0 = time.perf_counter()
    for _ in steps:
        T = int(torch.randint(cfg.train_min, cfg.train_max + 1, (1,), generator=gen))
        x, y = task.sample(batch * world, T, gen)  # the global batch; this rank takes its share
        x, y = x[rank * batch:(rank + 1) * batch], y[rank * batch:(rank + 1) * batch]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # counted below from each solve's SolverInfo
            logits, _ = net(x)
        fallbacks += sum(int(b.rnn.last_info.fell_back.any()) for b in model.blocks
                         if b.rnn.last_info.fell_back is not None)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if world > 1:  # report the global batch's loss, the same on every rank
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss)
            loss /= world
        losses.append(loss.item())
        iters.extend(b.rnn.last_info.iterations for b in model.blocks)
    train_s = time.perf_counter() - t0
    egen = torch.Generator().manual_seed(20_000 + seed)
    evals = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for L in [cfg.train_max, *cfg.eval_lengths]:
            x, y = task.sample(cfg.eval_batch, L, egen)
            logits, _ = model(x)
            evals[str(L)] = accuracy(logits.argmax(-1), y, task.chance)
    meta = run_metadata(asdict(cfg))
    return {"task": task_name, "model": model_name, "seed": seed, "config": asdict(cfg),
            **{k: meta[k] for k in ("pararnn", "commit", "date", "machine")},
            "final_train_loss": sum(losses[-20:]) / len(losses[-20:]), "train_seconds": train_s,
            "mean_newton_iterations": sum(iters) / max(len(iters), 1), "max_newton_iterations": max(iters, default=0),
            "newton_fallbacks": fallbacks,
            "chance": task.chance, "eval": evals}


def load_checkpoint(path: str) -> dict | None:
    """A finished run's result, or None. A corrupt file is moved aside (``.corrupt``), never reused."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            res = json.load(f)
        if not isinstance(res, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in RESULT_KEYS if k not in res]
        if missing:
            raise ValueError(f"incomplete, missing {missing}")
        if not isinstance(res["eval"], dict) or not all(isinstance(v, dict) and "acc" in v for v in res["eval"].values()):
            raise ValueError("malformed 'eval'")
        return res
    except (OSError, ValueError, TypeError) as e:
        bad = path + ".corrupt"
        os.replace(path, bad)
        print(f"pararnn track: checkpoint {path} is unreadable ({e}); moved to {bad}, rerunning it",
              file=sys.stderr)
        return None


# Every finished run's checkpoint has these; anything less is moved aside and rerun.
RESULT_KEYS = ("task", "model", "seed", "config", "final_train_loss", "train_seconds", "mean_newton_iterations",
               "newton_fallbacks", "chance", "eval")


def _job(args, threads: int | None = 1):
    task, model, seed, cfg, path = args
    set_threads(threads)
    res = train_one(task, model, seed, cfg)
    write_json_atomic(path, res)
    return res


def run_study(plan: dict[str, list[str]], seeds: list[int], cfg: TrackConfig, out: str, jobs: int) -> list[dict]:
    """Run (or resume) every (task, model, seed) in ``plan``; returns all results."""
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    found = finished_runs(out)  # every checkpoint read (and validated) once
    check_same_config(found.values(), cfg, out)
    results, todo = [], []
    for task, models in plan.items():
        for model in models:
            for seed in seeds:
                path = os.path.join(out, "runs", f"{task}__{slug(model)}__seed{seed}.json")
                done = found.get(path)
                if done is not None:
                    results.append(done)
                else:
                    todo.append((task, model, seed, cfg, path))
    if results:
        print(f"pararnn track: {len(results)} finished run(s) found in {out}/runs, skipping them", file=sys.stderr)
    rank, world = ddp_rank_world()
    if todo and world > 1:  # data-parallel: every rank runs every job together; rank 0 writes
        for task, model, seed, cfg_, path in progress_bar(todo, desc="track runs", unit="run", disable=rank != 0):
            res = train_one(task, model, seed, cfg_)
            if rank == 0:
                write_json_atomic(path, res)
            results.append(res)
    elif todo:
        bar = progress_bar(total=len(todo), desc="track runs", unit="run")
        if jobs <= 1:  # one process: torch keeps all its threads
            for job in todo:
                results.append(_job(job, threads=None))
                bar.update()
        else:
            # spawn, not fork: forked children inherit torch's OpenMP pool state and ran 2× slower
            pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_worker_init, initargs=(os.getpid(),))
            try:
                with _ctrl_c_deferred():  # workers start (in submit) with Ctrl-C blocked: the parent handles it
                    futures = [pool.submit(_job, j) for j in todo]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    bar.update()
            except BaseException:  # Ctrl-C (or a failed run): stop the workers now, not after their runs
                _stop_workers(pool)
                raise
            pool.shutdown()
        bar.close()
    return results


@contextlib.contextmanager
def _ctrl_c_deferred():
    """Ctrl-C held back while this block starts worker processes, and raised (KeyboardInterrupt) after it.

    SIGINT is blocked in this thread, so the workers it spawns inherit the blocked mask from birth: a
    Ctrl-C while a worker still imported torch, before its initializer ignores SIGINT, raised
    KeyboardInterrupt in it, with a traceback. A handler that only records the signal covers this
    process's other threads (torch's, tqdm's), through which SIGINT can still arrive: raised in the
    middle of a worker's start, it cut the data the worker was reading (EOFError in the worker).
    Ignoring SIGINT instead dropped a Ctrl-C, and the study ran on."""
    caught = []
    try:
        old_handler = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
    except ValueError:  # not the main thread: signals are not ours to change
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if hasattr(signal, "pthread_sigmask") else None
    try:
        yield
    finally:
        if old_mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)  # a pending Ctrl-C reaches the recorder
        signal.signal(signal.SIGINT, old_handler)
    if caught:
        raise KeyboardInterrupt


def _worker_init(parent_pid: int) -> None:
    """In each worker: leave Ctrl-C to the parent, and exit as soon as the parent is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # also discards a Ctrl-C pending since start-up
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked from birth, see _ctrl_c_deferred

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)  # the parent died (kill -9): nobody will read this worker's result

    threading.Thread(target=watch, daemon=True).start()


# How often a worker checks that its parent is alive: an orphan stops within this time.
PARENT_POLL_S = 0.5


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate the pool's workers (runs in flight are lost; finished ones are on disk)."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.terminate()
    for p in procs:
        p.join(timeout=2)
        if p.is_alive():
            p.kill()


def finished_runs(out: str) -> dict[str, dict]:
    """``{path: result}`` of every valid finished run in ``<out>/runs`` (a bad checkpoint is moved aside)."""
    runs = {p: load_checkpoint(p) for p in sorted(glob.glob(os.path.join(out, "runs", "*.json")))}
    return {p: r for p, r in runs.items() if r is not None}


def check_same_config(runs, cfg: TrackConfig, out: str) -> None:
    """Refuse to mix configurations in one folder: finished runs are never overwritten or mixed."""
    want = asdict(cfg)
    for r in runs:
        if r["config"] != want:
            diff = {k: (r["config"].get(k), v) for k, v in want.items() if r["config"].get(k) != v}
            raise SystemExit(
                f"pararnn track: {out} holds finished runs of another configuration "
                f"(theirs -> this run's: {diff}); choose another --out, or pass the same settings")


@contextlib.contextmanager
def study_lock(out: str, command: str = "track"):
    """Hold ``<out>/.lock`` for the study; a concurrent study on the same folder is refused."""
    os.makedirs(out, exist_ok=True)
    f = open(os.path.join(out, ".lock"), "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"pararnn {command}: another study is running in {out}; wait for it or choose another --out")
        yield
    finally:
        f.close()


def median_mad(values: list[float]) -> tuple[float, float]:
    """Median and median absolute deviation (unscaled) of a list of numbers."""
    med = statistics.median(values)
    return med, statistics.median(abs(v - med) for v in values)


HOLDS = 0.9  # a seed "solves" a length when its last-token accuracy reaches this


def aggregate(rows: list[dict]) -> dict:
    """Per model and length, over the seeds: last-token accuracy (the headline) as median, MAD,
    best and every seed's value; scaled last-token median; per-position median; the seeds that
    reach ``HOLDS``; and Newton iterations per training step (mean over runs, max over runs)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        runs = [r for r in rows if r["model"] == model]
        per_L = {}
        for L in runs[0]["eval"]:
            last = [r["eval"][L]["last_token_acc"] for r in runs]
            med, mad = median_mad(last)
            per_L[L] = {"last_token_median": med, "last_token_mad": mad, "last_token_best": max(last),
                        "last_token_per_seed": last,
                        "scaled_last_token_median": median_mad([r["eval"][L]["scaled_last_token_acc"] for r in runs])[0],
                        "per_position_median": median_mad([r["eval"][L]["acc"] for r in runs])[0],
                        "seeds_solving": sum(v >= HOLDS for v in last)}
        out[model] = {"seeds": [r["seed"] for r in runs], "eval": per_L,
                      "newton_iterations_mean": sum(r["mean_newton_iterations"] for r in runs) / len(runs),
                      "newton_iterations_max": max(r.get("max_newton_iterations", r["mean_newton_iterations"])
                                                   for r in runs)}
    return out


def summarize(results: list[dict], out: str) -> str:
    """Write summary.json, table.md and one accuracy-vs-length plot per task; return the table.

    ``results`` are every finished run of the folder (see :func:`finished_runs`), not only this
    invocation's, so a subset rerun never shrinks the summary. Per task: the headline table (last-
    token accuracy, median ± MAD over seeds, best of the seeds, and how many seeds reach 0.9),
    scaled and per-position medians beside, and every seed's own row; then published figures
    beside ours (:data:`PUBLISHED`).
    """
    results = sorted(results, key=lambda r: (r["task"], r["model"], r["seed"]))
    summary = {task: aggregate([r for r in results if r["task"] == task]) for task in dict.fromkeys(r["task"] for r in results)}
    write_json_atomic(os.path.join(out, "summary.json"), {**run_metadata(results[0]["config"] if results else {}),
                                                          "aggregate": summary, "runs": results})
    lines = []
    for task, agg in summary.items():
        rows = [r for r in results if r["task"] == task]
        lengths = list(rows[0]["eval"])
        n_seeds = max(len(a["seeds"]) for a in agg.values())
        cfg = rows[0]["config"]
        lines += [f"**{task}** ({TASKS[task].description}; chance {rows[0]['chance']:.2f}; trained on lengths "
                  f"{cfg['train_min']}-{cfg['train_max']}; {n_seeds} seed(s); {cfg['eval_batch']} sequences per "
                  f"length). Last-token accuracy, median ± MAD over seeds (best), and [seeds reaching {HOLDS}]:", "",
                  "| model | " + " | ".join(f"L={L}" for L in lengths) + " | Newton iters per step (mean, max) |",
                  "|---|" + "---|" * len(lengths) + "---|"]
        for model, a in agg.items():
            cells = [f"{e['last_token_median']:.2f} ± {e['last_token_mad']:.2f} ({e['last_token_best']:.2f}) "
                     f"[{e['seeds_solving']}/{len(a['seeds'])}]" for e in a["eval"].values()]
            lines.append(f"| {model} | " + " | ".join(cells) +
                         f" | {a['newton_iterations_mean']:.1f}, {a['newton_iterations_max']} |")
        lines += ["", "Scaled last-token accuracy (median) / per-position accuracy (median):", "",
                  "| model | " + " | ".join(f"L={L}" for L in lengths) + " |", "|---|" + "---|" * len(lengths)]
        for model, a in agg.items():
            lines.append(f"| {model} | " + " | ".join(f"{e['scaled_last_token_median']:.2f} / {e['per_position_median']:.2f}"
                                                    for e in a["eval"].values()) + " |")
        lines += ["", "Every seed, last-token accuracy:", "",
                  "| model | seed | " + " | ".join(f"L={L}" for L in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
        for r in rows:
            lines.append(f"| {r['model']} | {r['seed']} | " +
                         " | ".join(f"{r['eval'][L]['last_token_acc']:.2f}" for L in lengths) + " |")
        lines.append("")
        _plot_task(task, agg, rows[0], os.path.join(out, "plots", f"{task}.png"))
    lines += published_table(summary)
    table = "\n".join(lines)
    write_text(os.path.join(out, "table.md"), table)
    return table


# Published figures beside ours: (source, their model, their task, their figure, our model, our
# task, how ours is read). Grazzi et al. report the best of 3 runs' scaled accuracy over lengths
# 40-256; ParaRNN Table 1 the best of 3 runs' accuracy (%) at L = 100 with one layer.
PUBLISHED = [
    ("Grazzi et al. Table 3", "Mamba [0,1]", "parity", 0.000, "diag_pos", "parity", "grazzi"),
    ("Grazzi et al. Table 3", "Mamba [-1,1]", "parity", 1.000, "diag_neg", "parity", "grazzi"),
    ("Grazzi et al. Table 3", "DeltaNet [0,1]", "parity", 0.017, "deltaproduct1_pos", "parity", "grazzi"),
    ("Grazzi et al. Table 3", "DeltaNet [-1,1]", "parity", 1.000, "deltaproduct1_neg", "parity", "grazzi"),
    ("Grazzi et al. Table 3", "sLSTM", "parity", 1.000, "lstm", "parity", "grazzi"),
    ("Grazzi et al. Table 3", "Mamba [0,1]", "mod arithmetic, no brackets", 0.095, "diag_pos", "arith_mod5", "grazzi"),
    ("Grazzi et al. Table 3", "Mamba [-1,1]", "mod arithmetic, no brackets", 0.241, "diag_neg", "arith_mod5", "grazzi"),
    ("Grazzi et al. Table 3", "DeltaNet [0,1]", "mod arithmetic, no brackets", 0.314, "deltaproduct1_pos", "arith_mod5",
     "grazzi"),
    ("Grazzi et al. Table 3", "DeltaNet [-1,1]", "mod arithmetic, no brackets", 0.971, "deltaproduct1_neg", "arith_mod5",
     "grazzi"),
    ("Grazzi et al. Table 3", "sLSTM", "mod arithmetic, no brackets", 0.787, "lstm", "arith_mod5", "grazzi"),
    ("ParaRNN Table 1", "ParaGRU", "parity", 100, "paragru", "parity", "pararnn"),
    ("ParaRNN Table 1", "ParaLSTM", "parity", 100, "paralstm", "parity", "pararnn"),
    ("ParaRNN Table 1", "ParaGRU", "MQAR", 100, "paragru", "mqar", "pararnn"),
    ("ParaRNN Table 1", "ParaLSTM", "MQAR", 100, "paralstm", "mqar", "pararnn"),
    ("ParaRNN Table 1", "ParaGRU", "keep-n-th", 100, "paragru", "keep_nth", "pararnn"),
    ("ParaRNN Table 1", "ParaLSTM", "keep-n-th", 100, "paralstm", "keep_nth", "pararnn"),
    ("ParaRNN Table 1", "Mamba2", "parity", 51, "diag_pos", "parity", "pararnn"),
]


def published_table(summary: dict) -> list[str]:
    """Markdown lines: every :data:`PUBLISHED` figure beside ours, read the same way where we ran
    the model on the task ("not run" otherwise). Grazzi-style: the best seed's scaled last-token
    accuracy averaged over our lengths from the longest training length to 256 (and the median
    seed's). ParaRNN-style: the best seed's last-token accuracy (%) at our length nearest 100."""
    lines = ["**Published figures beside ours** (our settings are smaller: 1 layer, d_model 32, 600 steps, "
             "trained on lengths 3-40; Grazzi et al. train 2-layer models longer, ParaRNN trains and tests at "
             "L = 100):", "", "| source | model | task | published | ours: model, task | ours |", "|---|---|---|---|---|---|"]
    for source, their_model, their_task, fig, model, task, kind in PUBLISHED:
        agg = summary.get(task, {}).get(model)
        ours = "not run"
        if agg is not None:
            ev = agg["eval"]
            Ls = [int(L) for L in ev]
            if kind == "grazzi":
                lo = min(Ls)  # the longest training length is always evaluated first
                use = [str(L) for L in Ls if lo <= L <= 256]
                best = max(sum(ev[L]["last_token_per_seed"][i] for L in use) / len(use)
                           for i in range(len(agg["seeds"])))
                chance = 1.0 / TASKS[task].n_out
                ours = (f"best {(best - chance) / (1 - chance):.3f}, median "
                        f"{sum(ev[L]['scaled_last_token_median'] for L in use) / len(use):.3f} (L {lo}-{max(map(int, use))})")
            else:
                L = str(min(Ls, key=lambda v: abs(v - 100)))
                ours = f"best {100 * ev[L]['last_token_best']:.0f}, median {100 * ev[L]['last_token_median']:.0f} (L = {L})"
        lines.append(f"| {source} | {their_model} | {their_task} | {fig} | {model}, {task} | {ours} |")
    return lines + [""]


MARKERS = "osD^v<>ph*X"


def _plot_task(task, agg: dict, first: dict, path):
    """Last-token accuracy against length: per model the median over seeds, with the MAD as an
    error bar. Lines that coincide (many sit at 1.0) stay visible: each model has its own marker and
    a small horizontal offset (a factor 2^±0.1 at most on the log axis), and every evaluated
    length gets a tick."""
    with figure(path, figsize=(5.5, 3.6)) as ax:
        all_Ls = sorted({int(L) for a in agg.values() for L in a["eval"]})
        n = len(agg)
        for i, (model, a) in enumerate(agg.items()):
            Ls = [int(L) for L in a["eval"]]
            shift = 2 ** (0.2 * (i / max(1, n - 1) - 0.5)) if n > 1 else 1.0
            med = [a["eval"][str(L)]["last_token_median"] for L in Ls]
            mad = [a["eval"][str(L)]["last_token_mad"] for L in Ls]
            ax.errorbar([L * shift for L in Ls], med, yerr=mad, marker=MARKERS[i % len(MARKERS)], ms=4, lw=1,
                        capsize=2, alpha=0.85, label=f"{model} ({len(a['seeds'])} seeds)")
        ax.axhline(first["chance"], color="gray", ls=":", label="chance")
        ax.axvline(first["config"]["train_max"], color="gray", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_Ls, [str(L) for L in all_Ls])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("sequence length (dashed: longest training length)")
        ax.set_ylabel("last-token accuracy (median, MAD)")
        ax.set_title(f"{task}: trained short, tested long")


# ---------------------------------------------------------------- reconstruction (Orvieto et al.)
def reconstruct(Ns, lags, T=512, n_train=64, n_test=32, seed=0, r_min=0.5, r_max=0.999,
                decoder="linear", mlp_steps=300, ridge=1e-6) -> list[dict]:
    """A fixed linear diagonal RNN encodes i.i.d. N(0,1) inputs; a decoder reads x_{t-k} from h_t.

    Eigenvalues: real, uniform in [r_min, r_max]; or complex, |λ| uniform on that ring (by area)
    with phases uniform in [0, 2π) (LRU ring init). Inputs are scaled by sqrt(1-|λ|²). Returns
    the normalised test MSE (MSE / Var x) per (eigenvalues, N, k); the linear decoder is fit by
    ridge regression (``ridge`` × the mean feature energy), the MLP by Adam.
    """
    from pararnn.scan import linear_scan

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, T, generator=g, dtype=torch.float64)
    rows = []
    for kind in ("real", "complex"):
        for N in Ns:
            r = torch.sqrt(torch.rand(N, generator=g, dtype=torch.float64) * (r_max**2 - r_min**2) + r_min**2)
            if kind == "real":
                lam = r.to(torch.complex128)
            else:
                lam = torch.polar(r, 2 * torch.pi * torch.rand(N, generator=g, dtype=torch.float64))
            gamma = torch.sqrt(1 - lam.abs() ** 2)
            A = lam.expand(x.shape[0], T, N).contiguous()
            b = (gamma * x.unsqueeze(-1)).to(torch.complex128)
            h = linear_scan(A, b)  # [n, T, N]
            feats = torch.cat([h.real, h.imag], -1) if kind == "complex" else h.real
            for k in lags:
                Xf = feats[:, k:].reshape(x.shape[0], -1, feats.shape[-1])  # h_t for t >= k
                Y = x[:, : T - k]  # x_{t-k}
                tr, te = slice(0, n_train), slice(n_train, None)
                Xtr, Ytr = Xf[tr].reshape(-1, Xf.shape[-1]), Y[tr].reshape(-1, 1)
                Xte, Yte = Xf[te].reshape(-1, Xf.shape[-1]), Y[te].reshape(-1, 1)
                if decoder == "linear":  # ridge: the features of nearby eigenvalues are collinear
                    G = Xtr.T @ Xtr
                    G.diagonal().add_(ridge * G.diagonal().mean())
                    pred = Xte @ torch.linalg.solve(G, Xtr.T @ Ytr)
                else:
                    pred = _fit_mlp(Xtr.float(), Ytr.float(), Xte.float(), mlp_steps, seed).double()
                nmse = ((pred - Yte) ** 2).mean().item() / Yte.var().item()
                rows.append({"eigenvalues": kind, "N": N, "lag": k, "decoder": decoder, "nmse": nmse})
    return rows


def _fit_mlp(Xtr, Ytr, Xte, steps, seed):
    torch.manual_seed(seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(Xtr.shape[1], 128), torch.nn.GELU(), torch.nn.Linear(128, 1))
    opt = torch.optim.Adam(mlp.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, Xtr.shape[0], (1024,))
        loss = F.mse_loss(mlp(Xtr[idx]), Ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return mlp(Xte)


def _reconstruct_outputs(rows, out, settings):
    write_json_atomic(os.path.join(out, "reconstruct.json"), {**run_metadata(settings), "rows": rows})
    lags = sorted({r["lag"] for r in rows})
    lines = ["Normalised MSE of reading x_{t-k} back from h_t (0 = perfect, 1 = no information):", "",
             "| eigenvalues | N | " + " | ".join(f"k={k}" for k in lags) + " |", "|---|---|" + "---|" * len(lags)]
    for kind in ("real", "complex"):
        for N in sorted({r["N"] for r in rows}):
            vals = {r["lag"]: r["nmse"] for r in rows if r["eigenvalues"] == kind and r["N"] == N}
            lines.append(f"| {kind} | {N} | " + " | ".join(f"{vals[k]:.3f}" for k in lags) + " |")
    with figure(os.path.join(out, "plots", "reconstruct.png"), figsize=(5.5, 3.6)) as ax:
        for kind, ls in (("real", "--"), ("complex", "-")):
            for N in sorted({r["N"] for r in rows}):
                pts = sorted((r["lag"], r["nmse"]) for r in rows if r["eigenvalues"] == kind and r["N"] == N)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", label=f"{kind}, N={N}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lag k")
        ax.set_ylabel("normalised MSE")
        ax.set_title("reconstruction from a linear diagonal RNN")
    table = "\n".join(lines)
    write_text(os.path.join(out, "reconstruct.md"), table)
    return table


# ---------------------------------------------------------------- CLI
def _names(value: str | None, known, what: str, command: str = "track") -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SystemExit(f"pararnn {command}: unknown {what} {bad or value!r}; choose from {', '.join(known)}")
    return names


def run(args: argparse.Namespace) -> list[dict]:
    if args.seeds < 1 or args.jobs < 1 or (args.steps is not None and args.steps < 1):
        raise SystemExit("pararnn track: --seeds, --jobs and --steps must be >= 1")
    if args.tasks == "reconstruct":
        ensure_writable(args.out, "--out", folder=True)
        Ns, lags, T = ([16, 64], [1, 16, 64], 256) if args.quick else ([16, 64, 256], [1, 4, 16, 64, 256], 1024)
        rows = reconstruct(Ns, lags, T=T, decoder=args.decoder)
        settings = {"Ns": Ns, "lags": lags, "T": T, "decoder": args.decoder}
        print(_reconstruct_outputs(rows, args.out, settings))
        return rows
    tasks = _names(args.tasks, list(TASKS), "task(s)")
    models = _names(args.models, list(MODELS), "model(s)")
    cfg = TrackConfig()
    if args.quick:
        cfg.eval_lengths = [64, 128, 256]
        plan = {t: QUICK_PLAN.get(t, list(QUICK_PLAN["parity"])) for t in (tasks or QUICK_PLAN)}
    else:
        plan = {t: list(MODELS) for t in (tasks or TASKS)}
    if models:
        plan = {t: models for t in plan}
    if args.steps is not None:
        cfg.steps = args.steps
    if args.eval_lengths:
        try:
            cfg.eval_lengths = [int(v) for v in args.eval_lengths.split(",")]
        except ValueError:
            raise SystemExit(f"pararnn track: --eval-lengths must be integers, got {args.eval_lengths!r}")
    ensure_writable(args.out, "--out", folder=True)
    if init_distributed_from_env():
        rank, world = ddp_rank_world()
        print(f"pararnn track: data-parallel on {world} processes (rank {rank})", file=sys.stderr)
    if ddp_rank_world()[0] != 0:
        return run_study(plan, list(range(args.seeds)), cfg, args.out, args.jobs)
    with study_lock(args.out):
        results = run_study(plan, list(range(args.seeds)), cfg, args.out, args.jobs)
        print(summarize(list(finished_runs(args.out).values()), args.out))
    plots = f", plots in {args.out}/plots/" if os.path.isdir(os.path.join(args.out, "plots")) else ""
    print(f"results: {args.out}/summary.json, {args.out}/table.md{plots}")
    return results
