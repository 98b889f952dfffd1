"""`pararnn lm`: character-level language modelling on the Python standard library's own source.

The corpus exists on every machine without a download: the files :data:`CORPUS_FILES` of
``sysconfig.get_paths()["stdlib"]``, read as UTF-8 bytes (vocabulary 256) in that order and
concatenated; the first 90 % train, the last 10 % validate. It follows the Python version, which
every result records. Models of about equal parameter count (each one's width is chosen for it):
ParaGRU, ParaLSTM and the dense GRU trained with the parallel solver, a selective SSM with
eigenvalues in [-1, 1], DeltaNet, and a causal Transformer built from
``torch.nn.TransformerEncoderLayer``. Each finished model is checkpointed as one JSON file under
``<out>/runs/``; a rerun skips finished models. Outputs: ``<out>/summary.json``, ``<out>/table.md``,
``<out>/plots/loss.png`` and ``<out>/plots/newton.png`` (Newton steps per training step).
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import sys
import sysconfig
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import (
    ensure_writable,
    figure,
    progress_bar,
    run_metadata,
    set_threads,
    write_json_atomic,
    write_text,
)

# A fixed list of pure-Python modules present in every CPython since 3.8 (missing ones are skipped
# and recorded). Order matters: it fixes the split.
CORPUS_FILES = ("abc.py", "argparse.py", "ast.py", "bisect.py", "calendar.py", "contextlib.py", "copy.py", "csv.py",
                "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py", "inspect.py",
                "operator.py", "queue.py", "random.py", "shlex.py", "string.py", "textwrap.py", "threading.py",
                "tokenize.py", "typing.py", "weakref.py")
VAL_FRACTION = 0.1

# model name -> (cell name for pararnn.models.make_cell, cell kwargs); "transformer" is built apart
MODELS = {
    "paragru": ("paragru", {}),
    "paralstm": ("paralstm", {}),
    "gru": ("gru", {}),
    "ssm_neg": ("ssm_neg", {}),
    "deltanet": ("deltanet", {"d_k": 16, "allow_neg_eigval": True}),
    "transformer": None,
}
NONLINEAR = ("paragru", "paralstm", "gru")  # timed against their sequential training too
# The dense GRU's Newton steps evaluate d×d Jacobians; compile_cell fuses that evaluation (one pass
# per piece instead of a dozen).
SOLVER_OPTIONS = {"gru": {"compile_cell": True}}
QUICK_MODELS = ("paragru", "paralstm", "gru", "ssm_neg", "deltanet", "transformer")


@dataclass
class LMConfig:
    """Settings of one study (recorded in every result). The defaults are the ``--quick`` preset."""

    params: int = 1_000_000  # target parameter count per model
    n_layers: int = 2
    seq_len: int = 128
    batch: int = 16
    steps: int = 300
    lr: float = 3e-3
    eval_windows: int = 64
    timing_steps: int = 3  # training steps timed in each mode (parallel vs sequential)
    sample_tokens: int = 160
    seed: int = 0


def load_corpus() -> tuple[torch.Tensor, dict]:
    """The corpus as bytes ``[N]`` (uint8 -> long) and its description."""
    root = sysconfig.get_paths()["stdlib"]
    parts, used, missing = [], [], []
    for name in CORPUS_FILES:
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                parts.append(f.read())
            used.append(name)
        else:
            missing.append(name)
    data = b"\n".join(parts)
    info = {"python": platform.python_version(), "stdlib": root, "files": used, "missing": missing,
            "bytes": len(data), "val_fraction": VAL_FRACTION}
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), info


class TransformerLM(nn.Module):
    """Embedding + learned positions, ``n_layers`` pre-norm ``nn.TransformerEncoderLayer`` with a
    causal mask, a final norm and a head. ``x [B, T]`` -> ``(logits [B, T, V], None)``."""

    def __init__(self, vocab: int, d_model: int, n_layers: int, max_len: int, n_heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.zeros(max_len, d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        self.max_len = max_len

    def forward(self, x, mode=None):
        T = x.shape[1]
        h = self.embed(x) + self.pos[:T]
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=x.device)
        return self.head(self.norm(self.encoder(h, mask=mask, is_causal=True))), None

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """As :meth:`pararnn.models.SequenceModel.generate`, over the last ``max_len`` tokens."""
        from pararnn.models.layers import _sample

        out = prompt
        for _ in range(max_new_tokens):
            logits, _ = self(out[:, -self.max_len:])
            out = torch.cat([out, _sample(logits[:, -1], temperature, top_k, generator)[:, None]], 1)
        return out


def build(name: str, d_model: int, cfg: LMConfig) -> nn.Module:
    from pararnn.models import SequenceModel

    if name == "transformer":
        return TransformerLM(256, d_model, cfg.n_layers, cfg.seq_len)
    cell, kwargs = MODELS[name]
    return SequenceModel(256, 256, d_model=d_model, n_layers=cfg.n_layers, cell=cell, mode="parallel",
                         solver_options=SOLVER_OPTIONS.get(name), **kwargs)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def width_for(name: str, cfg: LMConfig) -> int:
    """The width (a multiple of 8 in 16..1024) whose model's parameter count is closest to
    ``cfg.params``: a bisection, the count growing with the width (a handful of models built, not
    127)."""
    def size(d):
        return n_params(build(name, d, cfg))

    lo, hi = 2, 128  # width = 8 · index
    while lo < hi:  # the first index whose model reaches the target (hi if none does)
        mid = (lo + hi) // 2
        if size(8 * mid) >= cfg.params:
            hi = mid
        else:
            lo = mid + 1
    return min({8 * max(lo - 1, 2), 8 * lo}, key=lambda d: (abs(size(d) - cfg.params), d))


def batches(data: torch.Tensor, cfg: LMConfig, gen: torch.Generator):
    """Random training windows: ``(x, y) [B, T]`` with y = x shifted by one."""
    while True:
        i = torch.randint(0, len(data) - cfg.seq_len - 1, (cfg.batch,), generator=gen)
        idx = i[:, None] + torch.arange(cfg.seq_len + 1)
        w = data[idx]
        yield w[:, :-1], w[:, 1:]


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: torch.Tensor, cfg: LMConfig) -> float:
    """Validation loss in bits per byte over ``cfg.eval_windows`` evenly spaced windows."""
    starts = torch.linspace(0, len(data) - cfg.seq_len - 2, cfg.eval_windows).long()
    idx = starts[:, None] + torch.arange(cfg.seq_len + 1)
    w = data[idx]
    total = 0.0
    for xb, yb in zip(w[:, :-1].split(16), w[:, 1:].split(16)):
        logits, _ = model(xb)
        total += F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="sum").item()
    return total / (w.shape[0] * cfg.seq_len) / math.log(2)


def newton_steps(model: nn.Module) -> int:
    """The most Newton steps any layer took in the last forward (0 for the Transformer)."""
    blocks = getattr(model, "blocks", [])
    return max((b.rnn.last_info.iterations for b in blocks if b.rnn.last_info is not None), default=0)


def train_step(model, opt, sched, x, y, mode=None) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fallbacks are counted from SolverInfo
        logits, _ = model(x, mode=mode) if mode else model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()


def time_modes(model, x, y, cfg: LMConfig) -> dict:
    """Seconds per training step in parallel and sequential mode, interleaved (median of
    ``cfg.timing_steps``), on a copy of the trained model and its optimizer state discarded."""
    import copy

    clone = copy.deepcopy(model)
    opt = torch.optim.AdamW(clone.parameters(), lr=1e-4)
    times = {"parallel": [], "sequential": []}
    for _ in range(cfg.timing_steps):
        for mode, spent in times.items():
            t = time.perf_counter()
            train_step(clone, opt, None, x, y, mode=mode)
            spent.append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"parallel_step_s": med["parallel"], "sequential_step_s": med["sequential"],
            "sequential_over_parallel": med["sequential"] / med["parallel"]}


def train_one(name: str, cfg: LMConfig, data: torch.Tensor, progress: bool = True) -> dict:
    """Train one model; validate; time parallel against sequential training; sample."""
    n_train = int(len(data) * (1 - VAL_FRACTION))
    train, val = data[:n_train], data[n_train:]
    d_model = width_for(name, cfg)
    torch.manual_seed(cfg.seed)
    model = build(name, d_model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(cfg.seed)
    it = batches(train, cfg, gen)
    losses, iters = [], []
    steps = range(cfg.steps)
    if progress:
        steps = progress_bar(steps, desc=f"lm {name}", unit="step", leave=False)
    t0 = time.perf_counter()
    for _ in steps:
        x, y = next(it)
        losses.append(train_step(model, opt, sched, x, y))
        iters.append(newton_steps(model))
    train_s = time.perf_counter() - t0
    model.eval()
    bpb = bits_per_byte(model, val, cfg)
    prompt = torch.tensor([list(b"def ")])
    sample = model.generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=20,
                            generator=torch.Generator().manual_seed(cfg.seed))
    text = bytes(sample[0].tolist()).decode("utf-8", errors="replace")
    model.train()
    timing = time_modes(model, x, y, cfg) if name in NONLINEAR else None
    meta = run_metadata(asdict(cfg))
    return {"model": name, "config": asdict(cfg), **{k: meta[k] for k in ("pararnn", "commit", "date", "machine")},
            "d_model": d_model, "params": n_params(model), "val_bits_per_byte": bpb, "train_seconds": train_s,
            "train_tokens_per_s": cfg.steps * cfg.batch * cfg.seq_len / train_s,
            "newton_iterations_mean": sum(iters) / len(iters), "newton_iterations_max": max(iters),
            "loss_curve": losses, "newton_curve": iters, "sample": text, "timing": timing}


def summarize(results: list[dict], corpus: dict, out: str) -> str:
    """Write summary.json, table.md, plots/loss.png and plots/newton.png; return the table."""
    results = sorted(results, key=lambda r: list(MODELS).index(r["model"]))
    write_json_atomic(os.path.join(out, "summary.json"), {**run_metadata(results[0]["config"] if results else {}),
                                                          "corpus": corpus, "runs": results})
    cfg = results[0]["config"] if results else asdict(LMConfig())
    head = (f"Character-level LM on {corpus['bytes']} bytes of Python {corpus['python']}'s standard library "
            f"({len(corpus['files'])} files; last {VAL_FRACTION:.0%} validation); {cfg['n_layers']} layers, "
            f"about {cfg['params']:,} parameters, {cfg['steps']} steps of {cfg['batch']}×{cfg['seq_len']} bytes.")
    lines = [head, "",
             ("| model | width | params | val bits/byte | train tokens/s | Newton iters per step (mean, max) | "
              "sequential / parallel step time |"), "|---|---|---|---|---|---|---|"]
    for r in results:
        t = r["timing"]
        ratio = (f"{t['sequential_over_parallel']:.2f}× ({t['sequential_step_s']:.2f} s / {t['parallel_step_s']:.2f} s)"
                 if t else "–")
        iters = f"{r['newton_iterations_mean']:.1f}, {r['newton_iterations_max']}" if r["model"] != "transformer" else "–"
        lines.append(f"| {r['model']} | {r['d_model']} | {r['params']:,} | {r['val_bits_per_byte']:.3f} | "
                     f"{r['train_tokens_per_s']:.0f} | {iters} | {ratio} |")
    lines += ["", "Samples (prompt `def `, temperature 0.8, top-k 20):", ""]
    for r in results:
        lines += [f"- **{r['model']}**: `{r['sample'][:120]!r}`"]
    table = "\n".join(lines) + "\n"
    write_text(os.path.join(out, "table.md"), table)
    with figure(os.path.join(out, "plots", "loss.png"), figsize=(5.5, 3.6)) as ax:
        for r in results:
            c = r["loss_curve"]
            k = max(1, len(c) // 50)  # a running mean over about 2 % of training
            smooth = [sum(c[max(0, i - k):i + 1]) / len(c[max(0, i - k):i + 1]) for i in range(len(c))]
            ax.plot([v / math.log(2) for v in smooth], lw=1, label=f"{r['model']} (val {r['val_bits_per_byte']:.2f})")
        ax.set_xlabel("training step")
        ax.set_ylabel("train loss (bits/byte)")
        ax.set_title("character LM on the Python stdlib")
    with figure(os.path.join(out, "plots", "newton.png"), figsize=(5.5, 3.6)) as ax:
        for r in results:
            if r["model"] != "transformer" and r.get("newton_curve"):
                ax.plot(r["newton_curve"], lw=0.8, label=r["model"])
        ax.set_xlabel("training step")
        ax.set_ylabel("Newton steps (most over the layers)")
        ax.set_title("Newton steps per training step")
    return table


def run(args: argparse.Namespace) -> list[dict]:
    from .track import _names, study_lock

    if (args.steps is not None and args.steps < 1) or (args.params is not None and args.params < 1000):
        raise SystemExit("pararnn lm: --steps must be >= 1 and --params >= 1000")
    models = _names(args.models, list(MODELS), "model(s)", "lm") or list(QUICK_MODELS if args.quick else MODELS)
    cfg = LMConfig() if args.quick else LMConfig(params=3_000_000, steps=2000, seq_len=256, batch=32)
    if args.steps is not None:
        cfg.steps = args.steps
    if args.params is not None:
        cfg.params = args.params
    ensure_writable(args.out, "--out", folder=True)
    set_threads(args.threads)
    data, corpus = load_corpus()
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    results = []
    with study_lock(args.out, "lm"):
        finished = {}  # every finished run in the folder, read once: {model: result}
        for path in sorted(glob.glob(os.path.join(args.out, "runs", "*.json"))):
            with open(path) as f:
                r = json.load(f)
            if r.get("config") != asdict(cfg):
                raise SystemExit(f"pararnn lm: {args.out} holds runs of another configuration ({path}); choose "
                                 "another --out, or pass the same settings")
            finished[r["model"]] = r
        for name in progress_bar(models, desc="lm models", unit="model"):
            path = os.path.join(args.out, "runs", f"{name}.json")
            if name in finished:
                print(f"pararnn lm: {name} already finished in {path}, skipping it", file=sys.stderr)
                results.append(finished[name])
                continue
            res = train_one(name, cfg, data)
            write_json_atomic(path, res)  # nothing lost if a later model is interrupted
            results.append(res)
            finished[name] = res
        print(summarize(list(finished.values()), corpus, args.out))
    plot = os.path.join(args.out, "plots", "loss.png")
    print(f"results: {args.out}/summary.json, {args.out}/table.md" + (f", plot {plot}" if os.path.isfile(plot) else ""))
    return results
