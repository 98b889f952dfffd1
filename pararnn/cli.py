"""The `pararnn` console script."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="pararnn", description="Parallel-in-time RNNs: benchmarks and studies.")
    sub = ap.add_subparsers(dest="command", required=True)
    from . import bench

    p = sub.add_parser("bench", help="speed: parallel Newton vs sequential loops and torch.nn.GRU")
    bench.add_arguments(p)
    p.set_defaults(func=bench.run)
    from . import track

    p = sub.add_parser("track", help="state tracking: linear vs nonlinear RNNs, trained short, tested long")
    track.add_arguments(p)
    p.set_defaults(func=track.run)
    args = ap.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
