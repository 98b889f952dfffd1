"""Data-parallel training of a pararnn model with DistributedDataParallel.

    torchrun --nproc_per_node=2 examples/train_ddp.py        # gloo on CPU, nccl on GPU
    python examples/train_ddp.py                             # one process works too

Trains a ParaGRU SequenceModel (parallel Newton path) on running parity; each rank takes its
share of every global batch and DDP averages the gradients.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from pararnn.models import SequenceModel
from pararnn_studies.common import ddp_rank_world, init_distributed_from_env
from pararnn_studies.tasks import TASKS


def main(steps: int = 200, global_batch: int = 32, seed: int = 0):
    init_distributed_from_env()  # under torchrun: gloo on CPU, nccl on GPU
    rank, world = ddp_rank_world()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)  # identical initial weights on every rank
    model = SequenceModel(2, 2, d_model=32, n_layers=1, cell="paragru").to(device)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)  # same global batch on every rank
    per_rank = global_batch // world
    for step in range(steps):
        x, y = TASKS["parity"].sample(global_batch, 32, gen)
        x, y = x[rank * per_rank:(rank + 1) * per_rank].to(device), y[rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = F.cross_entropy(net(x)[0].flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
