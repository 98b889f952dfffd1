"""Define a cell and train it: a diagonal GRU-like cell learns running parity in parallel over T.

    python examples/train_cell.py
"""
import argparse

import torch
import torch.nn.functional as F

import pararnn


class MyGRU(pararnn.Cell):
    structure = "diagonal"  # df/dh is diagonal: each state entry depends on its own previous value

    def __init__(self, d_in: int, d: int):
        super().__init__()
        self.state_size, self.input_size = d, d_in
        self.W = torch.nn.Linear(d_in, 3 * d)
        self.a = torch.nn.Parameter(torch.randn(3, d) * 0.5)

    def prepare(self, x):  # [B, T, d_in] -> [B, T, 3d], once for all T
        return self.W(x)

    def step(self, h, u):  # h [N, d], u [N, 3d] -> [N, d]
        uz, ur, uc = u.chunk(3, -1)
        z, r = torch.sigmoid(uz + self.a[0] * h), torch.sigmoid(ur + self.a[1] * h)
        return (1 - z) * h + z * torch.tanh(uc + self.a[2] * r * h)


def main(steps: int = 300, T: int = 64, batch: int = 32, d: int = 32, seed: int = 0) -> float:
    torch.manual_seed(seed)
    rnn = pararnn.RNN(MyGRU(1, d))  # parallel Newton solve; gradients by one adjoint scan
    head = torch.nn.Linear(d, 2)
    opt = torch.optim.AdamW([*rnn.parameters(), *head.parameters()], lr=3e-3)
    for step in range(steps):
        bits = torch.randint(0, 2, (batch, T))
        target = bits.cumsum(1) % 2  # running parity, [B, T]
        y, _ = rnn(bits.unsqueeze(-1).float())  # y [B, T, d]
        loss = F.cross_entropy(head(y).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, Newton steps {rnn.last_info.iterations}")
    return loss.item()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    main(ap.parse_args().steps)
