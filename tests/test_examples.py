"""Every script in examples/ runs, on tiny sizes."""
import torch
from helpers import load_script

import pararnn


def test_train_cell_learns():
    first = load_script("train_cell", folder="examples").main(steps=1, T=16, batch=8, d=8)
    last = load_script("train_cell", folder="examples").main(steps=60, T=16, batch=16, d=16)
    assert last < first


def test_swap_gru_matches_torch_and_trains():
    assert load_script("swap_gru", folder="examples").main(steps=2, T=12) > 0


def test_varlen_padded_and_packed_agree():
    h_pad, h_pk = load_script("varlen", folder="examples").main(lengths=(20, 3, 9), d=8)
    torch.testing.assert_close(h_pad, h_pk, rtol=1e-4, atol=1e-5)


def test_long_sequence_in_chunks_matches_one_solve():
    mod = load_script("long_sequence", folder="examples")
    y, g = mod.main(T=300, d=8, chunk=64)
    torch.manual_seed(0)
    cell = pararnn.models.ParaGRU(4, 8)
    x = torch.randn(1, 300, 4, requires_grad=True)
    y1, _ = pararnn.RNN(cell)(x)
    y1.pow(2).mean().backward()
    torch.testing.assert_close(y, y1, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, x.grad, rtol=1e-3, atol=1e-6)


def test_ddp_example_runs_in_one_process():
    load_script("train_ddp", folder="examples").main(steps=2, global_batch=4)
