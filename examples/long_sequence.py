"""A sequence too long to keep every Newton buffer: ``chunk_size`` solves T in chunks (each an
activation checkpoint), with exact gradients and memory bounded by the chunk.

    python examples/long_sequence.py            # T = 200_000 steps, d = 64
"""
import argparse
import time

import torch

import pararnn
from pararnn.models import ParaGRU


def main(T: int = 200_000, d: int = 64, chunk: int = 16_384, seed: int = 0):
    torch.manual_seed(seed)
    cell = ParaGRU(4, d)
    x = torch.randn(1, T, 4, requires_grad=True)
    rnn = pararnn.RNN(cell, chunk_size=chunk)  # or chunk_size="auto", memory_budget=2**30
    t0 = time.perf_counter()
    y, h_T = rnn(x)
    y.pow(2).mean().backward()
    print(f"T = {T}: forward+backward {time.perf_counter() - t0:.1f} s in {len(rnn.last_info.chunks)} chunks, "
          f"at most {max(i.iterations for i in rnn.last_info.chunks)} Newton steps per chunk")
    return y, x.grad


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=200_000)
    main(ap.parse_args().T)
