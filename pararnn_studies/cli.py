"""The `pararnn` command: argument parsing only; each subcommand's code is imported when it runs.

``pararnn --help``, ``pararnn --version`` and a mistyped subcommand never import torch.
"""
from __future__ import annotations

import argparse
import sys

# The names the subcommands accept, listed here so that --help needs no torch import;
# tests/studies/test_cli.py checks them against pararnn.models.CELLS, studies.tasks.TASKS and studies.track.MODELS.
CELL_NAMES = ("elman", "gru", "lstm", "paragru", "paralstm", "lru", "ssm", "ssm_neg", "cssm", "deltanet",
              "deltaproduct")
TASK_NAMES = ("parity", "count_mod3", "arith_mod5", "s3", "a4", "a5", "s5", "flipflop", "arith_mod5_precedence",
              "arith_mod5_brackets", "keep_nth", "mqar")
LM_MODEL_NAMES = ("paragru", "paralstm", "gru", "ssm_neg", "deltanet", "transformer")
MODEL_NAMES = ("diag_pos", "diag_neg", "lru", "cdiag", "deltaproduct1_pos", "deltaproduct1_neg", "deltaproduct2_pos",
               "deltaproduct2_neg", "deltaproduct4_pos", "deltaproduct4_neg", "paragru", "paralstm", "gru", "lstm")


def _version() -> str:
    """The installed pararnn's version, read without importing it (and torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pararnn")
    except PackageNotFoundError:  # a checkout on PYTHONPATH
        import pararnn

        return pararnn.__version__


def bench_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="small shapes (about a minute)")
    ap.add_argument("--threads", type=int, default=1, help="torch and numba threads (default 1)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    ap.add_argument("--cells", default="paragru,paralstm,gru,lstm,lru",
                    help=f"comma-separated cells for the per-cell table, from {', '.join(CELL_NAMES)} ('' = none)")
    ap.add_argument("--engine", action=argparse.BooleanOptionalAction, default=True,
                    help="run the engine regimes and the scan-vs-floor study (--no-engine: cells only)")
    ap.add_argument("--Ts", default=None, help="comma-separated sequence lengths for the per-cell study")
    ap.add_argument("--width", type=int, default=None, help="state width d for the per-cell study")
    ap.add_argument("--batch", type=int, default=1, help="batch size B for the per-cell study")
    ap.add_argument("--out", default="results/bench_engine.json",
                    help="JSON results path (a .md table and .png plots are written beside it)")


def track_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="the published contrasts and the recall and arithmetic tasks, 3 seeds "
                    "(81 runs, ~14 min on 2 cores)")
    ap.add_argument("--task", "--tasks", dest="tasks", default=None,
                    help=f"comma-separated tasks ({', '.join(TASK_NAMES)}) or 'reconstruct'")
    ap.add_argument("--models", default=None, help=f"comma-separated models ({', '.join(MODEL_NAMES)}); "
                    "suffix _pos = eigenvalues in [0,1], _neg = in [-1,1]")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per (task, model); tables give median ± MAD "
                    "and best over them (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run")
    ap.add_argument("--eval-lengths", default=None, help="comma-separated test lengths")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes (1 torch thread each)")
    ap.add_argument("--decoder", choices=("linear", "mlp"), default="linear", help="reconstruct: decoder")
    ap.add_argument("--out", default="results/track", help="output folder (checkpoints, tables, plots)")


def lm_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="6 models of about 1M parameters, 300 steps each (~13 min on 2 cores)")
    ap.add_argument("--models", default=None, help=f"comma-separated models ({', '.join(LM_MODEL_NAMES)})")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model")
    ap.add_argument("--params", type=int, default=None, help="target parameter count per model")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="results/lm", help="output folder (checkpoints, tables, plots)")


def _run_lm(args):
    from . import lm

    return lm.run(args)


def _run_bench(args):
    from . import bench

    return bench.run(args)


def _run_track(args):
    from . import track

    return track.run(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pararnn", description="Parallel-in-time RNNs: benchmarks and studies.")
    ap.add_argument("--version", action="version", version=f"pararnn {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="speed: parallel Newton vs sequential loops and torch.nn.GRU")
    bench_arguments(p)
    p.set_defaults(func=_run_bench)
    p = sub.add_parser("track", help="state tracking: linear vs nonlinear RNNs, trained short, tested long")
    track_arguments(p)
    p.set_defaults(func=_run_track)
    p = sub.add_parser("lm", help="character-level language modelling on the Python stdlib: nonlinear RNNs "
                                  "trained in parallel against linear RNNs and a Transformer")
    lm_arguments(p)
    p.set_defaults(func=_run_lm)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        where = f" in {args.out}" if getattr(args, "out", None) else ""
        print(f"pararnn {args.command}: interrupted; finished results are kept{where}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
