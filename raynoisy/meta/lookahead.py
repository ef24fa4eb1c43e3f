"""Functional look-ahead: K virtual optimizer steps on fast weights, leaving the real model untouched.

Why functional: the meta-gradient differentiates an outer loss through the inner update, so the updated
weights must be ordinary tensors in the autograd graph. The reference codes swap ``param.data`` or rebuild
the model every step; that does not compose with DDP (``torch.func`` cannot run on the wrapper, and
swapped ``.data`` is invisible to autograd). Here the weights live in a ``dict[str, Tensor]`` keyed like
``named_parameters()`` of the unwrapped module and are evaluated with ``torch.func.functional_call``.

Why the real optimizer's rule: the hypergradient is only the gradient of the meta objective if the
virtual step is the step the optimizer would take. ``ParamRule`` reads lr (the current, scheduled one),
momentum, dampening, weight decay, nesterov and maximize from the parameter's group, and the momentum
buffer from the optimizer state, and applies ``torch.optim.SGD``'s update with the same tensor operations
in the same order, out of place. Parameters the optimizer does not hold, or with ``requires_grad=False``,
are constants.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel

from raynoisy.meta.batchnorm import BNPolicy, forward_buffers

Rule = Literal["optimizer", "sgd-plain"]
InnerLoss = Callable[[dict[str, Tensor], int], Tensor]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper: ``torch.func`` cannot run on the wrapper; names drop ``module.``."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@dataclass(frozen=True)
class ParamRule:
    """How one parameter moves in one SGD step: its group's hyper-parameters and its momentum buffer."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    buffer: Tensor | None = None

    def apply(self, weight: Tensor, grad: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(w', buffer')`` exactly as ``torch.optim.SGD`` computes them, without mutating anything."""
        d = -grad if self.maximize else grad
        if self.weight_decay != 0:
            d = d.add(weight, alpha=self.weight_decay)
        buffer = self.buffer
        if self.momentum != 0:
            buffer = d if buffer is None else buffer.mul(self.momentum).add(d, alpha=1 - self.dampening)
            d = d.add(buffer, alpha=self.momentum) if self.nesterov else buffer
        return weight.add(d, alpha=-self.lr), buffer

    def grad_coefficient(self) -> float:
        """``c`` with ``dw'/dg = -c·I`` for the next step: what MLC's proxy and discount scale by.

        A fresh buffer is ``d`` itself (no dampening), so the coefficient depends on whether one exists.
        """
        sign = -1.0 if self.maximize else 1.0
        if self.momentum == 0:
            return self.lr * sign
        carried = 1.0 if self.buffer is None else 1.0 - self.dampening
        scale = 1.0 + self.momentum * carried if self.nesterov else carried
        return self.lr * scale * sign


def update_rules(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    rule: Rule = "optimizer",
    lr: float | None = None,
) -> dict[str, ParamRule]:
    """The per-parameter update of the next real step, keyed by parameter name; trainable names only.

    ``rule="optimizer"`` copies the SGD optimizer's groups and momentum buffers; ``rule="sgd-plain"``
    is ``w - lr·g`` (the fast-weight step of MW-Net's and MetaLabelNet's references), with lr from the
    optimizer's groups unless ``lr`` is given, in which case ``optimizer`` may be None (every trainable
    parameter then moves). ``lr`` overrides the group lr in both rules. Reading the state never inserts
    into it.
    """
    if rule not in ("optimizer", "sgd-plain"):
        raise ValueError(f"rule must be 'optimizer' or 'sgd-plain', got {rule!r}")
    module = unwrap_model(model)
    trainable = {id(p): name for name, p in module.named_parameters() if p.requires_grad}
    if optimizer is None:
        if rule != "sgd-plain" or lr is None:
            raise ValueError("without an optimizer, pass rule='sgd-plain' and an explicit lr")
        return {name: ParamRule(lr=lr) for name in trainable.values()}
    if rule == "optimizer" and not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"rule='optimizer' reproduces torch.optim.SGD, got {type(optimizer).__name__}")
    rules: dict[str, ParamRule] = {}
    for group in optimizer.param_groups:
        group_lr = float(group["lr"]) if lr is None else lr
        for p in group["params"]:
            name = trainable.get(id(p))
            if name is None:
                continue
            if rule == "sgd-plain":
                rules[name] = ParamRule(lr=group_lr)
                continue
            rules[name] = ParamRule(
                lr=group_lr,
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group.get("maximize", False)),
                buffer=optimizer.state.get(p, {}).get("momentum_buffer"),
            )
    return rules


def virtual_step(
    params: Mapping[str, Tensor], grads: Mapping[str, Tensor | None], rules: Mapping[str, ParamRule]
) -> tuple[dict[str, Tensor], dict[str, ParamRule]]:
    """One SGD step on a parameter dict: the new weights and the rules carrying the new buffers.

    A parameter without a gradient is not stepped (weight decay and momentum included), as in SGD.
    """
    new_params, new_rules = dict(params), dict(rules)
    for name, param_rule in rules.items():
        grad = grads.get(name)
        if grad is None:
            continue
        new_params[name], buffer = param_rule.apply(params[name], grad)
        new_rules[name] = replace(param_rule, buffer=buffer)
    return new_params, new_rules


def lookahead(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    inner_loss: InnerLoss,
    *,
    steps: int = 1,
    create_graph: bool = True,
    rule: Rule = "optimizer",
    lr: float | None = None,
) -> dict[str, Tensor]:
    """Fast weights after ``steps`` virtual steps on ``inner_loss(params, step)``.

    Second order (``create_graph=True``): the fast weights are differentiable w.r.t. everything the inner
    loss depends on (meta-net parameters, the initial weights). First order: each inner gradient is a
    constant, so only the explicit dependence on the weights (``w - lr·d``, weight decay, momentum)
    carries gradient. The momentum buffer evolves across the virtual steps as it would across real ones.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    module = unwrap_model(model)
    rules = update_rules(module, optimizer, rule=rule, lr=lr)
    names = list(rules)
    fast: dict[str, Tensor] = dict(module.named_parameters())
    for step in range(steps):
        loss = inner_loss(fast, step)
        grads = torch.autograd.grad(
            loss, [fast[n] for n in names], create_graph=create_graph, allow_unused=True
        )
        fast, rules = virtual_step(fast, dict(zip(names, grads, strict=True)), rules)
    return fast


def functional_forward(
    model: nn.Module,
    params: Mapping[str, Tensor],
    x: Any,
    *,
    bn: BNPolicy | str = BNPolicy.FROZEN_BUFFERS,
) -> Any:
    """``model(x)`` evaluated at ``params`` (by contract ``(logits, features)``), buffers per ``bn``."""
    module = unwrap_model(model)
    return functional_call(module, (dict(params), forward_buffers(module, bn)), (x,))
