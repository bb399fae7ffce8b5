"""A plain torchrun-style DDP script (gloo): runs unchanged under `torchrun` or `shoal run`.

    shoal run --nproc-per-node 2 examples/plain_ddp.py
    torchrun --nproc-per-node 2 examples/plain_ddp.py

On two nodes (node 0 at ADDR), the same under both, with NODE 0 and 1:

    shoal run --nnodes 2 --node-rank NODE --master-addr ADDR --nproc-per-node 1 examples/plain_ddp.py
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from shoal.tasks.digits import DigitsNet, load_digits  # data and model only


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    images, labels = load_digits()
    dataset = TensorDataset(images, labels)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(dataset, batch_size=64 // world, sampler=sampler)
    model = DistributedDataParallel(DigitsNet())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for epoch in range(int(os.environ.get("EPOCHS", "2"))):
        sampler.set_epoch(epoch)
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        if rank == 0:
            print(f"epoch {epoch}: loss {loss.item():.4f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
