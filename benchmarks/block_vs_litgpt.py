"""Where our compiled training step differs from LitGPT's: one decoder block and the loss head, timed apart.

``vs_peers.py`` times whole steps; this times their parts on the same shape, forward and backward, each part compiled
alone (ours ``fullgraph``, as our blocks compile one by one; LitGPT's without, and unlike ``vs_peers``, where LitGPT's
whole model is one graph, so no fusion across a block's edge is timed here):

- ``ours``: our ``DecoderLayer`` as it is;
- ``ours_bthd``: the same weights with RoPE applied to q and k in the (B, T, H, D) layout of the projection, before
  the transpose to heads (attention then reads q and k strided, as it reads v): what moving RoPE would pay;
- ``litgpt``: LitGPT's ``Block`` with the same weights (q, k, v stacked into its ``qkv``);
- ``ours_head`` and ``litgpt_head``: the final norm and the loss from the last hidden states: ours is
  ``linear_cross_entropy`` (chunked, compiled chunks, as ``fit`` runs it), LitGPT's the compiled norm and LM head,
  then ``chunked_cross_entropy`` on the full logits, as ``litgpt pretrain`` runs them.

Each timed call runs ``--inner`` forward/backward passes and clears the gradients (``set_to_none``); arms alternate
(ABBA), medians of ``--reps``. The last line is JSON: milliseconds per pass of each arm and the ratios that matter.

Usage::

    python benchmarks/block_vs_litgpt.py --device cuda          # tinyllama, 4 x 2048, bf16-mixed, compiled
    python benchmarks/block_vs_litgpt.py --quick                # smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import autocast_context, device_name, emit, preset_config, resolve_device, shape_flags, time_arms
from vs_peers import INSTALL, build_litgpt

from epas_lightning.errors import ConfigError, run_script
from epas_lightning.linear_ce import linear_cross_entropy
from epas_lightning.model import Llama
from epas_lightning.model.attention import AttentionContext, apply_rope
from epas_lightning.model.rope import RotaryEmbedding
from epas_lightning.script_args import ScriptParser, count, whole_number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ScriptParser(description=__doc__.split("\n\n")[0])
    shape_flags(parser, "tinyllama-1.1b", 2048, 4)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--precision", choices=("auto", "32-true", "bf16-mixed"), default="auto", help="auto: bf16 on CUDA"
    )
    parser.add_argument(
        "--compile", choices=("auto", "none", "all"), default="auto", help="auto: all on CUDA, none on CPU"
    )
    parser.add_argument("--reps", type=count, default=7)
    parser.add_argument("--inner", type=count, default=10, help="forward/backward passes per timed call")
    parser.add_argument("--warmup", type=whole_number(0), default=2)
    parser.add_argument("--threads", type=count, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_quick(
        "debug shape, seq 64, eager, 2 reps of 1 pass", model="debug", seq_len=64, reps=2, inner=1, warmup=1
    )
    return parser.parse_args(argv)


def bthd_attention_forward(attn: torch.nn.Module) -> Callable:
    """A dense forward of our ``Attention`` with RoPE before the transpose to heads (the ``ours_bthd`` arm)."""

    def forward(x: torch.Tensor, ctx: AttentionContext, *_: object) -> tuple[torch.Tensor, None]:
        B, T, _ = x.shape
        D, H, H_kv = attn.head_dim, attn.n_head, attn.n_kv_head
        weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        q, k, v = F.linear(x, weight).split((H * D, H_kv * D, H_kv * D), dim=-1)
        cos, sin = ctx.cos[:, None, :], ctx.sin[:, None, :]  # (T, 1, D)
        q = apply_rope(q.view(B, T, H, D), cos, sin).transpose(1, 2)  # (B, H, T, D), strided
        k = apply_rope(k.view(B, T, H_kv, D), cos, sin).transpose(1, 2)  # (B, H_kv, T, D)
        v = v.contiguous().view(B, T, H_kv, D).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != H_kv)
        return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D)), None

    return forward


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if importlib.util.find_spec("litgpt") is None:
        raise ConfigError(
            "litgpt is not installed", "benchmarks/block_vs_litgpt.py", f"install it: {INSTALL['litgpt']}"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    precision = args.precision if args.precision != "auto" else "bf16-mixed" if cuda else "32-true"
    compiled = args.compile == "all" or (args.compile == "auto" and cuda)

    def compile(fn: Callable, fullgraph: bool = True) -> Callable:
        return torch.compile(fn, fullgraph=fullgraph) if compiled else fn

    config = preset_config(args.model, args.seq_len)
    config = type(config).from_name(args.model, n_layer=1, block_size=max(config.block_size, args.seq_len))
    torch.manual_seed(args.seed)
    ours = Llama(config)
    theirs = build_litgpt(ours, args.seq_len).to(device)
    from litgpt.utils import chunked_cross_entropy  # litgpt is importable: build_litgpt just imported it

    ours.to(device)
    bthd = Llama(config).to(device)
    bthd.load_state_dict(ours.state_dict())
    bthd.layers[0].self_attn.forward = bthd_attention_forward(bthd.layers[0].self_attn)

    B, T, C = args.batch_size, args.seq_len, config.n_embd
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(B, T, C, device=device, generator=gen, requires_grad=True)
    grad = torch.randn(B, T, C, device=device, generator=gen) / math.sqrt(C)
    targets = torch.randint(0, config.vocab_size, (B, T), device=device, generator=gen)
    cos, sin = RotaryEmbedding.of(config)(T, device)
    ctx = AttentionContext(cos, sin)
    their_cos, their_sin = theirs.cos[:T].unsqueeze(0), theirs.sin[:T].unsqueeze(0)

    our_block = compile(lambda h: ours.layers[0](h, ctx)[0])
    bthd_block = compile(lambda h: bthd.layers[0](h, ctx)[0])
    their_block = compile(lambda h: theirs.transformer.h[0](h, their_cos, their_sin), fullgraph=False)
    vocab = config.vocab_size
    our_norm = compile(ours.norm)
    their_logits = compile(lambda h: theirs.lm_head(theirs.transformer.ln_f(h)), fullgraph=False)

    def our_head(h: torch.Tensor) -> torch.Tensor:
        return linear_cross_entropy(our_norm(h), ours.lm_head.weight, targets, vocab, compile=compiled)

    def their_head(h: torch.Tensor) -> torch.Tensor:
        return chunked_cross_entropy(their_logits(h), targets)

    autocast = autocast_context(precision, device)
    models = {"ours": ours, "ours_bthd": bthd, "litgpt": theirs, "ours_head": ours, "litgpt_head": theirs}
    passes = {"ours": our_block, "ours_bthd": bthd_block, "litgpt": their_block}
    heads = {"ours_head": our_head, "litgpt_head": their_head}

    def arm(name: str) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.inner):
                with autocast():
                    if name in heads:
                        heads[name](x).backward()
                    else:
                        passes[name](x).backward(grad)
                models[name].zero_grad(set_to_none=True)
                x.grad = None

        return run

    with torch.no_grad(), autocast():  # the three blocks compute the same function, the two heads the same loss
        reference = ours.layers[0](x, ctx)[0].float()
        diffs = {
            "ours_bthd": (bthd.layers[0](x, ctx)[0].float() - reference).abs().max().item(),
            "litgpt": (theirs.transformer.h[0](x, their_cos, their_sin).float() - reference).abs().max().item(),
            "litgpt_head": (their_head(x).float() - our_head(x).float()).abs().item(),  # the same loss
        }
    times, _ = time_arms({name: arm(name) for name in models}, args.reps, device, warmup=args.warmup)
    ms = {name: 1000 * statistics.median(t) / args.inner for name, t in times.items()}
    result = {
        "device": device_name(device),
        "torch": torch.__version__,
        "model": args.model,
        "batch_size": B,
        "seq_len": T,
        "precision": precision,
        "compiled": compiled,
        "ms_per_pass": ms,
        "block_vs_litgpt": ms["ours"] / ms["litgpt"],
        "bthd_vs_ours": ms["ours_bthd"] / ms["ours"],
        "head_vs_litgpt": ms["ours_head"] / ms["litgpt_head"],
        "max_abs_diff_vs_ours": diffs,
        "reps": args.reps,
        "inner": args.inner,
    }
    for name, value in ms.items():
        print(f"{name:12s} {value:8.3f} ms per forward/backward")
    return emit(result)


if __name__ == "__main__":
    run_script(main)
