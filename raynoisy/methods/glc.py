"""GLC, Gold Loss Correction (Hendrycks et al., NeurIPS 2018).

Phase 1 trains with cross-entropy on the noisy labels. From the trusted set and the phase-1 model it
estimates the corruption matrix C[i, j] ~ p(noisy = j | true = i) as the mean softmax over trusted
samples of true class i. Phase 2 resets the model to its initial weights and trains on noisy batches
with the forward-corrected loss -log(sum_j p(j|x) C[j, y~]) plus cross-entropy on trusted batches,
both summed and divided by the number of samples in the step.

The phases are the run's two stages, ``noisy`` and ``corrected``, each of ``optim.epochs`` epochs with its
own lr schedule. Unlike the reference code, phase 2 also starts with fresh optimizer state (the reference
carries phase-1 momentum buffers over, an accident of reusing the optimizer object). Only phase-2 models
can be picked as best-validation model.

Outputs: metrics.json's ``noise_transition_estimated`` is C (rows true class, columns given class, the
orientation of the injected and empirical matrices), so the report sets it beside them. Label issues take
the model-prediction path (``Method.label_issue_columns``): cleanlab on the best phase-2 model's softmax,
which estimates the clean class (the forward correction absorbs the noise through C), so a memorised wrong
label does not pull the prediction towards it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from raynoisy.config import Config
from raynoisy.data.batch import cat_inputs
from raynoisy.meta.sync import all_reduce_sum_
from raynoisy.methods import register_method
from raynoisy.methods.base import Batch, Method, MethodContext, Stage
from raynoisy.methods.supervised import MainModel


@register_method
class GoldLossCorrection(Method):
    name = "glc"
    needs_trusted = True

    @classmethod
    def stages(cls, cfg: Config) -> list[Stage]:
        epochs = cfg.optim.epochs
        return [Stage("noisy", epochs, selectable=False), Stage("corrected", epochs)]

    def __init__(self, ctx: MethodContext) -> None:
        super().__init__(ctx)
        self.main = MainModel(ctx, epochs=ctx.cfg.optim.epochs)
        self.initial_state = copy.deepcopy(self.main.net.state_dict())
        self.corruption: torch.Tensor | None = None

    def trusted_batch_size(self, stage: Stage) -> int:
        """Phase 2: trusted samples per step in proportion to the set sizes, like GLC's gold+silver loader."""
        return 0 if stage.name == "noisy" else self.ctx.proportional_trusted_batch

    def on_stage_start(
        self, stage: Stage, best_model_state: dict[str, torch.Tensor] | None
    ) -> dict[str, float]:
        """Phase 2: estimate C with the phase-1 model, then restart from the initial weights and a fresh
        optimizer and schedule."""
        if stage.name != "corrected" or self.corruption is not None:
            return {}
        self.corruption = self.estimate_corruption()
        self.main.net.load_state_dict(self.initial_state)
        self.main.reset_optimizer()
        return {"glc_estimated_flip_rate": 1.0 - float(torch.diagonal(self.corruption).mean())}

    def train_step(self, batch: Batch, trusted: Batch | None) -> dict[str, float]:
        if self.corruption is None:
            return self.main.cross_entropy_step(batch.x, batch.y)
        assert trusted is not None, "GLC phase 2 needs trusted batches"
        x = cat_inputs([batch.x, trusted.x], pad=getattr(self.main.net, "pad_token_id", 0))
        logits, _ = self.main.model(x)
        noisy_logits, gold_logits = logits[: len(batch)], logits[len(batch) :]
        probs = F.softmax(noisy_logits, dim=1) @ self.corruption
        noisy_loss = -torch.log(probs.gather(1, batch.y[:, None]).clamp_min(1e-12)).sum()
        gold_loss = F.cross_entropy(gold_logits, trusted.y, reduction="sum")
        loss = (noisy_loss + gold_loss) / len(x)
        self.main.step(loss)
        return {"loss": float(loss.detach()), "gold_loss": float(gold_loss.detach()) / len(trusted)}

    @torch.no_grad()
    def estimate_corruption(self) -> torch.Tensor:
        """C[i] = mean phase-1 softmax over trusted samples of class i, summed over all ranks' parts."""
        assert self.ctx.iter_split is not None, "GLC needs a pass over the trusted set"
        k = self.ctx.num_classes
        sums = torch.zeros(k, k, dtype=torch.float64, device=self.ctx.device)
        counts = torch.zeros(k, dtype=torch.float64, device=self.ctx.device)
        net = self.main.net
        was_training = net.training
        net.eval()
        for trusted in self.ctx.iter_split("trusted"):
            probs = F.softmax(net(trusted.x)[0].double(), dim=1)
            sums.index_add_(0, trusted.y, probs)
            counts.index_add_(0, trusted.y, torch.ones_like(trusted.y, dtype=torch.float64))
        net.train(was_training)
        all_reduce_sum_([sums, counts])
        corruption = sums / counts.clamp_min(1.0)[:, None]
        # A class absent from the trusted set gets the identity row: no correction rather than none at all.
        missing = counts == 0
        corruption[missing] = torch.eye(k, dtype=torch.float64, device=sums.device)[missing]
        return corruption.float()

    def final_metrics(self) -> dict[str, Any]:
        if self.corruption is None:
            return {}
        return {
            "noise_transition_estimated": self.corruption.double().cpu().tolist(),
            "noise_transition_estimated_by": "glc: mean phase-1 softmax over each class's trusted samples",
        }

    def eval_model(self) -> nn.Module:
        return self.main.net

    def current_lr(self) -> float:
        return self.main.lr

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "initial": self.initial_state, "corruption": self.corruption}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.initial_state = state["initial"]
        self.corruption = state["corruption"]
        if self.corruption is not None:
            self.corruption = self.corruption.to(self.ctx.device)
