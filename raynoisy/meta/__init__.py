"""The shared bilevel engine: functional look-ahead, hypergradients, meta-gradient sync.

Methods compose these pieces; none of them touches the real model's parameters, ``.grad``, optimizer
state or (by default) BatchNorm buffers. See each module's docstring for the reasoning.
"""

from raynoisy.meta.batchnorm import BNPolicy
from raynoisy.meta.hypergrad import (
    Hypergradient,
    MetaStep,
    MLCHypergradAccumulator,
    MLCHypergradient,
    identity_hessian_discount,
    lookahead_hypergrad,
    mlc_hypergrad,
)
from raynoisy.meta.lookahead import (
    ParamRule,
    functional_forward,
    lookahead,
    unwrap_model,
    update_rules,
    virtual_step,
)
from raynoisy.meta.output_hypergrad import (
    ExampleAlignment,
    OutputHypergradient,
    OutputLoss,
    example_alignment,
    gold_gradient,
    logit_gradient,
    output_grads,
    output_hypergrad,
)
from raynoisy.meta.sync import (
    ReplicasDivergedError,
    all_reduce_mean_,
    all_reduce_sum_,
    assert_replicas_identical,
    broadcast_,
    replica_fingerprint,
    world_size,
)

__all__ = [
    "BNPolicy",
    "ExampleAlignment",
    "Hypergradient",
    "MLCHypergradAccumulator",
    "MLCHypergradient",
    "MetaStep",
    "OutputHypergradient",
    "OutputLoss",
    "ParamRule",
    "ReplicasDivergedError",
    "all_reduce_mean_",
    "all_reduce_sum_",
    "assert_replicas_identical",
    "broadcast_",
    "example_alignment",
    "functional_forward",
    "gold_gradient",
    "identity_hessian_discount",
    "logit_gradient",
    "lookahead",
    "lookahead_hypergrad",
    "mlc_hypergrad",
    "output_grads",
    "output_hypergrad",
    "replica_fingerprint",
    "unwrap_model",
    "update_rules",
    "virtual_step",
    "world_size",
]
