"""State-tracking tasks, generated in code: parity, counting mod m, arithmetic mod 5, group word
problems (S3, A4, A5, S5) and flip-flop. Every task gives a target at every position."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def permutation_group(n: int, even_only: bool) -> torch.Tensor:
    """Multiplication table ``[G, G]`` of S_n (or A_n): ``table[a, b]`` = index of ``a ∘ b``.

    Element 0 is the identity.
    """
    perms = [p for p in itertools.permutations(range(n))
             if not even_only or sum(p[i] > p[j] for i in range(n) for j in range(i + 1, n)) % 2 == 0]
    index = {p: i for i, p in enumerate(perms)}
    table = [[index[tuple(a[b[x]] for x in range(n))] for b in perms] for a in perms]
    return torch.tensor(table, dtype=torch.long)


@dataclass(frozen=True)
class Task:
    """A sequence task: ``sample(B, T, gen) -> (x [B, T] long, y [B, T] long)``."""

    name: str
    n_in: int
    n_out: int
    description: str

    @property
    def chance(self) -> float:
        return 1.0 / self.n_out

    def sample(self, B: int, T: int, gen: torch.Generator):
        return _SAMPLERS[self.name](B, T, gen)


def _parity(B, T, gen):
    x = torch.randint(0, 2, (B, T), generator=gen)
    return x, x.cumsum(1) % 2


def _count_mod3(B, T, gen):
    x = torch.randint(0, 3, (B, T), generator=gen)  # moves 0, +1, -1 on a 3-cycle
    step = torch.tensor([0, 1, 2])[x]  # -1 ≡ 2 (mod 3)
    return x, step.cumsum(1) % 3


def _arith_mod5(B, T, gen):
    """Digits (0-4) and operators (+, -, ×: tokens 5, 6, 7) alternate; evaluated left to right."""
    digits = torch.randint(0, 5, (B, T), generator=gen)
    ops = torch.randint(5, 8, (B, T), generator=gen)
    pos = torch.arange(T)
    x = torch.where(pos % 2 == 0, digits, ops)
    y = torch.empty_like(x)
    val = digits[:, 0].clone()
    op = torch.zeros(B, dtype=torch.long)
    for t in range(T):
        if t % 2 == 0 and t > 0:
            d = x[:, t]
            val = torch.where(op == 5, val + d, torch.where(op == 6, val - d, val * d)) % 5
        elif t % 2 == 1:
            op = x[:, t]
        y[:, t] = val
    return x, y


def _word_problem(n, even):
    def sample(B, T, gen):
        table = permutation_group(n, even)
        x = torch.randint(0, table.shape[0], (B, T), generator=gen)
        y = torch.empty_like(x)
        acc = torch.zeros(B, dtype=torch.long)  # identity
        for t in range(T):
            acc = table[acc, x[:, t]]
            y[:, t] = acc
        return x, y

    return sample


def _flipflop(B, T, gen):
    """Tokens: 0 = write 0, 1 = write 1, 2 = ignore (p = 0.8). Target: the last written bit."""
    u = torch.rand(B, T, generator=gen)
    bit = torch.randint(0, 2, (B, T), generator=gen)
    x = torch.where(u < 0.2, bit, torch.full_like(bit, 2))
    y = torch.empty_like(x)
    last = torch.zeros(B, dtype=torch.long)
    for t in range(T):
        last = torch.where(x[:, t] < 2, x[:, t], last)
        y[:, t] = last
    return x, y


_SAMPLERS = {
    "parity": _parity, "count_mod3": _count_mod3, "arith_mod5": _arith_mod5,
    "s3": _word_problem(3, False), "a4": _word_problem(4, True), "a5": _word_problem(5, True),
    "s5": _word_problem(5, False), "flipflop": _flipflop,
}

TASKS = {
    "parity": Task("parity", 2, 2, "running parity of a bit string (word problem of Z2)"),
    "count_mod3": Task("count_mod3", 3, 3, "cycle navigation: moves 0/+1/-1, position mod 3"),
    "arith_mod5": Task("arith_mod5", 8, 5, "digits and +,-,× mod 5, evaluated left to right, no brackets"),
    "s3": Task("s3", 6, 6, "word problem of S3: running product of permutations"),
    "a4": Task("a4", 12, 12, "word problem of A4"),
    "a5": Task("a5", 60, 60, "word problem of A5 (non-solvable)"),
    "s5": Task("s5", 120, 120, "word problem of S5 (non-solvable)"),
    "flipflop": Task("flipflop", 3, 2, "flip-flop: remember the last written bit through noise"),
}
