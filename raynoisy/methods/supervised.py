"""The part every method shares: one main model trained with SGD on a per-iteration schedule.

Methods compose this rather than inherit behaviour they do not use: it holds the DDP-wrapped model
(``model``) for plain steps (``step``), the bare module (``net``) for evaluation, functional calls and
the meta methods' real steps (``apply_grads`` with gradients they synchronised themselves), the
optimizer, the schedule, and their checkpoint state.

A method that never takes a plain step builds it with ``ddp=False``: DDP would allocate gradient buckets
as large as the model and register hooks that never fire, since ``torch.autograd.grad`` bypasses them.
The weights are then broadcast from rank 0 once, as DDP's constructor would have done.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from raynoisy.meta.sync import broadcast_, world_size
from raynoisy.methods.base import MethodContext
from raynoisy.methods.optim import build_scheduler, build_sgd


class MainModel:
    """Main network + SGD + per-iteration lr schedule, identical on every rank."""

    def __init__(self, ctx: MethodContext, epochs: int | None = None, *, ddp: bool = True) -> None:
        self.ctx = ctx
        self.net = ctx.build_backbone()
        self.ddp = ddp
        if ddp:
            self.model = ctx.wrap_ddp(self.net)
        else:
            self.model = self.net
            broadcast_([*self.net.parameters(), *self.net.buffers()])
        self.epochs = epochs or ctx.cfg.optim.epochs
        self.reset_optimizer()

    def reset_optimizer(self) -> None:
        """Fresh optimizer state and a schedule that starts again from the base lr."""
        self.optimizer = build_sgd(self.net.parameters(), self.ctx.cfg.optim)
        self.scheduler = build_scheduler(
            self.optimizer, self.ctx.cfg.optim, self.ctx.steps_per_epoch, self.epochs
        )

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def step(self, loss: torch.Tensor) -> None:
        """Backward through DDP (gradients averaged over ranks), optimizer step, schedule step."""
        if not self.ddp and world_size() > 1:
            raise RuntimeError(
                "this main model was built with ddp=False, so a plain backward would leave each rank with "
                "its own gradients: synchronise them and call apply_grads, or build it with ddp=True"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def cross_entropy_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """One plain cross-entropy step: the CE baseline, GLC's phase 1, MetaLabelNet's warm-up."""
        logits, _ = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.step(loss)
        return {"loss": float(loss.detach())}

    def apply_grads(self, grads: list[torch.Tensor]) -> None:
        """Real step from gradients that are already averaged over ranks (meta methods)."""
        for p, g in zip(self.net.parameters(), grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {
            "net": self.net.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
