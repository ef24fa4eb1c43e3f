"""Gradient sync and replica checks with 2 gloo processes on CPU, and the engine's rank averaging.

The engine check: MLC's and the output-space hypergradient (and the latter's real-step gradient) computed
by 2 ranks on the halves of a batch must equal the single-process ones on the whole batch (the parent
computes them), and the look-ahead hypergradient must be the mean of the per-half ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from gloo_ranks import gloo_rank
from torch import Tensor, nn

from raynoisy.meta import (
    ReplicasDivergedError,
    all_reduce_mean_,
    all_reduce_sum_,
    assert_replicas_identical,
    broadcast_,
    functional_forward,
    lookahead_hypergrad,
    mlc_hypergrad,
    output_grads,
    output_hypergrad,
    world_size,
)
from raynoisy.meta.sync import state_tensors

WORLD = 2
CLASSES = 3
HALF = 4


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.body(x)
        return self.head(h), h


class LabelCorrector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(CLASSES, 2)
        self.net = nn.Linear(5 + 2, CLASSES)

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        return F.softmax(self.net(torch.cat([features, self.embed(labels)], dim=1)), dim=1)


class Setup:
    """Identical on every process (seeded): a model with momentum buffers, two meta-nets, data."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = Net().double()
        self.corrector = LabelCorrector().double()
        self.weigher = nn.Sequential(nn.Linear(1, 3), nn.Tanh(), nn.Linear(3, 1), nn.Sigmoid()).double()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        for p in self.model.parameters():
            p.grad = torch.randn_like(p)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        n = WORLD * HALF
        self.x, self.y = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, CLASSES, (n,))
        self.xg, self.yg = torch.randn(n, 4, dtype=torch.float64), torch.randint(0, CLASSES, (n,))

    def mlc(self, part: slice) -> dict[str, Any]:
        def corrected(params: dict[str, Tensor]) -> Tensor:
            logits, h = functional_forward(self.model, params, self.x[part])
            soft = self.corrector(h.detach(), self.y[part])
            return -(soft * F.log_softmax(logits, dim=1)).sum(dim=1).mean()

        def gold(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_forward(self.model, params, self.xg[part])[0], self.yg[part])

        result = mlc_hypergrad(
            self.model, self.optimizer, corrected, gold, list(self.corrector.parameters()), with_discount=True
        )
        return {
            "meta_grads": result.meta_grads,
            "train_grads": result.train_grads,
            "train_loss": result.train_loss,
            "gold_loss_after": result.gold_loss_after,
            "discount": result.discount,
        }

    def output(self, part: slice) -> dict[str, Any]:
        """MW-Net-style weights through ``output_hypergrad``, then a real-step gradient (``output_grads``)."""

        def weighted(logits: Tensor, _features: Tensor) -> Tensor:
            losses = F.cross_entropy(logits, self.y[part], reduction="none")
            return (self.weigher(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

        def gold(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_forward(self.model, params, self.xg[part])[0], self.yg[part])

        result = output_hypergrad(
            self.model,
            self.optimizer,
            self.x[part],
            weighted,
            gold,
            list(self.weigher.parameters()),
            keep_graph=True,
        )
        real = output_grads(self.model, result.logits, torch.ones_like(result.logits) / len(result.logits))
        return {
            "meta_grads": result.meta_grads,
            "train_grads": result.train_grads,
            "train_loss": result.train_loss,
            "gold_loss_after": result.gold_loss_after,
            "real_grads": real,
        }

    def mwnet(self, part: slice) -> list[Tensor]:
        def weighted(params: dict[str, Tensor], step: int) -> Tensor:
            losses = F.cross_entropy(
                functional_forward(self.model, params, self.x[part])[0], self.y[part], reduction="none"
            )
            return (self.weigher(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

        def gold(params: dict[str, Tensor]) -> Tensor:
            return F.cross_entropy(functional_forward(self.model, params, self.xg[part])[0], self.yg[part])

        meta = list(self.weigher.parameters())
        return lookahead_hypergrad(
            self.model, self.optimizer, weighted, gold, meta, rule="sgd-plain"
        ).meta_grads


def _close(actual: Any, expected: Any) -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys()
        for key in expected:
            _close(actual[key], expected[key])
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected)
        for a, e in zip(actual, expected, strict=True):
            _close(a, e)
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-15)


def _check_all_reduce_mean(rank: int) -> None:
    scale = rank + 1.0
    tensors = [
        torch.full((2, 3), scale, dtype=torch.float64),
        torch.tensor(10.0 * rank, dtype=torch.float32),
        (torch.arange(6, dtype=torch.float64).reshape(2, 3) * scale).t(),
    ]
    calls = []
    original = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        all_reduce_mean_(tensors)
    finally:
        dist.all_reduce = original
    assert len(calls) == 1
    assert torch.equal(tensors[0], torch.full((2, 3), 1.5, dtype=torch.float64))
    assert tensors[1].dtype == torch.float32 and tensors[1].item() == 5.0
    assert torch.equal(tensors[2], (torch.arange(6, dtype=torch.float64).reshape(2, 3) * 1.5).t())


def _check_all_reduce_sum(rank: int) -> None:
    counts = torch.tensor([3.0 * rank, 1.0], dtype=torch.float64)
    classes = torch.zeros(2, 2, dtype=torch.float64)
    classes[rank, rank] = rank + 1.0
    all_reduce_sum_([counts, classes])
    assert world_size() == WORLD
    assert torch.equal(counts, torch.tensor([3.0, 2.0], dtype=torch.float64))
    assert torch.equal(classes, torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))


def _check_broadcast(rank: int) -> None:
    weights = torch.full((2, 3), float(rank + 1))
    counter = torch.tensor(2**40 + rank, dtype=torch.int64)  # above float32's exact integers
    broadcast_([weights, counter])
    assert torch.equal(weights, torch.ones(2, 3))
    assert counter.dtype == torch.int64 and counter.item() == 2**40


def _check_replica_assertion(rank: int) -> None:
    assert_replicas_identical([torch.ones(3), torch.arange(4)])
    try:
        assert_replicas_identical({"weight": torch.ones(3), "bias": torch.full((2,), float(rank))})
    except ReplicasDivergedError as error:
        assert "'bias'" in str(error) and "[1]" in str(error)
    else:
        raise AssertionError("diverged replicas were not detected")
    # As the training loop checks a method's state: the error names the path inside the nested state.
    state = {"main": {"net": {"w": torch.ones(2)}}, "optimizer": [{"step": torch.tensor(float(rank))}]}
    try:
        assert_replicas_identical(state_tensors(state))
    except ReplicasDivergedError as error:
        assert "'/optimizer/0/step'" in str(error) and "'/main" not in str(error)
    else:
        raise AssertionError("a diverged optimizer state was not detected")


def _check_engine(rank: int, expected: dict[str, Any]) -> None:
    setup = Setup()
    part = slice(rank * HALF, (rank + 1) * HALF)
    mlc = setup.mlc(part)
    _close(mlc, expected["mlc"])
    mwnet = setup.mwnet(part)
    _close(mwnet, expected["mwnet"])
    output = setup.output(part)
    _close(output, expected["output"])
    assert_replicas_identical(
        [
            *mlc["meta_grads"],
            *mlc["train_grads"].values(),
            *mwnet,
            *output["meta_grads"],
            *output["real_grads"],
        ]
    )


def _worker(rank: int, init_file: str, expected: dict[str, Any]) -> None:
    with gloo_rank(rank, WORLD, init_file, timeout_s=60):
        _check_all_reduce_mean(rank)
        _check_all_reduce_sum(rank)
        _check_broadcast(rank)
        _check_replica_assertion(rank)
        _check_engine(rank, expected)


def test_sync_and_engine_with_two_gloo_ranks(tmp_path: Path) -> None:
    setup = Setup()
    halves = [setup.mwnet(slice(r * HALF, (r + 1) * HALF)) for r in range(WORLD)]
    expected = {
        "mlc": setup.mlc(slice(0, WORLD * HALF)),
        "output": setup.output(slice(0, WORLD * HALF)),
        "mwnet": [torch.stack(per_param).mean(dim=0) for per_param in zip(*halves, strict=True)],
    }
    # fork, not spawn: a spawned child re-imports torch, which costs seconds per rank on a 2-core machine
    mp.start_processes(
        _worker, args=(str(tmp_path / "rendezvous"), expected), nprocs=WORLD, join=True, start_method="fork"
    )


def test_state_tensors_keys_every_tensor_of_a_nested_state_by_its_path() -> None:
    weight, momentum, history = torch.ones(2), torch.zeros(3), torch.arange(2)
    state = {
        "main": {"net": {"fc.weight": weight}, "lr": 0.1, "name": "ce"},
        "optimizer": {"state": {0: {"momentum_buffer": momentum}}, "param_groups": [{"params": [0]}]},
        "history": (history, None, "text"),
        "corruption": None,
    }
    found = state_tensors(state)
    assert list(found) == ["/main/net/fc.weight", "/optimizer/state/0/momentum_buffer", "/history/0"]
    assert found["/main/net/fc.weight"] is weight and found["/optimizer/state/0/momentum_buffer"] is momentum
    assert found["/history/0"] is history
    assert state_tensors(weight, "w") == {"w": weight} and state_tensors({"x": 1.0, "y": None}) == {}


def test_sync_is_a_no_op_without_a_process_group() -> None:
    tensors = [torch.ones(2)]
    all_reduce_mean_(tensors)
    all_reduce_sum_(tensors)
    broadcast_(tensors)
    assert_replicas_identical(tensors)
    assert torch.equal(tensors[0], torch.ones(2))
    assert world_size() == 1
