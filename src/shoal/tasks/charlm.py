"""A small causal transformer (about 1.8 M parameters) on bytes of Python's own source.

The corpus is a fixed list of standard-library modules read from the running interpreter,
so it is present offline on every machine without a download. Windows of 64 bytes are the
samples; the last 5% of the corpus is held out for evaluation.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from shoal.tasks.api import Task, TaskDefaults

CONTEXT = 64
_CORPUS_MODULES = (
    "argparse", "ast", "calendar", "collections", "configparser", "csv", "dataclasses",
    "datetime", "difflib", "enum", "fractions", "functools", "heapq", "inspect", "json.decoder",
    "json.encoder", "logging", "pathlib", "pprint", "queue", "random", "shutil", "statistics",
    "string", "textwrap", "threading", "typing", "uuid", "zipfile",
)  # fmt: skip
_CORPUS_BYTES = 1 << 20
_EVAL_WINDOWS = 256


def load_corpus() -> bytes:
    parts = []
    for name in _CORPUS_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue  # a trimmed interpreter may lack a module: use what is there
        with open(spec.origin, "rb") as source:
            parts.append(source.read())
    corpus = b"\n".join(parts)[:_CORPUS_BYTES]
    if len(corpus) < 100 * (CONTEXT + 1):
        raise RuntimeError("charlm: too little Python standard-library source found for a corpus")
    return corpus


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, width: int = 192, layers: int = 4, heads: int = 6, vocab: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(CONTEXT, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def _train_windows(windows: int) -> int:
    return int(windows * 0.95)  # the rest is held out


class CharLMTask(Task):
    name = "charlm"
    defaults = TaskDefaults(epochs=1, batch_size=32, lr=3e-3)

    def __init__(self, seed: int = 0):
        super().__init__(seed)
        corpus = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
        windows = corpus[: len(corpus) // (CONTEXT + 1) * (CONTEXT + 1)].view(-1, CONTEXT + 1)
        split = _train_windows(len(windows))
        self.train = TensorDataset(windows[:split])
        self.held_out = windows[split:][:_EVAL_WINDOWS]
        # The final model's loss on training data: under localsgd and diloco the logged
        # training loss is the members' local models' during a round, not the agreed model's.
        self.train_probe = windows[: split : split // _EVAL_WINDOWS][:_EVAL_WINDOWS]

    @classmethod
    def train_samples(cls, seed=0):
        return _train_windows(len(load_corpus()) // (CONTEXT + 1))

    def build_model(self):
        torch.manual_seed(self.seed)
        return TinyGPT()

    def build_optimizer(self, model, lr):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def train_dataset(self):
        return self.train

    def _mean_token_loss(self, model, windows, reduction):
        logits = model(windows[:, :-1])
        losses = F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten(), reduction="none")
        per_window = losses.view(len(windows), -1).mean(1)
        return per_window.sum() if reduction == "sum" else per_window.mean()

    def loss(self, model, batch):
        (windows,) = batch
        return self._mean_token_loss(model, windows, "sum")

    def evaluate(self, model):
        with torch.no_grad():
            loss = self._mean_token_loss(model, self.held_out, "mean").item()
            on_train = self._mean_token_loss(model, self.train_probe, "mean").item()
        perplexity = math.inf if loss > 709 else math.exp(loss)  # past 709 exp overflows a float
        return {"eval_loss": loss, "perplexity": perplexity, "train_windows_loss": on_train}

    def samples_to_units(self):
        return ("tokens", CONTEXT)
