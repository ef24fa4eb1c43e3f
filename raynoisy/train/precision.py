"""Mixed precision for a run's training steps and evaluations: ``scaling.precision``.

``bf16-mixed`` runs every ``train_step`` and the validation and test forwards under ``torch.autocast`` with
bfloat16: convolutions and matrix products in bfloat16, the ops on autocast's float32 list of the device in
float32 (on CUDA softmax, log-softmax and the losses; on CPU the losses, while softmax stays bfloat16), and
parameters, gradients, optimizer state and checkpoints float32. bfloat16 has float32's exponent range, so no
loss scaling is needed, and that is what lets the meta methods use it: their hypergradients come from
``torch.autograd.grad`` and forward-mode AD, through which a gradient scaler would have to be threaded. fp16
is not offered for that reason.

Everything else runs in float32: the methods' hooks between steps (MixNN's per-sample losses and features
for its GMM and index, GLC's corruption estimate, MetaLabelNet's feature cache, MLNT's filter pass, the
collapse guard's trusted-set readings) and the per-sample export after training (the best model's
predictions and label issues). They run once per epoch or once per run and feed statistics.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

from raynoisy.errors import ConfigError

__all__ = ["autocast", "check_device", "cpu_note"]


def autocast(precision: str, device: torch.device) -> AbstractContextManager[None]:
    """The context a training step or an evaluation runs in: autocast to bfloat16 for ``bf16-mixed``,
    a disabled autocast (no change) for ``fp32``."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")


def check_device(precision: str, device: torch.device) -> None:
    """Refuse ``bf16-mixed`` on a GPU without bfloat16 arithmetic (before Ampere), where autocast would
    emulate it slowly or fail; checked on the worker, which is the first place that sees its GPU."""
    if precision != "bf16-mixed" or device.type != "cuda":
        return
    if torch.cuda.get_device_capability(device)[0] < 8:
        name = torch.cuda.get_device_name(device)
        raise ConfigError(
            "scaling.precision",
            f"bf16-mixed needs a GPU with bfloat16 arithmetic (Ampere or later); this worker has {name}",
            "set scaling.precision=fp32",
        )


def cpu_note(precision: str, device: torch.device) -> str | None:
    """A line for the log where bf16-mixed runs on a CPU: there bfloat16 products are fast only with AMX or
    AVX512-BF16 units, and elsewhere slower than float32 (measured in benchmarks/README.md)."""
    if precision != "bf16-mixed" or device.type != "cpu":
        return None
    return (
        "bf16-mixed on a CPU: bfloat16 convolutions and matrix products are fast only on CPUs with AMX or "
        "AVX512-BF16 (1.35-1.78x faster than fp32 on one), and slower than fp32 elsewhere (10-12.5x on an "
        "AVX2 CPU)"
    )
