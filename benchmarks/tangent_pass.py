"""What the meta step's forward-mode pass J would cost without recomputing the primal forward.

The trusted-set meta methods need J_z v, the logits' directional derivative along v (``raynoisy.meta``'s
``jvp``: forward-mode AD, which computes the primal forward again beside the tangent). The primal is already
known from the step's training forward, so two ways to skip it are timed here against ``jvp`` on the same
network, batch and direction, with a no-grad forward F for scale:

- ``linearize``: ``torch.func.linearize`` traces the network once per set of weights and returns a function
  that evaluates only the tangent; since the weights change every step it must be traced every step, so
  both its per-step cost (trace + apply) and the apply alone are shown;
- ``tangent rules``: a tangent pass written per layer type of the small CNN (convolution, train-mode
  BatchNorm, ReLU, max-pool, average pool, flatten, linear) that reads each layer's input and output saved
  by forward hooks during the training forward: conv(ẋ, W) + conv(x, Ẇ), BatchNorm's tangent through its
  batch statistics, ReLU's and max-pool's masks from the saved values.

Every candidate's tangent is checked against ``jvp`` (float32: 1e-4 relative) before it is timed.

    python benchmarks/tangent_pass.py --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, linearize

from raynoisy.meta.output_hypergrad import jvp
from raynoisy.models.registry import build_model
from raynoisy.train.in_process import cpu_threads

Saved = dict[nn.Module, tuple[Tensor, Tensor]]


def layers_of(net: nn.Module) -> list[nn.Module]:
    """The small CNN's layers in forward order: its body's, then its classifier."""
    return [*net.body, net.fc]


def record_layers(net: nn.Module) -> tuple[Saved, list[torch.utils.hooks.RemovableHandle]]:
    """Hooks that keep every layer's input and output of the latest forward (detached)."""
    saved: Saved = {}

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        saved[module] = (inputs[0].detach(), output.detach())

    return saved, [layer.register_forward_hook(hook) for layer in layers_of(net)]


def _channel(t: Tensor) -> Tensor:
    return t.view(1, -1, 1, 1)


@torch.no_grad()
def tangent_by_rules(net: nn.Module, saved: Saved, tangents: dict[str, Tensor]) -> Tensor:
    """J_z v layer by layer from the saved training forward; the input has no tangent (None = zero)."""
    names = {module: name for name, module in net.named_modules()}
    t: Tensor | None = None
    for layer in layers_of(net):
        x, y = saved[layer]
        name = names[layer]
        if isinstance(layer, nn.Conv2d | nn.Linear):
            conv = isinstance(layer, nn.Conv2d)
            options = {"stride": layer.stride, "padding": layer.padding} if conv else {}
            op: Callable[..., Tensor] = F.conv2d if conv else F.linear
            out = op(x, tangents[f"{name}.weight"], tangents.get(f"{name}.bias"), **options)
            t = out if t is None else out + op(t, layer.weight.detach(), None, **options)
        elif isinstance(layer, nn.BatchNorm2d):
            assert t is not None, "a BatchNorm whose input has no tangent"
            mean = x.mean((0, 2, 3), keepdim=True)
            inv_std = (x.var((0, 2, 3), unbiased=False, keepdim=True) + layer.eps).rsqrt()
            x_hat = (x - mean) * inv_std
            centred = t - t.mean((0, 2, 3), keepdim=True) - x_hat * (t * x_hat).mean((0, 2, 3), keepdim=True)
            t = _channel(layer.weight.detach()) * inv_std * centred
            t = t + _channel(tangents[f"{name}.weight"]) * x_hat + _channel(tangents[f"{name}.bias"])
        elif isinstance(layer, nn.ReLU):
            assert t is not None
            t = t * (y > 0)
        elif isinstance(layer, nn.MaxPool2d):
            assert t is not None
            _, index = F.max_pool2d(
                x, layer.kernel_size, layer.stride, layer.padding, layer.dilation, layer.ceil_mode, True
            )
            t = t.flatten(2).gather(2, index.flatten(2)).view_as(y)
        elif isinstance(layer, nn.AdaptiveAvgPool2d):
            assert t is not None
            t = F.adaptive_avg_pool2d(t, layer.output_size)
        elif isinstance(layer, nn.Flatten):
            assert t is not None
            t = t.flatten(layer.start_dim, layer.end_dim)
        else:
            raise TypeError(f"no tangent rule for {type(layer).__name__}")
    assert t is not None
    return t


def median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for round_ in range(repeats + 1):  # the first call warms up
        start = time.perf_counter()
        run()
        if round_:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def measure(batch_size: int, repeats: int) -> list[tuple[str, float]]:
    """(what, median ms) for F, jvp, linearize (trace + apply, apply only) and the tangent rules."""
    torch.manual_seed(0)
    net = build_model("small-cnn", num_classes=10, in_channels=1, image_size=28).train()
    x = torch.randn(batch_size, 1, 28, 28)
    params = dict(net.named_parameters())
    tangents = {name: torch.randn_like(p) for name, p in params.items()}
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    detached = {name: p.detach() for name, p in params.items()}

    def logits(weights: dict[str, Tensor]) -> Tensor:
        return functional_call(net, (weights, buffers), (x,))[0]

    saved, handles = record_layers(net)
    net(x)  # the training forward whose activations the rules read
    for handle in handles:
        handle.remove()
    _, apply = linearize(logits, detached)
    reference = jvp(net, params, tangents, x)
    for name, tangent in (
        ("linearize", apply(tangents)),
        ("tangent rules", tangent_by_rules(net, saved, tangents)),
    ):
        error = ((tangent - reference).norm() / reference.norm()).item()
        if error > 1e-4:
            raise AssertionError(f"{name}'s tangent differs from jvp's by {error:.2e} (relative)")

    def trace_and_apply() -> Tensor:
        return linearize(logits, detached)[1](tangents)

    with torch.no_grad():
        forward = median_ms(lambda: net(x), repeats)
    return [
        ("F (no-grad forward)", forward),
        ("jvp (forward-mode AD, the engine's J)", median_ms(lambda: jvp(net, params, tangents, x), repeats)),
        ("linearize: trace + apply (per step)", median_ms(trace_and_apply, max(1, repeats // 4))),
        ("linearize: apply only", median_ms(lambda: apply(tangents), repeats)),
        (
            "tangent rules on the saved forward",
            median_ms(lambda: tangent_by_rules(net, saved, tangents), repeats),
        ),
    ]


def main(argv: Sequence[str] | None = None) -> list[tuple[str, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    with cpu_threads(args.threads):
        rows = measure(args.batch_size, args.repeats)
    jvp_ms = rows[1][1]
    print(f"[tangent_pass] small-cnn 28x28, batch {args.batch_size}, {args.threads} torch thread(s)")
    print("| pass | median ms | vs jvp |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.1f} | {ms / jvp_ms:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
