"""A batch of sequences of different lengths, two ways: right-padded with ``lengths=``, and packed
in flash-linear-attention's convention with ``cu_seqlens=`` (no padding in memory).

    python examples/varlen.py
"""
import torch

import pararnn
from pararnn.models import ParaGRU


def main(lengths=(300, 17, 120), d: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    rnn = pararnn.RNN(ParaGRU(8, d))
    seqs = [torch.randn(n, 8) for n in lengths]
    # padded: [B, T_max, 8]; y is zero past each length, h_T is each sequence's own last state
    padded = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    y_pad, h_pad = rnn(padded, lengths=torch.tensor(lengths))
    # packed: [1, total, 8] with cumulative offsets [N + 1]
    packed = torch.cat(seqs).unsqueeze(0)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    y_pk, h_pk = rnn(packed, cu_seqlens=cu_seqlens)
    for i, n in enumerate(lengths):  # the same states either way, and the same as alone
        alone, h_alone = rnn(seqs[i].unsqueeze(0))
        torch.testing.assert_close(y_pad[i, :n], alone[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y_pk[0, cu_seqlens[i]:cu_seqlens[i + 1]], alone[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(h_pk[i], h_alone[0], rtol=1e-4, atol=1e-5)
    print("padded and packed batches agree with each sequence solved alone:", list(lengths))
    return h_pad, h_pk


if __name__ == "__main__":
    main()
