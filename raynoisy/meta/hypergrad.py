"""Meta-gradients through a look-ahead, synchronised across ranks.

Two general ways to get the gradient of an outer (clean/gold) loss at the looked-ahead weights w' w.r.t.
meta parameters α, for any inner loss (the methods use the cheaper special case for meta models that act
only through the loss of the logits, ``output_hypergrad``, and these as its test oracles):

- ``lookahead_hypergrad`` (K-step look-ahead, e.g. MLNT): build the fast weights with a differentiable
  K-step look-ahead and differentiate the outer loss evaluated at them.
- ``mlc_hypergrad`` (MLC's dot-product form): no fast-weights forward with a graph. One SGD step is
  affine in the training gradient, w' = a - c ⊙ g_s(α), where a (weights, weight decay, momentum buffer)
  and the per-parameter coefficient c do not depend on α. Hence, with gw' = ∇L_g(w') held constant,
  d L_g(w'(α))/dα = (∂g_s/∂α)ᵀ(-c ⊙ gw') = ∂/∂α [-Σ c·⟨g_s, gw'⟩].
  This is EXACT for the one-step hypergradient as long as gw' is evaluated at the same w' the step
  produces. What MLC approximates is the K-step extension (``MLCHypergradAccumulator``): the Jacobian
  dw_{t+1}/dw_t = I - c·H is taken with the Hessian H ≈ I.

Both use ``torch.autograd.grad`` (never ``.backward()``), so nothing accumulates into the main model's
``.grad`` and no DDP hook fires; both average their results over the ranks with ``sync.all_reduce_mean_``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from raynoisy.meta.lookahead import (
    InnerLoss,
    ParamRule,
    Rule,
    lookahead,
    unwrap_model,
    update_rules,
    virtual_step,
)
from raynoisy.meta.sync import all_reduce_mean_

Loss = Callable[[dict[str, Tensor]], Tensor]


@dataclass(frozen=True)
class Hypergradient:
    """Meta-gradients (rank mean, one per meta parameter) and the outer loss at w' (rank mean, detached)."""

    meta_grads: list[Tensor]
    outer_loss: Tensor


def lookahead_hypergrad(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    inner_loss: InnerLoss,
    outer_loss: Loss,
    meta_params: Sequence[Tensor],
    *,
    steps: int = 1,
    create_graph: bool = True,
    rule: Rule = "optimizer",
    lr: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> Hypergradient:
    """d outer_loss(lookahead(...)) / d meta_params, averaged over ranks in one all-reduce.

    Each rank looks ahead on its own inner batch, so under DDP the result is the mean of the ranks'
    hypergradients (the inner gradient is not all-reduced inside the graph). Meta parameters the outer
    loss does not reach get zeros, so every rank packs the same layout.
    """
    fast = lookahead(model, optimizer, inner_loss, steps=steps, create_graph=create_graph, rule=rule, lr=lr)
    outer = outer_loss(fast)
    meta_grads = list(
        torch.autograd.grad(outer, list(meta_params), allow_unused=True, materialize_grads=True)
    )
    loss = outer.detach().clone()
    all_reduce_mean_([*meta_grads, loss], group)
    return Hypergradient(meta_grads, loss)


@dataclass(frozen=True)
class MLCHypergradient:
    """Everything one MLC meta step produces; all values are rank means and detached.

    ``train_grads`` is g_s = ∇_w L_s by parameter name (parameters without a gradient are absent): the
    method assigns it as the main model's ``.grad`` as is, it is already synchronised. ``gold_grads`` (gw,
    at w) and ``discount`` (γ) exist only when asked for, see ``MLCHypergradAccumulator``.
    """

    meta_grads: list[Tensor]
    train_grads: dict[str, Tensor]
    train_loss: Tensor
    gold_loss_after: Tensor
    gold_grads: dict[str, Tensor] | None
    discount: Tensor | None


def identity_hessian_discount(
    gold_grads: Sequence[Tensor], gold_grads_after: Sequence[Tensor], coefficients: Sequence[float]
) -> Tensor:
    """γ = ⟨(1 - c)·gw', gw⟩ / ‖gw‖², MLC's discount of the previous meta-gradient (Hessian ≈ I).

    ``c`` is each parameter's step coefficient (lr·s in the reference code). γ is 0 when gw is zero
    rather than NaN, so a degenerate gold batch cannot poison the meta-net.
    """
    dot = sum(
        (1 - c) * torch.sum(after * before)
        for before, after, c in zip(gold_grads, gold_grads_after, coefficients, strict=True)
    )
    norm2 = sum(torch.sum(before * before) for before in gold_grads)
    dot, norm2 = torch.as_tensor(dot), torch.as_tensor(norm2)
    return torch.where(norm2 > 0, dot / norm2, torch.zeros_like(dot))


def gold_loss_and_gradient(
    gold_loss: Loss, params: dict[str, Tensor], names: Sequence[str]
) -> tuple[Tensor, list[Tensor]]:
    """L_gold at ``params`` (detached) and its gradient for the parameters ``names`` (zeros where unused)."""
    loss = gold_loss(params)
    grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True, materialize_grads=True)
    return loss.detach().clone(), list(grads)


class GoldAfterStep(NamedTuple):
    """The gold side of a one-step look-ahead, all rank means: gw' in ``rules`` order, L_gold(w'), and c."""

    grads: list[Tensor]
    loss: Tensor
    coefficients: list[float]


def gold_after_step(
    params: dict[str, Tensor],
    train_grads: dict[str, Tensor],
    rules: dict[str, ParamRule],
    gold_loss: Loss,
    group: dist.ProcessGroup | None,
) -> GoldAfterStep:
    """w' = one virtual step on the (synchronised) ``train_grads``; gw' = ∇L_gold(w') averaged over ranks.

    The step runs under no_grad: the dot-product forms differentiate ⟨g(α), c ⊙ gw'⟩ with gw' held
    constant, so w' needs no graph. ``coefficients`` holds each parameter's c (``ParamRule.grad_coefficient``;
    0 for a parameter without a training gradient, which the step does not move).
    """
    names = list(rules)
    with torch.no_grad():
        after, _ = virtual_step(params, train_grads, rules)
    after = {n: t.detach().requires_grad_() if n in rules else t for n, t in after.items()}
    loss, grads = gold_loss_and_gradient(gold_loss, after, names)
    all_reduce_mean_([*grads, loss], group)
    coefficients = [rules[n].grad_coefficient() if n in train_grads else 0.0 for n in names]
    return GoldAfterStep(grads, loss, coefficients)


def synced_meta_grads(
    proxy: Tensor, meta_params: Sequence[Tensor], group: dist.ProcessGroup | None
) -> list[Tensor]:
    """∇_α of a proxy scalar (zeros for meta parameters it does not reach), averaged over ranks."""
    grads = list(torch.autograd.grad(proxy, list(meta_params), allow_unused=True, materialize_grads=True))
    all_reduce_mean_(grads, group)
    return grads


def mlc_hypergrad(
    model: nn.Module,
    optimizer: torch.optim.SGD,
    train_loss: Loss,
    gold_loss: Loss,
    meta_params: Sequence[Tensor],
    *,
    with_discount: bool = False,
    group: dist.ProcessGroup | None = None,
) -> MLCHypergradient:
    """MLC's one-step hypergradient by the dot-product proxy (microsoft/MLC ``step_hmlc_K``).

    ``train_loss(params)`` is L_s(w, α) (corrected-label loss, with the clean half mixed in if the method
    does so); ``gold_loss(params)`` is L_g. Steps: [gw = ∇L_g(w)] → g_s = ∇L_s(w) with graph → w' by the
    optimizer's SGD rule under no_grad → gw' = ∇L_g(w') → meta_grads = ∇_α[-Σ c·⟨g_s, gw'⟩].

    Under DDP the result equals the single-process one on the concatenated (equal-sized) batches: g_s and
    gw are averaged before the look-ahead (every rank takes the same w'), gw' before the proxy, and the
    proxy's gradients after (three flattened all-reduces). ``with_discount`` adds gw and γ, which cost
    one more gold forward/backward; pass ``accumulator.needs_discount``.

    Deliberate differences from the reference code: lr and the other hyper-parameters come from each
    parameter's group (current lr, not ``get_lr()`` nor ``opt.defaults``), and a parameter without a
    momentum buffer steps with buffer = d as torch's SGD does, so its coefficient is lr·(1 + m) with
    nesterov, else lr, where the reference (zero buffer plus dampening) uses lr·(1 + m(1 - τ)) or
    lr·(1 - τ); the two agree when dampening τ = 0, the default.
    """
    module = unwrap_model(model)
    params = dict(module.named_parameters())
    rules = update_rules(module, optimizer)
    names = list(rules)
    weights = [params[n] for n in names]

    gold_before = gold_loss_and_gradient(gold_loss, params, names)[1] if with_discount else None
    loss_s = train_loss(params)
    graph_grads = torch.autograd.grad(loss_s, weights, create_graph=True, allow_unused=True)
    used = {n: g for n, g in zip(names, graph_grads, strict=True) if g is not None}
    train_grads = {n: g.detach().clone() for n, g in used.items()}
    train_loss_value = loss_s.detach().clone()
    all_reduce_mean_([*train_grads.values(), train_loss_value, *(gold_before or [])], group)

    gold = gold_after_step(params, train_grads, rules, gold_loss, group)
    proxy = -sum(
        c * torch.sum(used[n] * g)
        for n, g, c in zip(names, gold.grads, gold.coefficients, strict=True)
        if n in used
    )
    meta_grads = synced_meta_grads(proxy, meta_params, group)

    discount = None
    if gold_before is not None:
        discount = identity_hessian_discount(gold_before, gold.grads, gold.coefficients)
    return MLCHypergradient(
        meta_grads=meta_grads,
        train_grads=train_grads,
        train_loss=train_loss_value,
        gold_loss_after=gold.loss,
        gold_grads=None if gold_before is None else dict(zip(names, gold_before, strict=True)),
        discount=discount,
    )


class MetaStep(NamedTuple):
    """Gradients to assign to the meta parameters, and whether to call the meta optimizer now."""

    grads: list[Tensor]
    step_now: bool


class MLCHypergradAccumulator:
    """MLC's K-step meta-gradient recurrence (microsoft/MLC mlc.py ``step_hmlc_K``, ``--gradient_steps K``).

    Reading of the reference: on every main step t (a global counter, never reset by epochs) the meta
    optimizer's grads are zeroed, the proxy gradient p_t is back-propagated, then
    ``grad_t = p_t + γ_t·dw_prev`` and ``dw_prev = grad_t``; ``meta_opt.step()`` runs only when
    ``(t + 1) % K == 0``, after which ``dw_prev`` is reset to 0. So the meta optimizer sees only every K-th
    grad, which sums the window's proxy gradients discounted by products of later γ's; the grads of the
    other steps are overwritten unused. γ_t of a window's first step multiplies 0, so it is never needed
    there (``needs_discount`` is False and the gold gradient at w can be skipped). K=1 is plain MLC.

    The method owns the meta optimizer: it assigns ``grads`` to the meta parameters' ``.grad`` and steps
    when ``step_now``. The counter and ``dw_prev`` are checkpointed so a resumed run continues the window;
    the reference keeps them in ``args`` and loses them on restart.
    """

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every (K) must be >= 1, got {every}")
        self.every = every
        self._count = 0
        self._prev: list[Tensor] | None = None

    @property
    def needs_discount(self) -> bool:
        """Whether the next ``accumulate`` needs γ (false at the first step of every window)."""
        return self._prev is not None

    def accumulate(self, meta_grads: Sequence[Tensor], discount: Tensor | float | None = None) -> MetaStep:
        """Fold this step's proxy gradients into the window; say whether the meta optimizer steps now."""
        if self._prev is None:
            grads = [g.detach().clone() for g in meta_grads]
        elif discount is None:
            raise ValueError("this step continues a K-step window: pass the discount γ (with_discount=True)")
        else:
            grads = [g.detach() + discount * prev for g, prev in zip(meta_grads, self._prev, strict=True)]
        self._count += 1
        step_now = self._count % self.every == 0
        self._prev = None if step_now else [g.clone() for g in grads]
        return MetaStep(grads, step_now)

    def state_dict(self) -> dict[str, Any]:
        """K, the step counter and dw_prev (None at a window boundary); loadable with weights_only."""
        return {"every": self.every, "count": self._count, "prev": self._prev}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict``; refuses a checkpoint written with another K."""
        if state["every"] != self.every:
            raise ValueError(
                f"checkpoint accumulates over K={state['every']} steps, this run over K={self.every}"
            )
        self._count = int(state["count"])
        self._prev = None if state["prev"] is None else [t.clone() for t in state["prev"]]
