"""Swap torch.nn.GRU for pararnn.nn.GRU in an existing training loop: the constructor, shapes,
parameter names and state_dict are torch's; only the forward is the parallel solve.

    python examples/swap_gru.py
"""
import torch
import torch.nn.functional as F

import pararnn.nn


class Tagger(torch.nn.Module):
    def __init__(self, vocab: int = 32, d: int = 64, rnn_cls=torch.nn.GRU):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.rnn = rnn_cls(d, d, num_layers=2, batch_first=True)  # the only line that changes
        self.out = torch.nn.Linear(d, vocab)

    def forward(self, tokens):  # [B, T] -> logits [B, T, vocab]
        y, _ = self.rnn(self.emb(tokens))
        return self.out(y)


def main(steps: int = 100, T: int = 128, seed: int = 0) -> float:
    torch.manual_seed(seed)
    reference = Tagger(rnn_cls=torch.nn.GRU)
    model = Tagger(rnn_cls=pararnn.nn.GRU)
    model.load_state_dict(reference.state_dict())  # same parameter names and shapes
    tokens = torch.randint(0, 32, (8, T))
    torch.testing.assert_close(model(tokens), reference(tokens), rtol=1e-4, atol=1e-4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps):
        tokens = torch.randint(0, 32, (8, T))
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())  # a toy objective
        opt.zero_grad()
        loss.backward()
        opt.step()
    print(f"loss after {steps} steps: {loss.item():.3f}")
    return loss.item()


if __name__ == "__main__":
    main()
