"""1-bit Adam's step (Tang et al., 2021): the momentum is exchanged, not the gradient.

Compressing gradients in signs and handing them to Adam fails twice over: Adam's variance,
estimated from values of one magnitude, no longer scales each coordinate, and the sign
error is re-normalised into full-size steps. 1-bit Adam lets Adam run uncompressed through
a warm-up, then freezes the variance ``v``. From there Adam is a momentum method with a
fixed per-coordinate scale, and the momentum, which changes slowly, is what is compressed
with error feedback. With D = sqrt(v / (1 - beta2^W)) + eps, the same on every member:

    member i sends   c_i = (beta1 * m / N + (1 - beta1) * g_i) / D    (g_i sum to the gradient)
    all receive      u   = sum_i c_i = (beta1 * m + (1 - beta1) * g) / D   (up to compression)
    and keep         m   = u * D,   p -= lr * u / (1 - beta1^t)

with AdamW's decoupled weight decay (Adam's with ``decoupled_weight_decay=True`` too), or
Adam's L2 term added to the gradient once. The optimizer's own state (``exp_avg``,
``exp_avg_sq``, ``step``) is used and kept as torch keeps it, so a heal or a checkpoint
carries it unchanged.

What travels is the momentum divided by D (the paper sends m itself; the sum is the same,
as D is frozen). Signs give every coordinate the mean magnitude of the tensor encoded; in
units of m, a coordinate whose variance is near 0 (charlm's attention key bias, whose
gradient is 0 in exact arithmetic) would then be divided by about eps and step without
bound (in a prototype that sent m, its norm went from 0 to 130 in 8 steps). In units of
the update, each coordinate moves by the mean size of the members' updates at most,
whatever its variance.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from shoal.config import ConfigError

__all__ = ["check_supported", "onebit_adam_step", "uses_momentum_exchange"]


def uses_momentum_exchange(optimizer: torch.optim.Optimizer) -> bool:
    """Adam and AdamW: the optimizers 1-bit Adam is written for."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def check_supported(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for option in ("amsgrad", "maximize"):
            if group.get(option):
                raise ConfigError("--compress", f"onebit with Adam (1-bit Adam) does not support "
                                  f"the optimizer's {option}=True")


@torch.no_grad()
def onebit_adam_step(optimizer: torch.optim.Optimizer,
                     exchange: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor],
                     members: int, frozen_at: int,
                     refresh: Callable[[torch.Tensor], torch.Tensor] | None = None,
                     refresh_spans: int = 1) -> None:
    """One step. ``exchange(flat, parameters)`` sums the members' contributions, laid end to
    end in the order of ``parameters`` (compressed); ``frozen_at`` is the number of steps the
    variance stands for, this step's refresh included: the warm-up's, then ``refresh_spans``
    per refresh. ``refresh(flat)``, when given, sums the members' gradients (in int8), and the
    variance takes them in for the ``refresh_spans`` steps since the last refresh, as Adam's
    would have had each of those steps brought this gradient:

        v = beta2^R v + (1 - beta2^R) g^2,   R = refresh_spans

    then it is frozen again. Weighting a refresh as one step instead (v = beta2 v + ...)
    lets the warm-up's few early, large gradients outweigh the refreshes for most of a run.

    Every collective comes before any state changes, so a step that fails in one (a member
    died) leaves the optimizer as it was, for the redo."""
    pairs = [(group, p) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    for _, p in pairs:
        if "exp_avg_sq" not in optimizer.state[p]:
            raise RuntimeError("1-bit Adam needs the variance of a warm-up: a parameter has no Adam state")
    gradients = []
    for group, p in pairs:
        gradient = p.grad
        if group["weight_decay"] and not _decoupled(optimizer, group):
            # Adam's L2 term, added once over the members
            gradient = gradient + p * (group["weight_decay"] / members)
        gradients.append(gradient)
    variances = [optimizer.state[p]["exp_avg_sq"] for _, p in pairs]
    if refresh is not None:
        summed = refresh(torch.cat([g.reshape(-1) for g in gradients]))
        summed = summed.split([p.numel() for _, p in pairs])
        kept = [group["betas"][1] ** refresh_spans for group, _ in pairs]
        variances = [v * k + (g.view_as(v) ** 2) * (1 - k) for v, g, k in zip(variances, summed, kept)]
    denominators, contributions = [], []
    for (group, p), gradient, variance in zip(pairs, gradients, variances):
        beta1, beta2 = group["betas"]
        denominator = (variance.sqrt() / math.sqrt(1 - beta2 ** frozen_at)).add_(group["eps"])
        denominators.append(denominator)
        contribution = optimizer.state[p]["exp_avg"] * (beta1 / members) + gradient * (1 - beta1)
        contributions.append((contribution / denominator).reshape(-1))
    direction = exchange(torch.cat(contributions), [p for _, p in pairs])
    offset = 0
    for (group, p), denominator, variance in zip(pairs, denominators, variances):
        beta1, _ = group["betas"]
        state = optimizer.state[p]
        update = direction[offset: offset + p.numel()].view_as(p)
        offset += p.numel()
        if refresh is not None:
            state["exp_avg_sq"].copy_(variance)
        state["exp_avg"].copy_(update * denominator)
        state["step"] += 1
        lr = group["lr"]
        if _decoupled(optimizer, group):
            p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-lr / (1 - beta1 ** float(state["step"])))


def _decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """AdamW's weight decay, or Adam's with ``decoupled_weight_decay=True`` (which recent
    torch's AdamW is): applied to the parameters, not added to the gradient."""
    return bool(group.get("decoupled_weight_decay")) or isinstance(optimizer, torch.optim.AdamW)
