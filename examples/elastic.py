"""The same training through shoal's API: survives workers that die, equals one process.

    shoal run --nproc-per-node 2 examples/elastic.py
    python examples/elastic.py            # also works in one plain process
"""

import os

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import shoal
from shoal.tasks.digits import DigitsNet, load_digits  # data and model only


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")  # a SUM: shoal divides by the global batch


def main() -> None:
    torch.manual_seed(0)
    images, labels = load_digits()
    dataset = TensorDataset(images, labels)
    model = DigitsNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    result = shoal.train(model, optimizer, dataset, loss_fn, global_batch_size=64,
                         epochs=int(os.environ.get("EPOCHS", "2")))
    if result.is_leader:
        with torch.no_grad():
            accuracy = (model(images).argmax(1) == labels).float().mean().item()
        print(f"{result.steps} steps on {result.world_size} worker(s): accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
