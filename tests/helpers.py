"""User-style cells written the way a user would, and the plain autograd loop the gradient tests
compare with, for the engine tests."""
import importlib.util
import os

import torch
from torch import nn

import pararnn


class DiagGRU(pararnn.Cell):
    """A GRU-like cell with diagonal recurrence, Jacobian left to torch.func."""

    structure = "diagonal"

    def __init__(self, din, d, scale=0.8):
        super().__init__()
        self.state_size, self.input_size = d, din
        self.W = nn.Linear(din, 3 * d)
        self.a = nn.Parameter(torch.randn(3, d) * scale)

    def prepare(self, x):
        return self.W(x)

    def step(self, h, u):
        uz, ur, uc = u.chunk(3, -1)
        z = torch.sigmoid(uz + self.a[0] * h)
        r = torch.sigmoid(ur + self.a[1] * h)
        c = torch.tanh(uc + self.a[2] * r * h)
        return (1 - z) * h + z * c


class DiagTanh(pararnn.Cell):
    """h' = tanh(w·h + u), diagonal, written with ``step`` only (u is the input: no ``prepare``)."""

    structure = "diagonal"

    def __init__(self, d):
        super().__init__()
        self.state_size = self.input_size = d
        self.w = nn.Parameter(torch.linspace(-2, 2, d))

    def step(self, h, u):  # [N, d], [N, d] -> [N, d]
        return torch.tanh(self.w * h + u)


class BlockTanh(pararnn.Cell):
    """tanh RNN with k×k block-diagonal recurrent weights."""

    def __init__(self, din, d, k, scale=0.5):
        super().__init__()
        self.state_size, self.input_size, self.structure, self.k = d, din, pararnn.Block(k), k
        self.W = nn.Linear(din, d)
        self.R = nn.Parameter(torch.randn(d // k, k, k) * scale)

    def prepare(self, x):
        return self.W(x)

    def step(self, h, u):
        hb = h.reshape(h.shape[0], -1, self.k, 1)
        return torch.tanh(u + (self.R @ hb).reshape(h.shape))


class DenseTanh(pararnn.Cell):
    """Elman tanh RNN, dense Jacobian."""

    structure = "dense"

    def __init__(self, din, d, scale=0.5):
        super().__init__()
        self.state_size, self.input_size = d, din
        self.W = nn.Linear(din, d)
        self.R = nn.Parameter(torch.randn(d, d) * scale / d**0.5)

    def prepare(self, x):
        return self.W(x)

    def step(self, h, u):
        return torch.tanh(u + h @ self.R.T)


class AffineCell(pararnn.Cell):
    """h' = A(u) h + B u, affine in h, with any structure."""

    def __init__(self, din, d, structure):
        super().__init__()
        self.state_size, self.input_size = d, din
        self.structure = pararnn.structure.as_structure(structure, d)
        st = self.structure
        self.register_buffer("mask", st.to_dense(torch.ones(st.storage_shape(d)), d))  # 0/1 pattern
        self.Wa = nn.Linear(din, d)
        self.Wb = nn.Linear(din, d)
        self.M = nn.Parameter(torch.randn(d, d) * 0.5 / d**0.5)

    def prepare(self, x):
        return torch.cat([torch.sigmoid(self.Wa(x)), self.Wb(x)], -1)

    def step(self, h, u):
        a, b = u.chunk(2, -1)
        return a * (h @ (self.M * self.mask).T) + b


def make_cell(kind, din=3, d=6, dtype=torch.float64):
    cells = {
        "diagonal": lambda: DiagGRU(din, d),
        "block2": lambda: BlockTanh(din, d, 2),
        "block3": lambda: BlockTanh(din, d, 3),
        "dense": lambda: DenseTanh(din, d),
    }
    return cells[kind]().to(dtype)


KINDS = ["diagonal", "block2", "block3", "dense"]


def loop(cell: pararnn.Cell, x: torch.Tensor, h0: torch.Tensor, mask: torch.Tensor | None = None):
    """The reference: ``h_t = step(h_{t-1}, u_t)`` by plain autograd; padded steps keep the state
    and read no input (x is zeroed there first), and y is zero there."""
    if mask is not None:
        x = x.masked_fill(~mask[..., None], 0)
    u = cell.prepare(x)
    h, hs = h0, []
    for t in range(x.shape[1]):
        h_new = cell.step(h, u[:, t])
        h = h_new if mask is None else torch.where(mask[:, t, None], h_new, h)
        hs.append(h)
    y = cell.output(torch.stack(hs, 1), x)
    h = h.clone()  # a tensor of its own, as torch.nn.GRU's h_n: a hook on it sees only its own gradient
    return (y, h) if mask is None else (y * mask[..., None], h)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error ``max|a - b| / max|b|`` (b is the reference; a is cast to b's dtype).

    The one comparison helper of the suite, for bounds that ``torch.testing.assert_close``'s
    elementwise rtol/atol cannot express (a normwise error against a float64 reference).
    """
    a = a.to(b.dtype)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def load_script(name: str, folder: str = "benchmarks"):
    """A script of benchmarks/ or examples/ (not packages) imported as a module, e.g. ``load_script("bench_gpu")``."""
    path = os.path.join(os.path.dirname(__file__), "..", folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

