"""``zero``: parameters, gradients and optimizer state sharded across the members (ZeRO-3),
with torch's FSDP2 (``fully_shard``).

Each member keeps 1/N of every parameter, of its gradient and of its optimizer state;
FSDP2 all-gathers a block's parameters just before it runs and reduce-scatters its
gradients after. Gradients are SUMMED (each member's loss is already divided by the
global batch, as for allreduce), so the result equals allreduce's up to the order of the
additions. (gloo has no pre-multiplied sum: FSDP2 is told to use a plain SUM with a
divide factor of 1.)

A shard lives on one member only (``--zero-replicas 1``), so a member's death loses state
that nobody else holds: the commit that survives a membership change is the last
checkpoint. At every new generation the members build a fresh sharded module for the new
member count and load the newest checkpoint into it (``dcp.load`` re-shards), then redo
the steps since. The starting state is checkpointed before the first step, so there is
always one. Keeping each shard on a second member (replica groups as in HSDP) so that a
death costs nothing is the next step; see docs/CHECKPOINTS.md.
"""

from __future__ import annotations

import collections
import copy
import gc

import torch
import torch.distributed as dist
from torch import nn

from shoal.strategies.api import Strategy, register

__all__ = ["Zero"]


def _meta_template(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s structure whose tensors take no memory (device ``meta``)."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def _move_optimizer(optimizer: torch.optim.Optimizer, names: dict[int, str], new: nn.Module) -> None:
    """Point ``optimizer`` at ``new``'s parameters, matched by name (``names``: the name of
    each parameter it holds now, by id), with empty state: the same object, class and
    hyper-parameters, so the caller's reference stays good."""
    parameters = dict(new.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [parameters[names[id(p)]] for p in group["params"]]
    optimizer.state = collections.defaultdict(dict)


@register
class Zero(Strategy):
    name = "zero"
    sharded = True

    def __init__(self, model, optimizer, options=None):
        super().__init__(model, optimizer, options)
        self._template = _meta_template(model)
        self._on_cuda = next(model.parameters()).is_cuda
        self._generations = 0

    def setup(self, host_key):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        on_cuda = self._on_cuda
        names = {id(p): name for name, p in self.model.named_parameters()}
        if self._generations:  # the last generation's shards died with its group: start anew
            self.model = copy.deepcopy(self._template).to_empty(device="cuda" if on_cuda else "cpu")
            gc.collect()
        self._generations += 1
        mesh = init_device_mesh("cuda" if on_cuda else "cpu", (dist.get_world_size(),))
        blocks = [child for module in self.model.modules() if isinstance(module, nn.ModuleList)
                  for child in module]
        for module in [*blocks, self.model]:
            fully_shard(module, mesh=mesh)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        # fully_shard replaced the parameters: the optimizer must hold the new ones.
        _move_optimizer(self.optimizer, names, self.model)
        return self.model

    def backward(self, loss):
        loss.backward()
        # What this member hands to FSDP's collectives: its shard to the all-gathers of the
        # forward and the backward pass, its whole gradient to the reduce-scatter.
        shard = sum(_local(p).numel() * p.element_size() for p in self.model.parameters())
        whole = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.count_bytes(2 * shard + whole)

    def step(self, step, last):
        self.optimizer.step()
        return True

    def teardown(self):
        gc.collect()

    def full_state_dict(self) -> dict:
        """Collective: the whole model's state dict, on every member (CPU)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def plain_model(self, state: dict) -> nn.Module:
        """An unsharded module holding ``state`` (the leader evaluates and saves it)."""
        model = copy.deepcopy(self._template).to_empty(device="cpu")
        model.load_state_dict(state)
        return model


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
