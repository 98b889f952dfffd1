"""State-tracking and recall tasks, generated in code: parity, counting mod 3, arithmetic mod 5
(left to right, with operator precedence, or with brackets), group word problems (S3, A4, A5, S5), flip-flop,
keep-n-th and multi-query associative recall (MQAR). Targets are ``[B, T]`` class indices;
``IGNORE`` (-100, cross_entropy's default ignore_index) marks positions without one (before the
n-th token in keep-n-th, the key-value pairs in MQAR)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch

IGNORE = -100  # a position without a target (torch.nn.functional.cross_entropy skips it)


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


def _arith_mod5_precedence(B, T, gen):
    """As arith_mod5, but × binds before + and -: the target is the value of the prefix up to the
    last digit read, evaluated with the usual precedence (mod 5)."""
    digits = torch.randint(0, 5, (B, T), generator=gen)
    ops = torch.randint(5, 8, (B, T), generator=gen)
    x = torch.where(torch.arange(T) % 2 == 0, digits, ops)
    y = torch.empty_like(x)
    acc = torch.zeros(B, dtype=torch.long)  # the sum of the finished terms
    term = digits[:, 0].clone()  # the running term (a signed product)
    op = torch.zeros(B, dtype=torch.long)
    for t in range(T):
        if t % 2 == 0 and t > 0:
            d = x[:, t]
            new_term = torch.where(op == 5, d, -d)  # after + or -: a new term starts
            acc = torch.where(op == 7, acc, acc + term)
            term = torch.where(op == 7, term * d, new_term) % 5
        elif t % 2 == 1:
            op = x[:, t]
        y[:, t] = (acc + term) % 5
    return x, y


# brackets: digits 0-4, + - × (5, 6, 7), ( ) (8, 9), = (10), blank (11)
LPAR, RPAR, EQUALS, BLANK = 8, 9, 10, 11


def _expression(n: int, rng) -> list[int]:
    """A random well-formed expression of exactly n tokens (n odd): a digit, ``( e )`` or ``e op e``."""
    if n == 1:
        return [rng.randrange(5)]
    if rng.random() < 0.3:
        return [LPAR, *_expression(n - 2, rng), RPAR]
    a = 2 * rng.randrange((n - 1) // 2) + 1  # odd, 1..n-2
    return [*_expression(a, rng), 5 + rng.randrange(3), *_expression(n - 1 - a, rng)]


def evaluate_mod5(tokens: list[int]) -> int:
    """The value mod 5 of an expression with the usual precedence (× before + and -, brackets first)."""
    pos = 0

    def expr():
        nonlocal pos
        v = term()
        while pos < len(tokens) and tokens[pos] in (5, 6):
            op = tokens[pos]
            pos += 1
            w = term()
            v = (v + w) % 5 if op == 5 else (v - w) % 5
        return v

    def term():
        nonlocal pos
        v = factor()
        while pos < len(tokens) and tokens[pos] == 7:
            pos += 1
            v = v * factor() % 5
        return v

    def factor():
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == LPAR:
            v = expr()
            pos += 1  # the closing bracket
            return v
        return tok

    return expr()


def _arith_mod5_brackets(B, T, gen):
    """An expression with brackets, + - × mod 5 (Grazzi et al.'s modular arithmetic with
    brackets), then ``=``; the only target is the value, at the ``=``. The expression fills the
    sequence (odd length, so one blank token leads when T - 1 is even)."""
    import random

    if T < 2:
        raise ValueError(f"arith_mod5_brackets needs T >= 2, got T={T}")
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=gen)))
    m = T - 1 if (T - 1) % 2 else T - 2
    x = torch.full((B, T), BLANK, dtype=torch.long)
    y = torch.full((B, T), IGNORE, dtype=torch.long)
    for b in range(B):
        e = _expression(m, rng)
        x[b, T - 1 - m:T - 1] = torch.tensor(e)
        y[b, T - 1] = evaluate_mod5(e)
    x[:, T - 1] = EQUALS
    return x, y


KEEP_N = 3  # keep-n-th: the token to keep is the 3rd (training lengths start at 3)
KEEP_VOCAB = 16


def _keep_nth(B, T, gen):
    """Random tokens; from position n on, the target is the n-th token (none before it)."""
    x = torch.randint(0, KEEP_VOCAB, (B, T), generator=gen)
    y = torch.full_like(x, IGNORE)
    if T >= KEEP_N:
        y[:, KEEP_N - 1:] = x[:, KEEP_N - 1, None]
    return x, y


MQAR_KEYS = 64  # tokens 0..63 are keys, 64..127 values: vocabulary 128


def _mqar(B, T, gen):
    """Multi-query associative recall: ``P = min(T // 4, 64)`` (at least 1) key-value pairs
    (distinct keys), then queries of those keys in random order; the target at a query is its
    key's value (64 classes), none elsewhere."""
    P = max(1, min(T // 4, MQAR_KEYS))
    if T < 2 * P + 1:
        raise ValueError(f"mqar needs T >= 3, got T={T}")
    keys = torch.rand(B, MQAR_KEYS, generator=gen).argsort(1)[:, :P]  # [B, P] distinct keys
    vals = torch.randint(0, MQAR_KEYS, (B, P), generator=gen)  # [B, P] value classes
    q = torch.randint(0, P, (B, T - 2 * P), generator=gen)  # which pair each query asks for
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0:2 * P:2], x[:, 1:2 * P:2] = keys, vals + MQAR_KEYS
    x[:, 2 * P:] = keys.gather(1, q)
    y = torch.full_like(x, IGNORE)
    y[:, 2 * P:] = vals.gather(1, q)
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
    "s5": _word_problem(5, False), "flipflop": _flipflop, "arith_mod5_precedence": _arith_mod5_precedence,
    "keep_nth": _keep_nth, "mqar": _mqar, "arith_mod5_brackets": _arith_mod5_brackets,
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
    "arith_mod5_precedence": Task("arith_mod5_precedence", 8, 5,
                                  "digits and +,-,× mod 5 with operator precedence (× first), no brackets"),
    "arith_mod5_brackets": Task("arith_mod5_brackets", 12, 5, "an expression with brackets and +,-,× mod 5, "
                                "then =; the target is its value"),
    "keep_nth": Task("keep_nth", KEEP_VOCAB, KEEP_VOCAB, f"keep-n-th: repeat the {KEEP_N}rd token ({KEEP_VOCAB} "
                     "tokens) at every later position"),
    "mqar": Task("mqar", 2 * MQAR_KEYS, MQAR_KEYS, "multi-query associative recall: T/4 key-value pairs "
                 f"(at most {MQAR_KEYS}, vocabulary {2 * MQAR_KEYS}), then queries of their keys"),
}
