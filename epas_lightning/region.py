"""The trained sharing region as a record: which layers a checkpoint trained to share, in the order they joined.

"N sharing layers" always means the first N layers of that growth order: with the paper's deep-first growth of
``[7, 6, 5, 4]``, N = 2 is layers 7 and 6; with shallow-first growth of ``[1, 2, 3]``, N = 1 is layer 1. Every
consumer of a checkpoint (generate, bench, serve, evaluate, export, the lm-eval adapter) resolves N through
:meth:`TrainedRegion.first`, which refuses a region the weights never trained unless forced.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from epas_lightning.errors import ConfigError
from epas_lightning.schedule import GROWTH_ORDERS, GrowthOrder, check_order

REGION_KEY = "sharing_region"
"""The checkpoint entry holding :meth:`TrainedRegion.to_record` (written by ``ProgressiveSharing``)."""
SHARING_FLAGS = ("--sharing-layers", "--force")
"""How the commands name the region length and the override, for :meth:`TrainedRegion.first`'s errors."""
RUN_THE_REGION = "export the checkpoint again with --remote-code for the region"
"""How to run the region a dense checkpoint's weights trained (:attr:`TrainedRegion.unrun`)."""
EXPORT_UNRUN_FIX = (
    " (with --remote-code the folder carries the region its weights trained, which the commands that load it run)",
    "export that many sharing layers",
)
"""``export``'s advice where ``--sharing-layers`` asks a stock export for its region (:meth:`TrainedRegion.first`):
``--remote-code`` at 0 carries it, ``--force`` writes the layers asked for; exporting again is this command."""


@dataclass(frozen=True)
class TrainedRegion:
    """The layers that shared when a checkpoint was written, in growth order, and the order itself."""

    n_layer: int
    layers: tuple[int, ...] = ()
    """The trained region in the order its layers started sharing."""
    order: GrowthOrder = "deep_first"
    """``deep_first`` (the paper) or ``shallow_first``; decides how a forced region continues past the trained one."""
    unrun: TrainedRegion | None = field(default=None, compare=False, repr=False)
    """Of a dense region, the one its weights trained but the checkpoint does not carry (a stock export's record,
    :func:`unrun_region_text`): ``--sharing-layers`` above 0 is refused, forced it counts in that region."""

    def __post_init__(self) -> None:
        check_order(self.order)
        if any(not 1 <= i < self.n_layer for i in self.layers) or len(set(self.layers)) != len(self.layers):
            raise ConfigError(
                f"Invalid trained region {list(self.layers)} for a {self.n_layer}-layer model.",
                "layers",
                f"give distinct layer numbers from 1 to {self.n_layer - 1}",
            )

    @property
    def size(self) -> int:
        return len(self.layers)

    def growth_order(self) -> list[int]:
        """Every layer that can share, trained ones first, then the untrained ones in the same direction."""
        if self.unrun is not None and not self.layers:
            return self.unrun.growth_order()
        rest = [i for i in self._direction() if i not in self.layers]
        return [*self.layers, *rest]

    def _direction(self) -> range:
        if self.order == "deep_first":
            start = min(self.layers, default=self.n_layer) - 1
            return range(start, 0, -1)
        start = max(self.layers, default=0) + 1
        return range(start, self.n_layer)

    def first(
        self,
        n: int,
        force: bool = False,
        flags: tuple[str, str] = ("n", "force=True"),
        forceable: bool = True,
        unrun_fix: tuple[str, str] = (f", or {RUN_THE_REGION}", "run it from this folder"),
    ) -> list[int]:
        """The layers that share with a region of ``n`` layers: the first ``n`` of the growth order, in that order.

        More than the trained region is refused unless ``force`` (its extra layers never learned to work without their
        own Q/K, so quality drops sharply). The errors name ``flags``, the region length's and the override's
        (:data:`SHARING_FLAGS` in a command), and offer the override where the caller has it (``forceable``); of a
        stock export, ``unrun_fix`` says how the command gets the region its weights trained, and what the override
        does there (``export``'s: :data:`EXPORT_UNRUN_FIX`).
        """
        flag, force_flag = flags
        limit = len(self.growth_order())
        if not isinstance(n, numbers.Integral) or isinstance(n, bool):  # "all" failed comparing int and str
            whole = f" ({self.size}: the whole trained region)" if self.size else ""  # "choose 0 (0: ...)" untrained
            raise ConfigError(
                f"a region length is a number of sharing layers, got {n!r}",
                flag,
                f"choose {choices(limit if force else self.size)}{whole}",
            )
        if not 0 <= n <= limit:
            raise ConfigError(
                f"{layers_asked_for(n)}; {self._can_share(limit, force)}",
                flag,
                f"choose {choices(limit if force else self.size)}",
            )
        if n > self.size and not force:
            elsewhere = self.unrun is not None  # a stock export: its weights trained a region it does not carry
            rerun, force_text = unrun_fix if elsewhere else ("", "run a region it never trained")
            raise ConfigError(
                f"this checkpoint {self.trained_at_most()}; {n} {'was' if n == 1 else 'were'} asked for",
                flag,
                f"choose {choices(self.size)}{rerun}"
                + (f", or pass {force_flag} to {force_text}" if forceable else ""),
            )
        return self.growth_order()[:n]

    def in_growth_order(self, layers: Iterable[int]) -> list[int]:
        """``layers`` (a set of sharing layers, such as config.json's ascending ``epas_shared_layers``) in this
        region's growth order, as the commands list layers; any it never grows to after them, ascending."""
        layers = set(layers)
        ordered = [i for i in self.growth_order() if i in layers]
        return ordered + sorted(layers.difference(ordered))

    def _can_share(self, limit: int, force: bool) -> str:
        """How many layers can share at most (``limit``), and why: the model's layers but layer 0, or where the region
        ends, grown in its direction (a deep-first ``[2, 1]`` at layer 1, a shallow-first ``[2, 3]`` of 4 layers at
        layer 3); and how many it trained, where fewer and not ``force`` (of a stock export, that it runs dense and
        what its weights trained: :attr:`unrun`)."""
        trained = self.size < limit and not force
        unrun = self.unrun if not self.layers else None  # a stock export: N counts in what its weights trained
        held = unrun or self
        if limit == self.n_layer - 1:
            count = f"it runs dense; its weights trained {unrun.size}" if unrun else f"it trained {self.size}"
            return f"a {self.n_layer}-layer model can share at most {limit}" + (
                f" ({count}: {held.describe()})" if trained else ""
            )
        end = self.growth_order()[-1]
        why = "layer 0 never shares" if held.order == "deep_first" else "the last layer"
        whose = "the region its weights trained" if unrun else "the region of this checkpoint"
        count = "it runs dense" if unrun else f"it trained {self.size}"
        return f"{whose} ({held.describe()}) grows no further than layer {end} ({why}): at most {limit}" + (
            f" ({count})" if trained else ""
        )

    def trained_at_most(self) -> str:
        """What the region allows, as errors say it: "was trained with at most 2 sharing layers (layers [7, 6],
        deep-first)", or "was trained dense (no sharing layers)"; of a stock export, that it runs dense, and what its
        weights trained (:attr:`unrun`)."""
        if self.unrun is not None and not self.layers:
            return f"runs dense: it holds {weights_that_trained(self.unrun)}, not that region"
        if not self.layers:
            return "was trained dense (no sharing layers)"
        return f"was trained with at most {sharing_layers_text(self.size)} ({self.describe()})"

    def summary(self) -> str:
        """The region as the commands' summary lines say it: "trained region: layers [3, 2], deep-first"; of a stock
        export, that it runs dense and what its weights trained (:attr:`unrun`), not "dense, no sharing layers"."""
        if self.unrun is not None and not self.layers:
            return f"runs dense; its weights trained {self.unrun.describe()}"
        return f"trained region: {self.describe()}"

    def describe(self) -> str:
        if not self.layers:
            return "dense, no sharing layers"
        return f"layers {list(self.layers)}, {self.order.replace('_', '-')}"

    def to_record(self) -> dict[str, Any]:
        """Plain types for checkpoints and JSON (``weights_only``-loadable)."""
        return {"layers": list(self.layers), "order": self.order}

    def unrun_record(self) -> dict[str, Any] | None:
        """:attr:`unrun` as :meth:`to_record` writes it (the ``weights_trained_region`` of the commands' JSON and a
        copy's ``sharing`` entry); ``None`` where there is none."""
        return None if self.unrun is None else self.unrun.to_record()

    @classmethod
    def from_record(cls, record: Mapping[str, Any], n_layer: int) -> TrainedRegion:
        if not isinstance(record, Mapping):
            raise ConfigError(
                f"Invalid trained region record {record!r}: not a mapping of layers and order.",
                "record",
                'give one as to_record() writes it: {"layers": [3, 2], "order": "deep_first"}',
            )
        order, layers = record.get("order", "deep_first"), record.get("layers", ())
        if order not in GROWTH_ORDERS:
            raise ConfigError(
                f"Unknown growth order {order!r} in the recorded sharing region.",
                "order",
                f"use one of {list(GROWTH_ORDERS)}",
            )
        if not isinstance(layers, list | tuple) or not all(
            isinstance(i, Integral) and not isinstance(i, bool) for i in layers
        ):
            raise ConfigError(
                f"Invalid trained region {layers!r}: not a list of layer numbers.", "layers", "give a list of ints"
            )
        return cls(n_layer, tuple(int(i) for i in layers), order)

    @classmethod
    def from_shared(cls, shared: Iterable[int], n_layer: int, order: GrowthOrder | None = None) -> TrainedRegion:
        """The region of a checkpoint that records only which layers share (written before the region record).

        Without a known order, a region that holds the last layer is taken as deep-first (the paper, and every
        schedule before ``shallow_first`` existed), else as shallow-first.
        """
        layers = sorted(set(shared))
        if order is None:
            order = "deep_first" if not layers or layers[-1] == n_layer - 1 else "shallow_first"
        return cls(n_layer, tuple(reversed(layers)) if order == "deep_first" else tuple(layers), order)


def weights_that_trained(region: TrainedRegion) -> str:
    """``"weights that trained 2 sharing layers (layers [3, 2], deep-first)"``: what a dense checkpoint whose weights
    trained ``region`` (its :attr:`TrainedRegion.unrun`) holds."""
    return f"weights that trained {sharing_layers_text(region.size)} ({region.describe()})"


def unrun_region_text(region: TrainedRegion, stock: bool = True) -> str:
    """What a dense checkpoint whose weights trained ``region`` runs (a ``stock`` export, or a copy of one: a record
    only), and how to get the region: inspect's ``region`` row, and the line the commands that run it print."""
    what, runs = ("a stock export", "our commands and transformers") if stock else ("a copy", "our commands")
    return f"dense: {what} of {weights_that_trained(region)}; {runs} run it dense ({RUN_THE_REGION})"


def sharing_layers_text(n: int) -> str:
    """``"1 sharing layer"``, ``"2 sharing layers"``."""
    return f"{n} sharing layer{'' if n == 1 else 's'}"


def layers_asked_for(n: int) -> str:
    """``"1 sharing layer was asked for"``, ``"2 sharing layers were asked for"``."""
    return f"{sharing_layers_text(n)} {'was' if n == 1 else 'were'} asked for"


def choices(top: int) -> str:
    """The region lengths 0..``top`` as an error's fix offers them (``"0"`` alone for a dense checkpoint)."""
    return "0" if top == 0 else f"0..{top}"


def region_in_growth_order(target_layers: Sequence[int], shared: Iterable[int]) -> tuple[int, ...]:
    """The currently shared layers listed in the order a schedule's target adds them."""
    shared = set(shared)
    return tuple(i for i in target_layers if i in shared)
