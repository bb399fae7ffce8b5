"""Handwritten digits (8x8, 1,797 images): a small CNN, fixed 80/20 train/test split.

The data is the UCI "Optical Recognition of Handwritten Digits" test set as bundled by
scikit-learn (CC BY 4.0), shipped inside shoal as ``digits.csv.gz`` so that no download and
no scikit-learn are needed.
"""

from __future__ import annotations

import gzip
from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from shoal.tasks.api import Task, TaskDefaults

_NUM_TRAIN = 1437  # 80% of 1,797


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images as float tensors in [0, 1] of shape (N, 1, 8, 8), and their labels."""
    raw = gzip.decompress(resources.files("shoal.tasks").joinpath("digits.csv.gz").read_bytes())
    rows = [list(map(int, line.split(","))) for line in raw.decode().splitlines() if line]
    table = torch.tensor(rows, dtype=torch.int64)
    images = table[:, :64].to(torch.float32).div_(16.0).reshape(-1, 1, 8, 8)
    return images, table[:, 64]


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.hidden = nn.Linear(32 * 4 * 4, 64)
        self.out = nn.Linear(64, 10)

    def forward(self, images):
        x = F.relu(self.conv1(images))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.out(F.relu(self.hidden(x.flatten(1))))


class DigitsTask(Task):
    name = "digits"
    defaults = TaskDefaults(epochs=10, batch_size=64, lr=0.05)

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        images, labels = load_digits()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
        train, test = order[:_NUM_TRAIN], order[_NUM_TRAIN:]
        self.train = TensorDataset(images[train], labels[train])
        self.test = TensorDataset(images[test], labels[test])

    def build_model(self):
        torch.manual_seed(self.seed)
        return DigitsNet()

    def build_optimizer(self, model, lr):
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    @classmethod
    def train_samples(cls, seed=0):
        return _NUM_TRAIN

    def train_dataset(self):
        return self.train

    def loss(self, model, batch):
        images, labels = batch
        return F.cross_entropy(model(images), labels, reduction="sum")

    def evaluate(self, model):
        images, labels = self.test.tensors
        with torch.no_grad():
            logits = model(images)
            loss = F.cross_entropy(logits, labels).item()
            accuracy = (logits.argmax(1) == labels).float().mean().item()
        return {"test_loss": loss, "test_accuracy": accuracy}
