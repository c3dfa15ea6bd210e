"""Algorithm 1 of the EPAS paper as a pure function of the optimizer step.

The target region S_c is a contiguous run of layers listed in the order they join the region: deepest first (the
paper). Starting at ``start_step`` and then every ``interval`` optimizer steps, the next ``growth`` layers of S_c
switch to sharing, until S_c is exhausted; the region then stays at full size. Because the mask depends on the step
alone, every rank and every micro-batch of an accumulation window agree on it, and a resumed run picks it up from
``global_step``.

``order="shallow_first"`` is an ablation, not the paper's method: the region sits right after layer 0 (layers
1..N for a count or fraction) and grows deeper (layer 1, then 1-2, ...), so every sharing layer reuses layer 0's Q/K.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from epas_lightning.errors import ConfigError

TargetSpec = int | float | Sequence[int]
"""The full sharing region: a layer count, a fraction of the layers, or an explicit list in growth order."""

GrowthOrder = Literal["deep_first", "shallow_first"]
"""Where the region sits and how it grows: ``deep_first`` (the paper: the deepest layers, growing shallower) or
``shallow_first`` (an ablation: the layers right after layer 0, growing deeper)."""
GROWTH_ORDERS: tuple[str, ...] = get_args(GrowthOrder)


def check_order(order: str) -> None:
    """Fail with the valid choices when ``order`` is not a :data:`GrowthOrder`."""
    if order not in GROWTH_ORDERS:
        raise ConfigError(f"unknown growth order {order!r}", "sharing.order", f"use one of {list(GROWTH_ORDERS)}")


_TARGET_FIX = "give a layer count (2), a fraction of the layers (0.5) or a list of layers ([11, 10])"


def resolve_target(target: TargetSpec, n_layer: int, order: GrowthOrder = "deep_first") -> tuple[int, ...]:
    """Turn a count, fraction or list into the layers of the full region, in the order they start sharing.

    ``deep_first`` (default): a count or fraction takes the deepest layers (the last layer always included), deepest
    first; a list must be a contiguous run of layers in 1..n_layer-1, deepest first.
    ``shallow_first``: a count or fraction takes layers 1, 2, ... (right after layer 0), shallowest first; a list must
    be a contiguous run in 1..n_layer-1, shallowest first.
    """
    check_order(order)
    deep_first = order == "deep_first"
    kinds = "the sharing target must be a count, a fraction or a list of integer layer indices"
    if isinstance(target, bool):
        raise ConfigError(f"{kinds}, not {target!r}", "sharing.target", _TARGET_FIX)
    if isinstance(target, (str, bytes)):  # else "6" would be the list [6]
        raise ConfigError(f"{kinds}, not the text {target!r}", "sharing.target", "convert it to a number or list first")
    if isinstance(target, numbers.Integral):  # numpy's too
        target = int(target)
    elif isinstance(target, numbers.Real):
        target = float(target)
    if isinstance(target, float):
        if not 0.0 < target < 1.0:
            raise ConfigError(
                f"a fractional sharing target must be in (0, 1), got {target}", "sharing.target", _TARGET_FIX
            )
        count = math.floor(target * n_layer + 1e-9)  # rounds down; 0.29 of 100 layers is 29, not 28.999...
        if count == 0:
            raise ConfigError(
                f"a sharing target of {target} of {n_layer} layers rounds down to 0 layers",
                "sharing.target",
                "raise it, or give a layer count",
            )
        target = count
    if isinstance(target, int):
        if not 1 <= target <= n_layer - 1:
            raise ConfigError(
                f"a sharing target of {target} layers is invalid for a {n_layer}-layer model",
                "sharing.target",
                f"choose between 1 and n_layer - 1 = {n_layer - 1} layers (layer 0 always computes)",
            )
        return tuple(range(n_layer - 1, n_layer - 1 - target, -1)) if deep_first else tuple(range(1, target + 1))
    try:
        layers = tuple(operator.index(i) for i in target)
    except TypeError:
        raise ConfigError(f"{kinds}, not {target!r}", "sharing.target", _TARGET_FIX) from None
    if not layers:
        raise ConfigError(
            "the sharing target list is empty",
            "sharing.target",
            "list the layers that share (to train dense, leave the target and set sharing.enabled: false)",
        )
    if any(not 1 <= i <= n_layer - 1 for i in layers):
        raise ConfigError(
            f"the sharing target {list(layers)} names layers outside 1..{n_layer - 1}",
            "sharing.target",
            "list layers 1..n_layer - 1 (layer 0 can never share)",
        )
    step = -1 if deep_first else 1
    if any(b - a != step for a, b in zip(layers, layers[1:], strict=False)):
        example, listed = ("[11, 10, 9]", "deepest first") if deep_first else ("[1, 2, 3]", "shallowest first")
        raise ConfigError(
            f"the sharing target {list(layers)} is not one contiguous block listed {listed} (order={order!r})",
            "sharing.target",
            f"list it like {example}",
        )
    return layers


def check_pace(growth: int, interval: int, start_step: int | None) -> None:
    """The schedule's knobs that need no model: growth and interval at least 1, start_step (if set) at least 0."""
    if growth < 1:
        raise ConfigError(
            f"growth must be >= 1, got {growth}", "sharing.growth", "set the layers each switch adds: 1 or more"
        )
    if interval < 1:
        raise ConfigError(
            f"interval must be >= 1 optimizer step, got {interval}",
            "sharing.interval",
            "set the optimizer steps between switches: 1 or more",
        )
    if start_step is not None and start_step < 0:
        raise ConfigError(
            f"start_step must be >= 0, got {start_step}",
            "sharing.start_step",
            "set the step of the first switch (0 or more), or leave it unset for the interval",
        )


@dataclass(frozen=True)
class SharingSchedule:
    """When each layer of the target region starts sharing."""

    target_layers: tuple[int, ...]
    """The full region in the order its layers start sharing (deepest first unless built with ``shallow_first``)."""
    growth: int = 1
    """Layers added to the region per stage (B in the paper)."""
    interval: int = 100
    """Optimizer steps between stages (I in the paper)."""
    start_step: int = 100
    """Optimizer step at which the first stage switches."""

    def __post_init__(self) -> None:
        layers = self.target_layers
        integral = isinstance(layers, Sequence) and all(isinstance(i, numbers.Integral) for i in layers)
        step = 1 if integral and len(layers) > 1 and layers[1] > layers[0] else -1
        gaps = zip(layers, layers[1:], strict=False) if integral else ()
        if not integral or not layers or min(layers) < 1 or any(b - a != step for a, b in gaps):
            raise ConfigError(
                f"the target region {layers!r} is not a contiguous run of layers 1 and up, deepest or shallowest first",
                "SharingSchedule.target_layers",
                "build it with SharingSchedule.build(n_layer, target), which checks it against the model",
            )
        object.__setattr__(self, "target_layers", tuple(int(i) for i in layers))  # frozen; numpy ints as ints
        check_pace(self.growth, self.interval, self.start_step)
        if len(self.target_layers) % self.growth:
            raise ConfigError(
                f"the target region has {len(self.target_layers)} layers, not a multiple of growth={self.growth}",
                "sharing.growth",
                "pick a growth that divides the region size",
            )

    @classmethod
    def build(
        cls,
        n_layer: int,
        target: TargetSpec,
        growth: int = 1,
        interval: int = 100,
        start_step: int | None = None,
        order: GrowthOrder = "deep_first",
    ) -> SharingSchedule:
        """Validate and build; ``start_step`` defaults to ``interval`` (the paper: grow after every I steps).

        ``order`` picks where the region sits and which way it grows (see :func:`resolve_target`).
        """
        layers = resolve_target(target, n_layer, order)
        return cls(layers, growth, interval, interval if start_step is None else start_step)

    @property
    def n_stages(self) -> int:
        return len(self.target_layers) // self.growth

    @property
    def final_step(self) -> int:
        """First optimizer step at which the region has its full size."""
        return self.start_step + (self.n_stages - 1) * self.interval

    def stage_at(self, step: int) -> int:
        """Number of completed growth stages after ``step`` optimizer steps."""
        if step < self.start_step:
            return 0
        return min(self.n_stages, (step - self.start_step) // self.interval + 1)

    def shared_layers_at(self, step: int) -> list[int]:
        """Layers sharing after ``step`` optimizer steps, ascending."""
        return sorted(self.target_layers[: self.stage_at(step) * self.growth])
