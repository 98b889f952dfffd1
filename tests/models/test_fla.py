"""pararnn.fla.RNNAttention: flash-linear-attention's layer convention (call, cache, padding,
packing) over a parallel solve, against the float64 loop and each sequence run alone."""
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import loop

from pararnn.fla import RNNAttention
from pararnn.models import ParaGRU

D = 8


class StandInCache:
    """fla's cache interface as its layers use it (``len``, ``[layer_idx]``, ``update``); the
    real one is tested in :func:`test_with_fla_s_own_cache` where fla is installed."""

    def __init__(self):
        self.states, self.seen = [], 0

    def __len__(self):
        return len(self.states)

    def __getitem__(self, i):
        return self.states[i]

    def update(self, recurrent_state=None, layer_idx=0, offset=1, **kwargs):
        while len(self.states) <= layer_idx:
            self.states.append({"recurrent_state": None})
        if recurrent_state is not None:
            self.states[layer_idx]["recurrent_state"] = recurrent_state
        self.seen += offset if layer_idx == 0 else 0
        return self.states[layer_idx]


def _layer(cell="paragru", **kw):
    torch.manual_seed(0)
    return RNNAttention(D, cell, layer_idx=0, **kw).double()


def _reference(layer, x):
    """``(o, h_T)`` by the plain loop (float64 autograd)."""
    y, h = loop(layer.cell, x, layer.cell.initial_state(x.shape[0], x.dtype, x.device))
    return layer.o_proj(y), h


@pytest.mark.parametrize("cell", ["paragru", "paralstm", "lru"])
def test_outputs_and_gradients_match_the_loop(cell):
    layer = _layer(cell)
    x = torch.randn(3, 40, D, dtype=torch.float64, requires_grad=True)
    cache = StandInCache()
    o, attn, cache_out = layer(x, past_key_values=cache, use_cache=True)
    assert attn is None and cache_out is cache and cache.seen == 40
    ref, h_ref = _reference(layer, x)
    torch.testing.assert_close(o, ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cache[0]["recurrent_state"], h_ref, rtol=1e-9, atol=1e-10)
    w = torch.randn_like(o)
    params = [x, *layer.parameters()]
    got = torch.autograd.grad((o * w).sum(), params)
    want = torch.autograd.grad((ref * w).sum(), params)
    for g, r in zip(got, want, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_each_sequence_alone(side):
    layer = _layer()
    T, lengths = 20, [20, 13, 1]
    x = torch.randn(3, T, D, dtype=torch.float64)
    steps = torch.arange(T)
    lens = torch.tensor(lengths)[:, None]
    mask = (steps >= T - lens) if side == "left" else (steps < lens)
    cache = StandInCache()
    o, _, _ = layer(x, attention_mask=mask.long(), past_key_values=cache, use_cache=True)
    for b, n in enumerate(lengths):
        alone, h_alone = _reference(layer, x[b:b + 1][:, mask[b]])
        torch.testing.assert_close(o[b:b + 1][:, mask[b]], alone, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(cache[0]["recurrent_state"][b:b + 1], h_alone, rtol=1e-9, atol=1e-10)
        assert bool((o[b][~mask[b]] == 0).all())  # padded steps output zero


def test_prefill_then_decode_equals_one_forward():
    """A left-padded prompt, then tokens one at a time and a chunk of two, with generation's
    growing mask: the same outputs as one forward over the whole left-padded sequence."""
    layer = _layer()
    T0, new = 9, 5
    x = torch.randn(2, T0 + new, D, dtype=torch.float64)
    mask = torch.ones(2, T0 + new, dtype=torch.long)
    mask[1, :4] = 0  # the second prompt is left-padded
    full, _, _ = layer(x, attention_mask=mask)
    cache = StandInCache()
    outs = [layer(x[:, :T0], attention_mask=mask[:, :T0], past_key_values=cache, use_cache=True)[0]]
    for t in range(T0, T0 + 3):  # one token at a time: the cell's step
        outs.append(layer(x[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache, use_cache=True)[0])
    outs.append(layer(x[:, T0 + 3:], attention_mask=mask, past_key_values=cache, use_cache=True)[0])  # a chunk
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)
    assert cache.seen == T0 + new


def test_packed_sequences_equal_each_sequence_alone():
    layer = _layer()
    cu = torch.tensor([0, 7, 20, 21])
    x = torch.randn(1, 21, D, dtype=torch.float64)
    cache = StandInCache()
    o, _, _ = layer(x, past_key_values=cache, use_cache=True, cu_seqlens=cu)
    for i in range(3):
        alone, h_alone = _reference(layer, x[:, cu[i]:cu[i + 1]])
        torch.testing.assert_close(o[:, cu[i]:cu[i + 1]], alone, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(cache[0]["recurrent_state"][i:i + 1], h_alone, rtol=1e-9, atol=1e-10)


def test_the_keywords_fla_blocks_pass():
    """fla's blocks pass output_attentions and their own keywords (HGRN's lower_bound); without
    use_cache the cache counts the tokens and keeps its state, as fla's layers do."""
    layer = _layer()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    cache = StandInCache()
    o, attn, _ = layer(hidden_states=x, attention_mask=None, past_key_values=cache, use_cache=False,
                       output_attentions=True, lower_bound=torch.zeros(D))
    assert attn is None and cache.seen == 6 and cache[0]["recurrent_state"] is None
    torch.testing.assert_close(o, _reference(layer, x)[0], rtol=1e-9, atol=1e-10)


def test_bad_arguments_are_named():
    layer = _layer()
    x = torch.randn(2, 6, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="hidden_states"):
        layer(torch.randn(2, 6, D + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="attention_mask"):
        layer(x, attention_mask=torch.ones(2, 6, 6))
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x[:1], attention_mask=torch.ones(1, 6), cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="layer_idx"):
        RNNAttention(D, "paragru").double()(x, past_key_values=StandInCache())
    with pytest.raises(ValueError, match="layer_idx"):
        RNNAttention(D, "paragru", layer_idx=-1)
    with pytest.raises(ValueError, match="input_size"):  # a cell instance must take [B, T, hidden_size]
        RNNAttention(D, ParaGRU(D + 1, D))
    with pytest.raises(ValueError, match="heads"):  # constructor arguments with an instance would be ignored
        RNNAttention(D, ParaGRU(D, D), heads=2)
    cache = StandInCache()
    layer(x, past_key_values=cache, use_cache=True)
    left = torch.tensor([[0, 1, 1], [1, 1, 1]])
    with pytest.raises(ValueError, match="right padding only"):  # continuing a state: no left padding
        layer(x[:, :3], attention_mask=left, past_key_values=cache, use_cache=True)


@pytest.mark.skipif(importlib.util.find_spec("fla") is None, reason="flash-linear-attention is not installed")
def test_with_fla_s_own_cache():
    """fla's Cache (fla 0.6): prefill and decode through it equal one forward. In a subprocess:
    importing fla sets process-wide options (TRITON_F32_DEFAULT) the suite should not inherit."""
    code = textwrap.dedent("""
        import torch
        from fla.models.utils import Cache
        from pararnn.fla import RNNAttention
        torch.manual_seed(0)
        layers = [RNNAttention(8, "paragru", layer_idx=i).double() for i in range(2)]
        def model(x, **kw):
            for layer in layers:
                x = x + layer(x, **kw)[0]
            return x
        x = torch.randn(2, 12, 8, dtype=torch.float64)
        full = model(x)
        cache = Cache()
        outs = [model(x[:, :8], past_key_values=cache, use_cache=True)]
        outs += [model(x[:, t:t + 1], past_key_values=cache, use_cache=True) for t in range(8, 12)]
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-9, atol=1e-10)
        assert len(cache) == 2 and cache.get_seq_length() == 12, (len(cache), cache.get_seq_length())
        assert cache[1]["recurrent_state"].shape == (2, 8)
        print("OK")
    """)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout[-2000:] + r.stderr[-3000:]
