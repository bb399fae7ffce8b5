"""``zero``: parameters, gradients and optimizer state sharded across the members (ZeRO-3),
with torch's FSDP2 (``fully_shard``).

Each member keeps 1/N of every parameter, of its gradient and of its optimizer state;
FSDP2 all-gathers a block's parameters just before it runs and reduce-scatters its
gradients after. Gradients are SUMMED (each member's loss is already divided by the
global batch, as for allreduce), so the result equals allreduce's up to the order of the
additions. (gloo has no pre-multiplied sum: FSDP2 is told to use a plain SUM with a
divide factor of 1.)

Each shard lives on ``--zero-replicas R`` members (default 2): the members form replica
groups as in HSDP (a 2-D mesh, shards across a group, groups replicating each other), each
member holding 1/(N/R) of the state. Replicas compute the same update from the same summed
gradient, so keeping them costs an all-reduce of gradient shards, no state transfer. When
members leave or join, the new generation rebuilds the committed state from the shards the
members still hold, one live copy of each (``shoal.runtime.reshard``), and re-shards it
over the new members; no step is lost. Only when every copy of some shard died (or with
``R = 1``) do the members go back to the newest checkpoint and redo the steps since.
"""

from __future__ import annotations

import collections
import copy
import gc
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from shoal.strategies.api import Strategy, _generation_timeout, register

__all__ = ["HeldShards", "Layout", "Zero", "mesh_shape", "replica_grid"]

log = logging.getLogger(__name__)


def replica_grid(host_keys: list[str], groups: int, shards: int) -> list[list[int]]:
    """The ranks as a (replica groups, shards) grid, rows filled host by host (hosts in the
    order their first rank comes): a shard's copies, a column, then sit on different hosts
    wherever the hosts' sizes allow, so that losing one host loses no shard, and a replica
    group is a host where it can be (HSDP's layout: shard within a host, replicate across).
    By rank instead, workers whose ids alternate between two hosts (two launchers joining a
    standalone coordinator at once) had both copies of every shard on one host: a cut host
    took half the shards with it."""
    first = {}
    for rank, key in enumerate(host_keys):
        first.setdefault(key, rank)
    order = sorted(range(len(host_keys)), key=lambda rank: (first[host_keys[rank]], rank))
    return [order[group * shards:(group + 1) * shards] for group in range(groups)]


def mesh_shape(members: int, replicas: int) -> tuple[int, int]:
    """(replica groups, shards per group) for ``members``: as many shards as keeps each one on
    at least ``replicas`` members in equal groups (3 members and R=2: 1 shard on all 3)."""
    shards = max(d for d in range(1, members + 1) if members % d == 0
                 and (members // d >= replicas or d == 1))
    return members // shards, shards


@dataclass(frozen=True, slots=True)
class Layout:
    """How the state was cut: built in ``generation``, ``shards`` pieces, this member's ``index``."""

    generation: int
    shards: int
    index: int

    def rows(self, length: int, index: int | None = None) -> slice:
        """The rows of a dim-0 length ``length`` that shard ``index`` holds (FSDP2 cuts as
        ``torch.chunk``: ceil(length / shards) rows each, the last ones shorter or empty)."""
        index = self.index if index is None else index
        size = math.ceil(length / self.shards)
        return slice(min(index * size, length), min((index + 1) * size, length))


@dataclass(slots=True)
class HeldShards:
    """This member's part of the committed state of an earlier generation: each parameter's
    and each optimizer state tensor's local shard (``param/NAME``, ``optim/NAME/KEY``), the
    module's buffers (``buffer/NAME``, whole), and the optimizer's plain values."""

    layout: Layout
    tensors: dict[str, torch.Tensor]
    sharded: set[str]
    """Keys cut along dim 0 (the rest, such as Adam's step count, are whole on every member)."""
    values: dict[str, object]


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
        self._initial = model
        """The caller's model, left as it is: the starting state of a new job."""
        self._template = _meta_template(model)
        self._on_cuda = next(model.parameters()).is_cuda
        self.layout: Layout | None = None
        """How this generation's module is cut (None before the first ``setup``)."""
        self.replica_groups = 1
        """Members holding each shard in this generation."""
        self.held: HeldShards | None = None
        """The committed state's shards of the last layout, until this generation holds it."""
        self.held_next: HeldShards | None = None
        """Beside ``held``, the same shards one step on, when this member's agreement on that
        step broke: the step it may have missed (``teardown``)."""
        self._agreeing = False
        """Between ``agree`` and the update: this member entered the agreement and has not
        applied the step."""

    @property
    def replicated(self) -> bool:
        """Each shard is meant to live on several members (``--zero-replicas`` above 1)."""
        return self.options.zero_replicas > 1

    def setup(self, host_key):
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = "cuda" if self._on_cuda else "cpu"
        groups, shards = mesh_shape(dist.get_world_size(), self.options.zero_replicas)
        self.replica_groups = groups
        index = dist.get_rank() % shards
        if groups == 1:
            mesh = init_device_mesh(device, (shards,))
        else:  # HSDP: shards across dim 1, replica groups along dim 0, placed by host
            keys = [None] * dist.get_world_size()
            dist.all_gather_object(keys, host_key)
            grid = replica_grid(keys, groups, shards)
            mesh = DeviceMesh(device, torch.tensor(grid), mesh_dim_names=("replicate", "shard"))
            index = next(row.index(dist.get_rank()) for row in grid if dist.get_rank() in row)
            _time_out_like_the_generation(mesh, device)
        if dist.get_rank() == 0 and groups * shards > 1:
            log.info("zero: %d shard(s), each on %d member(s)", shards, groups)
        # Always a new module, never the caller's sharded in place: a sharded module refers
        # to its generation's process groups, and the caller holds its model for good.
        self.model = copy.deepcopy(self._template).to_empty(device=device)
        blocks = [child for module in self.model.modules() if isinstance(module, nn.ModuleList)
                  for child in module]
        for module in [*blocks, self.model]:
            fully_shard(module, mesh=mesh)
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
        first = self.layout is None
        self.layout = Layout(self.generation, shards, index)
        with torch.no_grad():  # buffers are whole on every member (a rebuild or load updates them)
            for name, buffer in self.model.named_buffers():
                buffer.copy_(self._initial.get_buffer(name))
        if first:
            for name, parameter in self._initial.named_parameters():
                self.load_whole(f"param/{name}", parameter.detach(), sharded=parameter.dim() > 0)
        self._point_optimizer_at(self.model)  # fully_shard made new parameters
        return self.model

    def _point_optimizer_at(self, module: nn.Module) -> None:
        """The optimizer holds ``module``'s parameters, with empty state (the same object)."""
        names = {id(p): name for known in (self._initial, self._template, self.model)
                 for name, p in known.named_parameters()}
        _move_optimizer(self.optimizer, names, module)

    def _take_shards(self, *, own: bool = False) -> HeldShards:
        """This member's shards of the committed state (plain local tensors: they outlive the
        process group that the module's DTensors refer to; views of the module's unless
        ``own``)."""
        def local(tensor: torch.Tensor) -> torch.Tensor:
            return _local(tensor).clone() if own else _local(tensor)

        tensors, sharded, values = {}, set(), {}
        for name, parameter in self.model.named_parameters():
            tensors[f"param/{name}"] = local(parameter.detach())
            if parameter.dim():
                sharded.add(f"param/{name}")
            for key, value in self.optimizer.state.get(parameter, {}).items():
                entry = f"optim/{name}/{key}"
                if not torch.is_tensor(value):
                    values[entry] = value  # plain numbers
                    continue
                tensors[entry] = local(value)
                if hasattr(value, "to_local") and value.dim():
                    sharded.add(entry)
        for name, buffer in self.model.named_buffers():
            tensors[f"buffer/{name}"] = local(buffer.detach())
        return HeldShards(self.layout, tensors, sharded, values)

    def _take_next_shards(self) -> HeldShards | None:
        """This member's shards one step on: the step whose agreement broke here.

        If the agreement completed on any member, every member had entered it, and so had
        its reduced gradient shard whole; the ones it completed on applied the step. Applying
        it here too (local arithmetic on the shards, no collective) lets the next generation
        take the step from whichever members hold it, instead of going back a step (or, when
        the members ahead do not cover every shard, to the last checkpoint). Kept only on
        this path, so the copy of the state it needs costs nothing in a healthy run. The
        rebuild uses it only where some member really applied the step (``reshard``)."""
        try:
            self.optimizer.step()
        except Exception as error:  # noqa: BLE001  (the rebuild goes back a step without it)
            log.warning("zero: could not apply the step whose agreement broke (%s: %s)",
                        type(error).__name__, error)
            return None
        return self._take_shards()

    def whole_shapes(self) -> dict[str, tuple[list[int], str, bool]]:
        """For each held tensor: its whole shape, dtype and whether it is cut along dim 0."""
        held = self.held
        shapes = {}
        for key, tensor in held.tensors.items():
            cut = key in held.sharded
            whole = self._template.get_parameter(key.split("/")[1]).shape if cut else tensor.shape
            shapes[key] = (list(whole), str(tensor.dtype).removeprefix("torch."), cut)
        return shapes

    def load_whole(self, key: str, whole: torch.Tensor, sharded: bool) -> None:
        """Put this generation's part of ``whole`` (the tensor ``key`` of ``whole_shapes``)
        into the module or the optimizer's state: its shard if ``sharded``, else all of it."""
        kind, name, *entry = key.split("/", 2)
        part = whole[self.layout.rows(whole.shape[0])] if sharded else whole
        if kind == "buffer":
            with torch.no_grad():
                self.model.get_buffer(name).copy_(part)
            return
        parameter = self.model.get_parameter(name)
        if kind == "param":
            with torch.no_grad():
                _local(parameter).copy_(part)
        elif sharded:  # shaped and cut like its parameter (Adam's moments)
            value = torch.zeros_like(parameter.detach())
            _local(value).copy_(part)
            self.optimizer.state[parameter][entry[0]] = value
        else:
            self.optimizer.state[parameter][entry[0]] = part.clone()

    def load_values(self, values: dict[str, object]) -> None:
        """The optimizer's plain (non-tensor) state values, as the source member held them."""
        for key, value in values.items():
            _, name, entry = key.split("/", 2)
            self.optimizer.state[self.model.get_parameter(name)][entry] = value

    def backward(self, loss):
        loss.backward()
        # What this member hands to FSDP's collectives: its shard to the all-gathers of the
        # forward and the backward pass, its whole gradient to the reduce-scatter, and (with
        # replica groups) its gradient shard to the all-reduce among the replicas.
        shard = sum(_local(p).numel() * p.element_size() for p in self.model.parameters())
        whole = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.count_bytes((3 if self.replica_groups > 1 else 2) * shard + whole)

    def agree(self, step):
        if self.replica_groups > 1:
            # Every member has its reduced gradient before any member applies it. Replica
            # pairs finish a step's all-reduces independently: a link cut that let one pair's
            # last all-reduce through and not another's left the survivors a step apart, each
            # holding only its own shards of its own step, and no step was whole (a zero chaos
            # trial lost its job so). A member now applies the step only if all got this far.
            # A cut inside this one-number all-reduce leaves some members ahead by the step;
            # the others can still apply it (``_take_next_shards``).
            self._agreeing = True
            dist.all_reduce(torch.zeros(1))
            self.count_bytes(4)

    def step(self, step, last):
        self.optimizer.step()
        self._agreeing = False
        return True

    def teardown(self):
        """Keep this member's shards aside as plain tensors (not again after a rebuild that
        broke half-way: those shards are the committed ones), and drop the module and the
        optimizer's hold on its DTensors, which refer to the generation's process groups."""
        if self.layout is not None:
            if self.held is None:
                self.held = self._take_shards(own=self._agreeing)
                if self._agreeing:
                    self.held_next = self._take_next_shards()
            self._agreeing = False
            self._point_optimizer_at(self._template)
            self.model = self._template
        _forget_dtensor_caches()
        gc.collect()

    def forget_held(self) -> None:
        """This generation holds the committed state now."""
        self.held = self.held_next = None
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


def _time_out_like_the_generation(mesh, device: str) -> None:
    """The mesh's sub-groups get torch's default timeout: give them the generation's."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    timeout = _generation_timeout(device)
    for dimension in range(mesh.ndim):
        _set_pg_timeout(timeout, mesh.get_group(dimension))


def _forget_dtensor_caches() -> None:
    """DTensor caches sharding and redistribution plans by spec, and a spec holds its device
    mesh, which holds the mesh's process groups: while any cache does, the groups' sockets
    stay open after the generation is destroyed, and a member still waiting in a collective
    on one of them waits for its timeout instead of seeing the peer gone (5 s instead of
    0.5 s to recover from a death, measured)."""
    from torch.distributed.tensor import DTensor, _collective_utils, _redistribute, debug

    # Private caches, named as in torch 2.13; an older torch may lack some of them.
    clears = [lambda: debug._clear_sharding_prop_cache(),
              lambda: DTensor._op_dispatcher.sharding_propagator._propagate_tensor_meta_cached.cache_clear(),
              lambda: _redistribute._gen_transform_infos.cache_clear(),
              lambda: _redistribute._planner_cache.clear(),
              lambda: _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()]
    for clear in clears:
        try:
            clear()
        except AttributeError:
            pass


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
