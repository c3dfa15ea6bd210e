"""Our dense training step vs ``transformers.LlamaForCausalLM`` on the same shape, weights, dtype and batch.

Both models get the same weights (ours copied into HF by parameter name, which follows HF's ``modeling_llama``), and
their logits are checked to agree before anything is timed. A timed step is the full training step: forward, the
same cross-entropy on the logits, backward, ``AdamW.step`` (same hyper-parameters and implementation), and
``zero_grad(set_to_none=True)``. HF runs with ``attn_implementation="sdpa"`` and ``use_cache=False``; our model runs
dense (no layer shares). The two alternate in ABBA order after untimed warm-up steps, so drift and load from other
processes hit both; ``ratio = median(our step time) / median(HF step time)`` (target <= 1.0).

``--dtype``: ``fp32`` (default on CPU), ``bf16-mixed`` (autocast to bf16 around forward and loss, fp32 weights;
default on CUDA) or ``bf16`` (bf16 weights and optimizer state).

Usage::

    python benchmarks/vs_hf.py --model llama-125m --seq-len 512 --batch-size 1 --reps 8
    python benchmarks/vs_hf.py --quick          # tiny shape, seconds (smoke test)

The last stdout line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
from collections.abc import Callable

import torch
from harness import (
    BENCH_EXTRA,
    autocast_context,
    device_name,
    emit,
    preset_config,
    resolve_device,
    shape_flags,
    time_arms,
    token_batches,
)

from epas_lightning.errors import ConfigError, run_script
from epas_lightning.loss import lm_loss
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.script_args import ScriptParser, count, whole_number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    shape_flags(p, model="llama-125m", seq_len=512, batch_size=1)
    p.add_argument("--reps", type=count, default=8, help="timed steps per model")
    p.add_argument("--warmup", type=whole_number(0), default=1, help="untimed steps per model first")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16-mixed", "bf16"), default="auto")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_quick("debug shape, seq 64, 3 reps", model="debug", seq_len=64, reps=3)
    return p.parse_args(argv)


def hf_config(config: LlamaConfig):  # noqa: ANN201
    """The ``transformers.LlamaConfig`` of the same network (vocabulary = our padded embedding rows)."""
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=config.padded_vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_dim,
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        use_cache=False,
        attn_implementation="sdpa",
    )


def build_hf(ours: Llama):  # noqa: ANN201
    """``LlamaForCausalLM`` (sdpa attention) holding a copy of ``ours``'s weights."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(hf_config(ours.config))
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF picked attention {model.config._attn_implementation!r}, not sdpa.")
    state = {
        (k if k.startswith("lm_head.") else f"model.{k}"): v
        for k, v in ours.state_dict().items()
        if not k.startswith("sharing.")
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb." not in k]  # RoPE tables: buffers HF derives from the config
    if missing or unexpected:
        raise RuntimeError(f"Weight mapping to HF failed: missing {missing}, unexpected {unexpected}")
    return model


def check_same_logits(ours: Llama, peers: dict[str, Callable], tokens: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| of each peer's logits function from ours (fp32, eval mode); raises where one computes
    another function."""
    ours.eval()
    diffs = {}
    with torch.no_grad():
        reference = ours(tokens)
        for name, logits in peers.items():
            theirs = logits(tokens)
            diffs[name] = (reference - theirs).abs().max().item()
            if not torch.allclose(reference, theirs, atol=1e-3, rtol=1e-3):
                raise RuntimeError(f"{name}'s logits differ from ours by up to {diffs[name]:.3g}: mapping or shape.")
    ours.train()
    return diffs


class Arm:
    """A model, its optimizer and a callable producing logits."""

    def __init__(self, model: torch.nn.Module, logits, autocast) -> None:  # noqa: ANN001
        self.model = model
        self.logits = logits
        self.autocast = autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        with self.autocast():
            logits = self.logits(inputs)  # (B, T, V)
            loss = lm_loss(logits, targets)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if importlib.util.find_spec("transformers") is None:
        raise ConfigError(
            "transformers is not installed", "benchmarks/vs_hf.py", f"install the bench extra: {BENCH_EXTRA}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.dtype == "auto":
        args.dtype = "bf16-mixed" if device.type == "cuda" else "fp32"
    torch.manual_seed(args.seed)
    config = preset_config(args.model, args.seq_len)
    ours = Llama(config)
    hf = build_hf(ours)
    (tokens,) = token_batches(config, args.batch_size, args.seq_len, 1)
    hf.eval()
    max_diff = check_same_logits(ours, {"hf": lambda x: hf(input_ids=x, use_cache=False).logits}, tokens[:, :-1])["hf"]
    hf.train()
    ours.to(device), hf.to(device)
    if args.dtype == "bf16":
        ours.to(torch.bfloat16), hf.to(torch.bfloat16)
    autocast = autocast_context(args.dtype, device)
    arms = {
        "ours": Arm(ours, ours, autocast),
        "hf": Arm(hf, lambda x: hf(input_ids=x, use_cache=False).logits, autocast),
    }
    tokens = tokens.to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    print(f"ours vs HF LlamaForCausalLM (sdpa): {args.model}, {args.dtype}, logits max diff {max_diff:.2e}", flush=True)
    steps = {name: (lambda arm=arm: arm.step(inputs, targets)) for name, arm in arms.items()}
    times, loads = time_arms(steps, args.reps, device, warmup=args.warmup)
    ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
    tokens_per_step = args.batch_size * args.seq_len
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": device.type,
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "order": "ABBA",
        "hf_attn_implementation": "sdpa",
        "logits_max_abs_diff": max_diff,
        "ours_step_s": ours_s,
        "hf_step_s": hf_s,
        "ours_tokens_per_s": tokens_per_step / ours_s,
        "hf_tokens_per_s": tokens_per_step / hf_s,
        "ratio": ours_s / hf_s,
        "target": "ratio <= 1.0",
        "target_met": ours_s / hf_s <= 1.0,
        "paired_ratio_median": statistics.median(a / b for a, b in zip(times["ours"], times["hf"], strict=True)),
        "ours_rep_seconds": times["ours"],
        "hf_rep_seconds": times["hf"],
        "ours_rep_foreign_load": loads["ours"],
        "hf_rep_foreign_load": loads["hf"],
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
    }
    print(
        f"ours {ours_s:.3f} s/step ({result['ours_tokens_per_s']:.0f} tok/s)  HF {hf_s:.3f} s/step "
        f"({result['hf_tokens_per_s']:.0f} tok/s)  ratio {result['ratio']:.3f} "
        f"(paired {result['paired_ratio_median']:.3f})"
    )
    emit(result)
    return result


if __name__ == "__main__":
    run_script(main)
