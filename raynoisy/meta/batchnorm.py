"""What a fast-weight forward may do to the real model's BatchNorm buffers.

A look-ahead forward is hypothetical: it evaluates the network at weights that will never exist. If it
used the model's own buffers, every such forward would push ``running_mean``/``running_var`` one more
momentum step and bump ``num_batches_tracked`` (K inner forwards plus an outer one, on top of the real
step's forward), and the running statistics used at evaluation time would partly describe fast weights
and meta batches. The reference codes (MLNT, MetaLabelNet, MW-Net's ``MetaBatchNorm2d``) do exactly that,
so the choice is explicit here:

- ``BNPolicy.FROZEN_BUFFERS`` (``"batch-stats-frozen-buffers"``, the default): the forward receives
  *copies* of every buffer. In train mode BatchNorm still normalises with the batch statistics, so the
  fast forward computes the same function as the reference, but the real buffers stay bit-identical.
  Under DDP this also keeps the buffers that ``broadcast_buffers`` ships from rank 0 meaningful.
- ``BNPolicy.UPDATE`` (``"update"``): the forward uses the real buffers and updates them, reproducing the
  reference behaviour for methods that ask for it.

The policy only decides which buffers the forward sees; the module's train/eval mode still decides how
BatchNorm normalises, as for an ordinary forward.
"""

from __future__ import annotations

from enum import Enum

from torch import Tensor, nn


class BNPolicy(str, Enum):
    """How a functional forward treats the model's buffers (see the module docstring for why)."""

    FROZEN_BUFFERS = "batch-stats-frozen-buffers"
    UPDATE = "update"


def forward_buffers(module: nn.Module, policy: BNPolicy | str) -> dict[str, Tensor]:
    """Buffers to hand to ``functional_call``: copies under FROZEN_BUFFERS, none (the real ones) under UPDATE.

    Every buffer is copied, not only BatchNorm's, so no module that mutates a buffer in its forward can
    leak a look-ahead into the real model; the buffers are small next to the parameters.
    """
    if BNPolicy(policy) is BNPolicy.UPDATE:
        return {}
    return {name: buffer.clone() for name, buffer in module.named_buffers()}
