"""The one-step hypergradient when the meta model reaches the main model only through its output loss.

MW-Net (per-sample weights), MLC (corrected labels) and MetaLabelNet (soft labels) share one structure:
the training loss is L(w, α) = ℓ(z(w), α) + r(w), where z(w) are the main network's logits on the noisy
batch, ℓ is a cheap function of those logits and of the meta model's output (α), and r does not depend
on α (MLC's clean half). One SGD step is w' = a - c ⊙ ∇_w L, with a and the per-parameter coefficient c
independent of α (``ParamRule.grad_coefficient``), so with gw' = ∇L_gold(w') held constant

    dL_gold(w')/dα = -∂/∂α ⟨∇_w L(w, α), c ⊙ gw'⟩ = -∂/∂α ⟨∂ℓ/∂z (z, α), J_z (c ⊙ gw')⟩,

because ∇_w L = J_zᵀ ∂ℓ/∂z + ∇r and ∇r does not move with α. J_z v is a Jacobian-vector product: one
forward-mode pass of the network along v = c ⊙ gw', after which everything is in logit space (a [B, C]
tensor) and the meta-gradient is a backward through ℓ and the meta model only.

Why: ``mlc_hypergrad`` gets the same number from a double backward, the gradient of ⟨g_s(α), c ⊙ gw'⟩
through the graph of the training backward. That costs a backward of the backward (measured ~3x a
forward/backward) and keeps the whole graph of the first backward alive. The forward-mode pass costs
about two forwards, and the training backward needs no graph (``create_graph=False``). Both are exact for
one step; the tests check them against each other and against finite differences.

Synchronisation, as ``mlc_hypergrad``: ∇_w L is averaged over the ranks before the virtual step (every rank
takes the global step), gw' before the product, and the per-rank meta-gradients after it; the global
loss is the mean of the ranks' losses, so the mean of the ranks' meta-gradients is the global one.

BatchNorm: the training forward is the real one (``BNPolicy.UPDATE``, running statistics move once per
step); the forward-mode pass and the gold forward at w' see buffer copies. In train mode the
forward-mode pass normalises with the same batch statistics as the training forward, and their
dependence on w is part of J_z.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd import forward_ad

from raynoisy.meta.batchnorm import BNPolicy
from raynoisy.meta.hypergrad import (
    Loss,
    gold_after_step,
    gold_loss_and_gradient,
    identity_hessian_discount,
    synced_meta_grads,
)
from raynoisy.meta.lookahead import functional_forward, unwrap_model, update_rules
from raynoisy.meta.sync import all_reduce_mean_

# ℓ(logits, features): the part of the training loss that depends on the meta model. ``features`` come
# detached: a meta model may read them (MLC's corrector) but no gradient flows back into the main model.
OutputLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class OutputHypergradient:
    """One meta step's results; every value is a rank mean except ``logits`` and ``features``.

    ``train_grads``: ∇_w L(w, α) by parameter name, synchronised, ready to be the real step's gradient.
    ``logits`` and ``features``: this rank's training forward (``logits`` keeps its graph when
    ``keep_graph``), so a method can take its real step with an updated meta model without another
    forward (``output_grads``). ``discount``: MLC's γ, only with ``with_discount`` (K-step windows).
    """

    meta_grads: list[Tensor]
    train_grads: dict[str, Tensor]
    train_loss: Tensor
    gold_loss_after: Tensor
    logits: Tensor
    features: Tensor
    discount: Tensor | None = None


def logit_gradient(
    loss: OutputLoss, logits: Tensor, features: Tensor, *, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """ℓ and ∂ℓ/∂z at the logits (as a detached leaf); the gradient has a graph to α if ``create_graph``."""
    leaf = logits.detach().requires_grad_()
    with torch.enable_grad():
        value = loss(leaf, features.detach())
        (grad,) = torch.autograd.grad(value, leaf, create_graph=create_graph)
    return value.detach().clone(), grad


def output_grads(
    model: nn.Module,
    logits: Tensor,
    grad_logits: Tensor,
    *,
    retain_graph: bool = False,
    group: dist.ProcessGroup | None = None,
) -> list[Tensor | None]:
    """J_zᵀ ∂ℓ/∂z through ``logits``' graph, one entry per parameter of ``model``, rank-averaged.

    The real step of a method whose meta model changed after the training forward: the new ∂ℓ/∂z goes
    back through the graph that forward left, instead of a second forward. Frozen parameters
    (``requires_grad=False``) and parameters the logits do not reach get None, in ``parameters()`` order,
    as ``MainModel.apply_grads`` expects.
    """
    weights = list(unwrap_model(model).parameters())
    trainable = [p for p in weights if p.requires_grad]
    grads = torch.autograd.grad(logits, trainable, grad_logits, retain_graph=retain_graph, allow_unused=True)
    all_reduce_mean_([g for g in grads if g is not None], group)
    by_param = {id(p): g for p, g in zip(trainable, grads, strict=True)}
    return [by_param.get(id(p)) for p in weights]


def jvp(model: nn.Module, params: dict[str, Tensor], tangents: dict[str, Tensor], x: Tensor) -> Tensor:
    """J_z v: the directional derivative of the logits ``model(x)[0]`` at ``params`` along ``tangents``.

    Forward-mode AD with buffer copies (the real running statistics never see the pass). Parameters
    without a tangent are constants.
    """
    with torch.no_grad(), forward_ad.dual_level():
        duals = {
            name: forward_ad.make_dual(p.detach(), tangents[name]) if name in tangents else p.detach()
            for name, p in params.items()
        }
        logits = functional_forward(model, duals, x, bn=BNPolicy.FROZEN_BUFFERS)[0]
        tangent = forward_ad.unpack_dual(logits).tangent
    return torch.zeros_like(logits) if tangent is None else tangent


def output_hypergrad(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    meta_loss: OutputLoss,
    gold_loss: Loss,
    meta_params: Sequence[Tensor],
    *,
    rest_loss: Loss | None = None,
    keep_graph: bool = False,
    with_discount: bool = False,
    group: dist.ProcessGroup | None = None,
) -> OutputHypergradient:
    """d L_gold(w') / dα for one virtual step of ``optimizer``'s rule on L = ℓ(z(w), α) + r(w), synchronised.

    ``x``: this rank's noisy batch, z = ``model(x)[0]``; ``meta_loss``: ℓ(logits, features); ``rest_loss``:
    r(params), the α-free part of the training loss (evaluated by the caller's functional forwards), or
    None; ``gold_loss``: L_gold(params). To step with plain SGD at some lr, pass a state-less
    ``torch.optim.SGD`` over the model's parameters. ``with_discount`` also returns MLC's γ (one more
    gold forward/backward at w). Steps: [gw = ∇L_gold(w)] → z, g = ∇_w L(w) (no graph) → w' → gw' =
    ∇L_gold(w') → u = J_z (c ⊙ gw') → meta_grads = ∇_α[-⟨∂ℓ/∂z(z, α), u⟩].
    """
    module = unwrap_model(model)
    params = dict(module.named_parameters())
    rules = update_rules(module, optimizer)
    names = list(rules)
    weights = [params[n] for n in names]

    gold_before = gold_loss_and_gradient(gold_loss, params, names)[1] if with_discount else None
    logits, features = functional_forward(module, params, x, bn=BNPolicy.UPDATE)
    train_loss, grad_logits = logit_gradient(meta_loss, logits, features, create_graph=True)
    # ∇_w L = J_zᵀ ∂ℓ/∂z (+ ∇r): one backward through the network with ∂ℓ/∂z as the logits' gradient.
    outputs, grad_outputs = [logits], [grad_logits.detach()]
    if rest_loss is not None:
        rest = rest_loss(params)
        outputs.append(rest)
        grad_outputs.append(torch.ones_like(rest))
        train_loss = train_loss + rest.detach()
    grads = torch.autograd.grad(outputs, weights, grad_outputs, retain_graph=keep_graph, allow_unused=True)
    train_grads = {n: g for n, g in zip(names, grads, strict=True) if g is not None}
    all_reduce_mean_([*train_grads.values(), train_loss, *(gold_before or [])], group)

    gold = gold_after_step(params, train_grads, rules, gold_loss, group)
    tangents = {
        n: c * g for n, g, c in zip(names, gold.grads, gold.coefficients, strict=True) if n in train_grads
    }
    u = jvp(module, params, tangents, x)
    meta_grads = synced_meta_grads(-(grad_logits * u).sum(), meta_params, group)

    discount = None
    if gold_before is not None:
        discount = identity_hessian_discount(gold_before, gold.grads, gold.coefficients)
    return OutputHypergradient(
        meta_grads=meta_grads,
        train_grads=train_grads,
        train_loss=train_loss,
        gold_loss_after=gold.loss,
        logits=logits,
        features=features.detach(),
        discount=discount,
    )


@dataclass(frozen=True)
class ExampleAlignment:
    """Each noisy sample's gradient against the trusted gradient, and the training forward it came from.

    ``alignment``: ⟨∇_w ℓ_i(w), ∇_w L_gold(w)⟩ for this rank's samples i (the gold gradient a rank mean);
    ``gold_loss``: L_gold(w) and ``gold_grads``: ∇_w L_gold(w) by trainable parameter name, rank means;
    ``logits`` (graph kept) and ``features``: the training forward, for the real step (``output_grads``).
    """

    alignment: Tensor
    gold_loss: Tensor
    gold_grads: dict[str, Tensor]
    logits: Tensor
    features: Tensor


def example_alignment(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    gold_loss: Loss,
    *,
    group: dist.ProcessGroup | None = None,
) -> ExampleAlignment:
    """How much one SGD step on each noisy sample alone would lower the trusted loss, to first order.

    d L_gold(w - α Σ_i ε_i ∇ℓ_i(w)) / dε_i at ε = 0 is -α ⟨∇ℓ_i(w), ∇L_gold(w)⟩: the online example weights of
    Ren et al. (2018, "Learning to Reweight Examples") are the positive part of these dot products. Every one
    comes from a single forward-mode pass: ℓ_i (cross-entropy under the given label) reaches w only through
    the logits z_i, so ⟨∇_w ℓ_i, g⟩ = ⟨∂ℓ_i/∂z_i, (J_z g)_i⟩, with ∂ℓ_i/∂z_i = softmax(z_i) - onehot(y_i) and
    J_z g one ``jvp`` along the gold gradient g (in train mode, BatchNorm's batch statistics are part of
    J_z, as they are of ∇ℓ_i). Costs the gold forward and backward, the training forward and J.
    """
    module = unwrap_model(model)
    params = dict(module.named_parameters())
    gold_value, gold_grads = gold_gradient(module, gold_loss, group=group)
    logits, features = functional_forward(module, params, x, bn=BNPolicy.UPDATE)
    alignment = alignment_with(module, params, gold_grads, x, logits, labels)
    return ExampleAlignment(alignment, gold_value, gold_grads, logits, features.detach())


def gold_gradient(
    model: nn.Module, gold_loss: Loss, *, group: dist.ProcessGroup | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_gold(w) and ∇_w L_gold(w) by trainable parameter name, both rank means (``gold_loss`` evaluated at
    the model's current parameters)."""
    module = unwrap_model(model)
    params = dict(module.named_parameters())
    names = [n for n, p in params.items() if p.requires_grad]
    value, grads = gold_loss_and_gradient(gold_loss, params, names)
    all_reduce_mean_([*grads, value], group)
    return value, dict(zip(names, grads, strict=True))


def alignment_with(
    model: nn.Module,
    params: dict[str, Tensor],
    direction: dict[str, Tensor],
    x: Tensor,
    logits: Tensor,
    labels: Tensor,
) -> Tensor:
    """⟨∇_w ℓ_i, direction⟩ for each sample of ``x`` (cross-entropy under ``labels``, ``logits`` the forward
    at ``params`` in the model's current mode): ⟨softmax(z_i) - onehot(y_i), (J_z direction)_i⟩."""
    u = jvp(model, params, direction, x)
    with torch.no_grad():
        grad_logits = torch.softmax(logits, dim=1)
        grad_logits[torch.arange(len(labels)), labels] -= 1
        return (grad_logits * u).sum(dim=1)
