"""What ``serve`` serves: the model's name, shape and trained region, the regions a request may pick, the limits."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epas_lightning.checkpoint import CheckpointInfo
from epas_lightning.data.tokenizer import Drop, TextTokenizer, drops_warned, load_tokenizer_once, warned_before
from epas_lightning.errors import ConfigError
from epas_lightning.inference.bench import flops_ratio, region_for_budget
from epas_lightning.model import LlamaConfig
from epas_lightning.region import SHARING_FLAGS, TrainedRegion, choices
from epas_lightning.serve.chat import checked_chat_template
from epas_lightning.serve.protocol import RequestError


@dataclass(frozen=True)
class ServedModel:
    """Plain data shared by the HTTP side (which checks requests) and the inference worker (which decodes)."""

    name: str
    config: LlamaConfig
    region: TrainedRegion
    default_sharing: int
    """The region of a request that names none (``--sharing-layers``; default: the checkpoint's
    :attr:`~epas_lightning.checkpoint.CheckpointInfo.default_sharing`)."""
    tokenizer_path: Path
    bos_id: int
    """The BOS id the checkpoint's documents started with (what ``resolve_tokenizer`` gave), and its EOS id."""
    eos_id: int
    max_tokens: int
    """The largest ``max_tokens`` a request may ask for."""
    max_choices: int
    """Prompts x ``n`` one request may ask for."""
    max_request_bytes: int
    """The largest request body (``--max-request-mb``); a larger one is a 413."""
    created: int
    chat_template: str | None = None
    """The template ``POST /v1/chat/completions`` renders messages with; ``None``: chat is unavailable."""
    no_chat: str = ""
    """Why chat is unavailable (the ready line says it; its requests get :attr:`no_chat_message`); empty when it is
    available."""
    warned: frozenset[Drop] = frozenset()
    """The tokenizer drops startup warned of (:func:`~epas_lightning.data.tokenizer.drops_warned`): the processes
    serving it (the spawned inference worker too) do not warn of them again."""

    @classmethod
    def build(
        cls,
        recorded: CheckpointInfo,
        tokenizer: TextTokenizer,
        name: str,
        sharing_layers: int | None,
        max_tokens: int | None,
        max_choices: int,
        max_request_mb: float = 8,
    ) -> ServedModel:
        """Check the server's settings against the checkpoint (a :class:`ConfigError` at startup if they do not fit)."""
        config, region = recorded.config, recorded.region
        default = recorded.default_sharing if sharing_layers is None else sharing_layers
        # the trained region at most, and said as every command says it
        region.first(default, flags=SHARING_FLAGS, forceable=False)
        limit = config.context_length - 1 if max_tokens is None else max_tokens
        if not 1 <= limit < config.context_length:
            raise ConfigError(
                f"--max-tokens must lie in 1..{config.context_length - 1} (the context length leaves room for a "
                "prompt)",
                f"--max-tokens {max_tokens}",
                "give one in that range, or leave it out (the context length minus one)",
            )
        if max_choices < 1:
            raise ConfigError("--max-choices must be at least 1", f"--max-choices {max_choices}", "give 1 or more")
        if not max_request_mb > 0:
            raise ConfigError(
                "--max-request-mb must be positive", f"--max-request-mb {max_request_mb}", "give a size in MiB, e.g. 8"
            )
        ids = tokenizer.bos_id, tokenizer.eos_id
        template, no_chat = _chat_template(tokenizer.path)
        return cls(
            name, config, region, default, tokenizer.path, *ids, limit, max_choices, int(max_request_mb * 2**20),
            int(time.time()), template, no_chat, drops_warned(),
        )  # fmt: skip

    @property
    def no_chat_message(self) -> str:
        """The 400 of a chat request where chat is unavailable: why, and what to do."""
        return f"{self.no_chat}: {NO_CHAT_FIX}"

    def tokenizer(self) -> TextTokenizer:
        """The tokenizer with the checkpoint's BOS/EOS ids, loaded once per process (the HTTP side and the worker),
        fitted once to the model as at startup (``check_fits``: special added tokens past its rows dropped, without
        warning of them again), not at every request."""
        path, vocab_size = str(self.tokenizer_path), self.config.vocab_size
        warned_before(self.warned)
        return load_tokenizer_once(path, bos_id=self.bos_id, eos_id=self.eos_id, fits=vocab_size)

    def resolve_region(self, sharing_layers: int | None, budget: float | None) -> int:
        """The number of sharing layers a request runs with; :class:`RequestError` if the checkpoint cannot do it."""
        trained = self.region.size
        if sharing_layers is not None and budget is not None:
            raise RequestError("give sharing_layers or budget, not both", "sharing_layers")
        if budget is not None:
            if not math.isfinite(budget) or budget <= 0:
                raise RequestError(f"budget must be a positive fraction of dense FLOPs, got {budget}", "budget")
            try:
                return region_for_budget(self.config, budget, trained, self.config.block_size)
            except ConfigError as e:
                raise RequestError(f"{e.what}: {(e.fix or '').replace('--budget', 'budget')}", "budget") from None
        if sharing_layers is None:
            return self.default_sharing
        if not 0 <= sharing_layers <= trained:
            raise RequestError(
                f"sharing_layers={sharing_layers} is outside the trained region: this model "
                f"{self.region.trained_at_most()}; choose {choices(trained)}",
                "sharing_layers",
            )
        return sharing_layers

    def region_record(self, n_shared: int) -> dict[str, Any]:
        """The region of ``n_shared`` layers as responses report it."""
        return {
            "sharing_layers": n_shared,
            "shared_layers": self.region.first(n_shared),
            "flops_ratio": flops_ratio(self.config, n_shared, self.config.block_size),
        }

    def model_record(self) -> dict[str, Any]:
        """The model as ``/v1/models`` lists it, with every region a request may pick."""
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "epas_lightning",
            "epas": {
                "n_layer": self.config.n_layer,
                "block_size": self.config.block_size,
                "context_length": self.config.context_length,
                "trained_region": self.region.to_record(),
                "weights_trained_region": self.region.unrun_record(),  # a stock export's
                "default_sharing_layers": self.default_sharing,
                "max_tokens": self.max_tokens,
                "regions": [self.region_record(n) for n in range(self.region.size + 1)],
                "chat": self.chat_template is not None,
            },
        }


NO_CHAT_FIX = "serve with --tokenizer <a folder holding this tokenizer and its chat template>, or use /v1/completions"


def _chat_template(tokenizer_file: Path) -> tuple[str | None, str]:
    """The chat template beside the tokenizer file, compiled once to check it, or why chat is unavailable."""
    template, why = checked_chat_template(tokenizer_file)
    return template, "" if template is not None else why
