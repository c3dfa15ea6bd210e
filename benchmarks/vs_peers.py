"""Training tokens/s of ours (dense and EPAS) beside the dense trainers a user would otherwise pick: LitGPT's ``GPT``
with its training step and transformers' ``LlamaForCausalLM`` (SDPA).

Every system trains the same LLaMA shape on the same random tokens (sequence length, micro-batch, precision), with the
same AdamW (``epas_lightning.optim.default_optimizer``: one implementation and hyper-parameters, fused on CUDA). Each
starts from the same weights, and before anything is timed the peers' logits are checked against ours, so all of them
compute the same function. A step is each system's own training step:

- ``dense``: our ``Llama``, every layer computing, and our training loss (``epas_lightning.loss.train_loss``: the LM
  head and cross-entropy chunk by chunk, the logits never materialised; with ``--compile all`` each chunk's softmax
  and gradient compiled too, as ``fit`` with ``compile: true`` runs it);
- ``epas``: the same model and optimizer with the deepest ``--sharing`` fraction of layers reusing the Q/K of the last
  computing layer (``--attention-reuse``: also its attention probabilities, as ``EPASModule(attention_reuse=True)``);
- ``litgpt``: ``litgpt.model.GPT`` and ``litgpt.utils.chunked_cross_entropy``, as ``litgpt pretrain`` runs them;
- ``hf``: ``LlamaForCausalLM(attn_implementation="sdpa")`` computing its own loss from ``labels``;
- ``liger`` (optional, CUDA): ``dense`` with Liger's fused linear cross-entropy in place of ours;
- ``eager_ce`` (optional, with ``--compile all``): ``dense`` with the loss's softmax and gradient left eager, to
  measure what compiling them pays;
- ``whole_compile`` (optional, with ``--compile all``): ``dense`` with the model compiled as one graph from the
  embedding to the final norm (as the peers are) instead of block by block; the same loss;
- ``torch_sdpa`` (optional, where ``EPASModule``'s ``attention_kernel="auto"`` changes the kernel order, i.e. on
  Hopper GPUs): ``dense`` with torch's own SDPA kernel order, to measure what the preferred kernel pays;

then ``backward``, ``optimizer.step()`` and ``zero_grad(set_to_none=True)``. ``--compile`` compiles our decoder
blocks (``epas_lightning.parallel.parallelize``) and each peer's whole model (what ``litgpt pretrain`` does).

The systems alternate within each repetition (forward order, then reverse) after untimed warm-up steps; tokens/s are
medians over repetitions. The systems the targets need (``dense``, ``epas``, ``litgpt``, ``hf``) are timed first; the
optional ones after them, alternating with ``dense`` again (its rate there: ``optional_reference``), each started only
while ``--time-limit`` leaves the slowest warm-up so far (a whole-model compilation); then ``--profile``. Where a
required peer ran out of memory, neither runs: the time is left to a run at a smaller batch (gpu_session's retry).
``--partial FILE`` holds the result so far after each repetition (``"complete": false`` until the end): what a killed
run measured. The last line is JSON: the tokens/s (and on CUDA the timed steps' peak memory above their start, the
optimizer state already allocated, and the MFU in the paper's FLOPs convention, attention not halved, against
``--peak-tflops`` or the device's dense bf16 peak) of each system, ``best_peer``, ``dense_vs_best_peer`` and
``epas_vs_best_peer`` (tokens/s ratios) and the targets. Peers come from the ``bench`` extra (see ``pyproject.toml``);
a missing peer is skipped and reported.

Usage::

    python benchmarks/vs_peers.py --model llama-125m --seq-len 512 --reps 15         # CPU, fp32
    python benchmarks/vs_peers.py --model tinyllama-1.1b --seq-len 2048 --batch-size 4 --warmup 3 --device cuda
    python benchmarks/vs_peers.py --quick                                            # smoke test

On CUDA ``benchmarks/gpu_session.py`` runs it together with the ``fit``-path MFU in one lent-GPU session.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import math
import statistics
import time
from collections.abc import Callable

import torch
from harness import (
    BENCH_EXTRA,
    autocast_context,
    device_name,
    emit,
    json_text,
    preset_config,
    resolve_device,
    shape_flags,
    sharing_layers,
    synchronize,
    time_arms,
    token_batches,
)
from vs_hf import build_hf, check_same_logits

from epas_lightning.attention_kernels import sdpa_order
from epas_lightning.cpu import tune_glibc_malloc
from epas_lightning.errors import run_script
from epas_lightning.flops import estimate_flops, flop_cut, peak_flops
from epas_lightning.linear_ce import linear_cross_entropy
from epas_lightning.loss import train_loss
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.optim import default_optimizer
from epas_lightning.parallel import parallelize
from epas_lightning.runtime import write_whole
from epas_lightning.script_args import (
    ScriptParser,
    count,
    file_to_write,
    fraction,
    positive_number,
    whole_number,
)

REQUIRED = ("dense", "epas", "litgpt", "hf")
"""The systems the targets need, timed first; the others are exploratory and run after them while time is left."""
SYSTEMS = (*REQUIRED, "liger", "eager_ce", "torch_sdpa", "whole_compile")
PEERS = ("litgpt", "hf")
OUT_OF_MEMORY = "OutOfMemoryError"
"""How a system dropped for lack of memory starts its reason in ``skipped`` (the class name of torch's error)."""
MODULES = {"litgpt": "litgpt", "hf": "transformers", "liger": "liger_kernel"}
"""The package each optional system needs (``liger``: our dense model with Liger's fused linear cross-entropy)."""
INSTALL = {"litgpt": 'pip install --no-deps "litgpt==0.5.13"', "hf": BENCH_EXTRA, "liger": 'pip install ".[gpu]"'}
"""How to install each optional system's package (LitGPT without its pins, which conflict with ours)."""
TARGETS = {
    "cpu": {"dense_vs_best_peer": 0.98, "epas_vs_best_peer": 1.04},
    "cuda": {"dense_vs_best_peer": 1.0, "epas_vs_best_peer": 1.10},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    shape_flags(p, model="llama-125m", seq_len=512, batch_size=1)
    p.add_argument("--sharing", type=fraction, default=0.5, help="fraction of layers sharing in the EPAS arm")
    p.add_argument("--reps", type=count, default=7, help="timed repetitions per system")
    p.add_argument("--steps-per-rep", type=count, default=1)
    p.add_argument(
        "--warmup", type=whole_number(0), default=2, help="untimed steps per system first (compile: 3 or more)"
    )
    p.add_argument("--precision", choices=("auto", "32-true", "bf16-mixed"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--compile", choices=("auto", "none", "all"), default="auto", help="auto: all on CUDA, none on CPU")
    p.add_argument(
        "--attention-reuse",
        action="store_true",
        help="EPAS arm: sharing layers reuse the source's attention probabilities (EPASModule's attention_reuse)",
    )
    p.add_argument(
        "--tune-malloc",
        action="store_true",
        help="CPU: glibc keeps freed memory for reuse (epas_lightning.cpu.tune_glibc_malloc), for every system alike",
    )
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS[:4]))
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--threads", type=count, default=None)
    p.add_argument(
        "--peak-tflops", type=positive_number, default=None, help="device peak for MFU (default: known GPUs)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--profile",
        type=whole_number(0),
        default=0,
        metavar="N",
        help="after timing, profile one step of each system and report its N costliest ops (self device time)",
    )
    p.add_argument(
        "--time-limit",
        type=whole_number(0),
        default=None,
        metavar="S",
        help="seconds for the run: an optional system or profile starts only while they leave the slowest warm-up",
    )
    p.add_argument(
        "--partial", type=file_to_write, default=None, metavar="FILE", help="the result so far, after each rep"
    )
    p.add_quick("debug shape, seq 64, 2 reps", model="debug", seq_len=64, reps=2)
    return p.parse_args(argv)


def litgpt_config(config: LlamaConfig):  # noqa: ANN201
    """The ``litgpt.Config`` of the same network (LitGPT's LLaMA settings, as its ``tiny-llama-1.1b`` entry)."""
    from litgpt.config import Config

    return Config(
        name="epas-peer",
        block_size=config.block_size,
        vocab_size=config.vocab_size,
        padded_vocab_size=config.padded_vocab_size,
        n_layer=config.n_layer,
        n_head=config.n_head,
        n_query_groups=config.n_kv_head,
        n_embd=config.n_embd,
        head_size=config.head_dim,
        intermediate_size=config.intermediate_size,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        norm_eps=config.norm_eps,
        mlp_class_name="LLaMAMLP",
        rope_base=int(config.rope_theta),
    )


def build_litgpt(ours: Llama, seq_len: int):  # noqa: ANN201
    """``litgpt.model.GPT`` holding a copy of ``ours``'s weights (q, k, v stacked into LitGPT's ``qkv``)."""
    from litgpt.model import GPT

    model = GPT(litgpt_config(ours.config))
    src = ours.state_dict()
    state = {
        "transformer.wte.weight": src["embed_tokens.weight"],
        "transformer.ln_f.weight": src["norm.weight"],
        "lm_head.weight": src["lm_head.weight"],
    }
    names = {
        "norm_1": "input_layernorm",
        "norm_2": "post_attention_layernorm",
        "attn.proj": "self_attn.o_proj",
        "mlp.fc_1": "mlp.gate_proj",
        "mlp.fc_2": "mlp.up_proj",
        "mlp.proj": "mlp.down_proj",
    }
    for i in range(ours.config.n_layer):
        ours_block, theirs = f"layers.{i}.", f"transformer.h.{i}."
        for name, our_name in names.items():
            state[f"{theirs}{name}.weight"] = src[f"{ours_block}{our_name}.weight"]
        qkv = [src[f"{ours_block}self_attn.{p}_proj.weight"] for p in "qkv"]
        state[f"{theirs}attn.qkv.weight"] = torch.cat(qkv)
    model.load_state_dict(state, strict=True)
    model.max_seq_length = seq_len
    return model


class System:
    """A model, its optimizer and its training step; ``peak`` collects each timed step's peak memory (CUDA)."""

    def __init__(self, model: torch.nn.Module, loss: Callable, optimizer: torch.optim.Optimizer, before=None) -> None:  # noqa: ANN001
        self.model, self.loss, self.optimizer, self.before = model, loss, optimizer, before
        self.peak: list[int] = []

    def step(self, batch: torch.Tensor, autocast: Callable[[], contextlib.AbstractContextManager]) -> None:
        if self.before is not None:
            self.before()
        device = batch.device
        if device.type == "cuda":
            start = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with autocast():
            loss = self.loss(batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            self.peak.append(torch.cuda.max_memory_allocated(device) - start)


def build_systems(
    args: argparse.Namespace, config: LlamaConfig, device: torch.device, skipped: dict[str, str]
) -> tuple[dict[str, System], dict[str, float], list[int]]:
    """Every requested system on ``device`` (``skipped`` gets those that would repeat another), the peers' logit
    differences from ours, and the EPAS region."""
    torch.manual_seed(args.seed)
    ours = Llama(config)
    peers: dict[str, torch.nn.Module] = {}
    if "litgpt" in args.systems:
        peers["litgpt"] = build_litgpt(ours, args.seq_len)
    if "hf" in args.systems:
        peers["hf"] = build_hf(ours)
    probe = torch.randint(0, config.vocab_size, (1, min(args.seq_len, 128)), generator=torch.Generator().manual_seed(1))
    diffs = check_same_logits(ours, {name: peer_logits(name, model) for name, model in peers.items()}, probe)
    compile_all = args.compile == "all"
    ours = parallelize(ours.to(device), None, compile=compile_all)
    kernels = sdpa_order("auto", device, config)  # as EPASModule's default
    ours.sdpa_order = kernels  # the model's order from the start, as EPASModule sets it; the arms switch it
    optimizer = default_optimizer(ours)
    region = sharing_layers(config.n_layer, args.sharing)

    def use(layers: list[int], reuse: bool, order: tuple | None = kernels) -> Callable[[], None]:
        def switch() -> None:
            ours.set_shared_layers(layers)
            ours.attention_reuse = reuse
            ours.sdpa_order = order

        return switch

    systems: dict[str, System] = {}
    if "dense" in args.systems:
        systems["dense"] = System(ours, lambda b: train_loss(ours, b, compile_all), optimizer, use([], False))
    if "epas" in args.systems:
        epas_loss = lambda b: train_loss(ours, b, compile_all)  # noqa: E731
        systems["epas"] = System(ours, epas_loss, optimizer, use(region, args.attention_reuse))
    if "eager_ce" in args.systems:
        systems["eager_ce"] = System(ours, lambda b: train_loss(ours, b), optimizer, use([], False))
    if "torch_sdpa" in args.systems and kernels is not None:
        torch_order = use([], False, order=None)
        systems["torch_sdpa"] = System(ours, lambda b: train_loss(ours, b, compile_all), optimizer, torch_order)
    elif "torch_sdpa" in args.systems:
        skipped["torch_sdpa"] = "the same step as dense: attention_kernel='auto' keeps torch's order on this device"
    if "liger" in args.systems:
        systems["liger"] = System(ours, liger_loss(ours), optimizer, use([], False))
    if "whole_compile" in args.systems:
        systems["whole_compile"] = System(ours, whole_model_loss(ours, compile_all), optimizer, use([], False))
    for name, model in peers.items():
        model.to(device)
        run = torch.compile(model) if compile_all else model
        systems[name] = System(model, peer_loss(name, run), default_optimizer(model))
    return systems, diffs, region


def peer_logits(name: str, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "litgpt":
        return model
    return lambda input_ids: model(input_ids=input_ids, use_cache=False).logits


def peer_loss(name: str, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The peer's own training loss on a token batch (B, T + 1)."""
    if name == "litgpt":  # as `litgpt pretrain`: full logits, then its chunked cross-entropy
        from litgpt.utils import chunked_cross_entropy

        return lambda batch: chunked_cross_entropy(model(batch[:, :-1]), batch[:, 1:])

    # HF: the model computes its loss from labels (already shifted: `shift_labels`), which it flattens with `view`:
    # contiguous, as a data loader gives them (a slice of a batch of several rows cannot be viewed flat)
    def hf_loss(batch: torch.Tensor) -> torch.Tensor:
        labels = batch[:, 1:].contiguous()
        return model(input_ids=batch[:, :-1], labels=labels, shift_labels=labels, use_cache=False).loss

    return hf_loss


def liger_loss(model: Llama) -> Callable[[torch.Tensor], torch.Tensor]:
    """``train_loss`` with Liger's fused linear cross-entropy (Triton, CUDA) in place of our chunked one."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    fused = LigerFusedLinearCrossEntropyLoss()
    vocab_size = model.config.vocab_size

    def head(targets: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def loss(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled(hidden.device.type):  # Liger takes the compute dtype as given
                dtype = torch.get_autocast_dtype(hidden.device.type)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            return fused(weight[:vocab_size], hidden.flatten(0, 1), targets.flatten())

        return loss

    return lambda batch: model(batch[:, :-1], head=head(batch[:, 1:]))


def whole_model_loss(model: Llama, compile: bool | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """``train_loss`` with the model compiled whole, embedding to final norm, as one graph (the blocks' own compiled
    code is traced through), then the same chunked loss on its output (``compile``: the backend, as ``train_loss``)."""
    backend = "inductor" if compile is True else compile
    body = torch.compile(lambda ids: model(ids, head=_final_hidden), fullgraph=True, backend=backend)

    vocab_size = model.config.vocab_size

    def loss(batch: torch.Tensor) -> torch.Tensor:
        hidden = body(batch[:, :-1])
        return linear_cross_entropy(hidden, model.lm_head.weight, batch[:, 1:], vocab_size, compile=compile)

    return loss


def _final_hidden(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return hidden


def available_systems(
    requested: list[str], device: torch.device, compile_mode: str
) -> tuple[list[str], dict[str, str]]:
    """The requested systems that can run here, and why the others were skipped."""
    skipped = {s: f"{MODULES[s]} not installed: {INSTALL[s]}" for s in requested if s in MODULES}
    skipped = {s: why for s, why in skipped.items() if importlib.util.find_spec(MODULES[s]) is None}
    if "liger" in requested and device.type != "cuda":
        skipped["liger"] = "Liger's kernels need CUDA"
    for arm in ("eager_ce", "whole_compile"):
        if arm in requested and compile_mode != "all":
            skipped[arm] = "the same step as dense without --compile all"
    return [s for s in requested if s not in skipped], skipped


def drop_failing_systems(
    systems: dict[str, System], names: list[str], skipped: dict[str, str], batch: torch.Tensor, autocast, steps: int = 1
) -> dict[str, float]:  # noqa: ANN001
    """``steps`` untimed steps of each of ``names`` (peers, optional systems): one that fails (out of memory, a compile
    error) is dropped with the reason in ``skipped``, so it costs its arm and not the run; the seconds each took. Our
    ``dense`` and ``epas`` are not tried here: their errors raise."""
    seconds = {}
    for name in names:
        start = time.monotonic()
        try:
            for _ in range(steps):
                systems[name].step(batch, autocast)
            synchronize(batch.device)
            seconds[name] = time.monotonic() - start
            continue
        except Exception as error:  # noqa: BLE001
            skipped[name] = f"{type(error).__name__}: {error}"[:300]
        systems.pop(name).optimizer.zero_grad(set_to_none=True)  # (Liger shares our optimizer)
        gc.collect()  # outside the except block: its traceback no longer holds the failed step's tensors
        if batch.device.type == "cuda":
            torch.cuda.empty_cache()
    return seconds


class Progress:
    """The result so far, written to ``--partial`` (a temporary file renamed over it) whenever it grows."""

    def __init__(self, args: argparse.Namespace, summary: Callable[..., dict], extra: dict) -> None:
        self.args, self.summary, self.extra = args, summary, extra
        self.required: dict = {}
        self.optional: dict = {}

    def result(self, complete: bool = False) -> dict:
        result = {**(self.required or self.optional), **self.extra, "complete": complete}
        if self.optional:
            result = with_optional(result, self.optional)
        return result

    def required_rep(self, times: dict, loads: dict) -> None:
        self.required = self.summary(times, loads)
        self.write()

    def optional_rep(self, times: dict, loads: dict) -> None:
        self.optional = self.summary(times, loads)
        self.write()

    def write(self, complete: bool = False) -> None:
        if self.args.partial is not None:
            write_whole(self.args.partial, json_text(self.result(complete)) + "\n")


def with_optional(result: dict, optional: dict) -> dict:
    """``result`` (the required systems) with the optional systems' figures, timed alternating with ``dense`` again:
    its rate in their repetitions is ``optional_reference``."""
    result = dict(result)
    arms = [name for name in optional["tokens_per_s"] if name not in REQUIRED]
    for key in ("tokens_per_s", "mfu", "step_peak_memory_mib", "rep_seconds", "rep_foreign_load", "reps_done"):
        if optional.get(key) is not None:
            result[key] = {**(result.get(key) or {}), **{name: optional[key][name] for name in arms}}
    result["versions"] = {**result.get("versions", {}), **optional["versions"]}
    dense = optional["tokens_per_s"].get("dense")
    result["optional_reference"] = {"dense_tokens_per_s": dense, "reps_done": optional["reps_done"].get("dense")}
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    deadline = time.monotonic() + (math.inf if args.time_limit is None else args.time_limit)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tune_malloc:
        args.tune_malloc = tune_glibc_malloc()
    device = resolve_device(args.device)
    if args.precision == "auto":
        args.precision = "bf16-mixed" if device.type == "cuda" else "32-true"
    if args.compile == "auto":
        args.compile = "all" if device.type == "cuda" else "none"
    args.systems, skipped = available_systems(args.systems, device, args.compile)
    config = preset_config(args.model, args.seq_len)
    systems, diffs, shared = build_systems(args, config, device, skipped)
    autocast = autocast_context(args.precision, device)
    generator = torch.Generator().manual_seed(args.seed)
    batches = [
        b.to(device) for b in token_batches(config, args.batch_size, args.seq_len, args.steps_per_rep, generator)
    ]

    warm_ups = drop_failing_systems(
        systems, [n for n in REQUIRED if n in PEERS and n in systems], skipped, batches[0], autocast
    )

    def steps(system: System) -> Callable[[], None]:
        return lambda: [system.step(batch, autocast) for batch in batches]

    print(
        f"ours vs peers: {args.model}, seq {args.seq_len} x batch {args.batch_size}, {args.precision}, compile "
        f"{args.compile}, EPAS shares {shared} (attention reuse {args.attention_reuse}); peers' logits vs ours "
        f"{diffs}; skipped {skipped or 'none'}",
        flush=True,
    )
    order = systems["dense"].model.sdpa_order if "dense" in systems else None
    extra = {"logits_max_abs_diff": diffs, "skipped": skipped, "sdpa_order": order and [k.name for k in order]}
    progress = Progress(
        args, lambda times, loads: summarize(args, config, device, systems, times, loads, shared), extra
    )
    required = {name: steps(systems[name]) for name in REQUIRED if name in systems}
    time_arms(required, args.reps, device, warmup=args.warmup, after_rep=progress.required_rep)

    warm = []
    short_of_memory = [n for n in REQUIRED if skipped.get(n, "").startswith(OUT_OF_MEMORY)]
    for name in [n for n in SYSTEMS if n in systems and n not in REQUIRED]:
        slowest, left = max(warm_ups.values(), default=0.0), deadline - time.monotonic()
        if short_of_memory:  # gpu_session retries at half the batch: leave it the time this would take
            lacking = ", ".join(short_of_memory)
            skipped[name] = f"not started: {lacking} ran out of memory (time left to a smaller --batch-size)"
            systems.pop(name)
        elif left < slowest:
            skipped[name] = f"not started: {max(left, 0):.0f} s of --time-limit left, a warm-up took {slowest:.0f} s"
            systems.pop(name)
        else:
            warm_ups |= drop_failing_systems(systems, [name], skipped, batches[0], autocast, steps=1 + args.warmup)
            warm += [name] if name in systems else []
        progress.write()
    if warm:
        optional = {name: steps(systems[name]) for name in ["dense", *warm] if name in systems}
        times, _ = time_arms(optional, args.reps, device, warmup=0, after_rep=progress.optional_rep, deadline=deadline)
        skipped |= {name: "warmed up, not timed: --time-limit reached" for name in warm if not times[name]}
    if args.profile and not short_of_memory:  # (nor the profiles)
        extra["profile"] = {}
        for name in [n for n in SYSTEMS if n in systems]:
            extra["profile"][name] = profiled(name, systems[name], batches[0], autocast, args.profile, deadline)
            progress.write()
    result = progress.result(complete=True)
    progress.write(complete=True)
    print_table(result)
    emit(result)
    return result


def profiled(name: str, system: System, batch: torch.Tensor, autocast, top: int, deadline: float) -> dict:  # noqa: ANN001
    """``profile_step`` while the deadline allows; an error is the profile's, not the run's."""
    if time.monotonic() > deadline:
        return {"skipped": "not started: --time-limit reached"}
    try:
        return profile_step(name, system, batch, autocast, top)
    except Exception as error:  # noqa: BLE001
        return {"error": f"{type(error).__name__}: {error}"[:300]}


def profile_step(name: str, system: System, batch: torch.Tensor, autocast, top: int) -> dict:  # noqa: ANN001
    """One step under ``torch.profiler``: the ``top`` ops by self time on the device (CPU time on a CPU), in ms, and
    the step's total; printed as a table, returned for the JSON. Where a gap between systems lies, op by op."""
    from torch.profiler import ProfilerActivity, profile

    cuda = batch.device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        system.step(batch, autocast)
        synchronize(batch.device)

    def self_ms(event) -> float:  # noqa: ANN001
        us = getattr(event, "self_device_time_total", None) if cuda else event.self_cpu_time_total
        return (us or 0.0) / 1e3

    events = sorted(prof.key_averages(), key=self_ms, reverse=True)
    ops = [{"op": e.key[:80], "calls": e.count, "self_ms": round(self_ms(e), 3)} for e in events[:top]]
    total = sum(self_ms(e) for e in events)
    print(f"\n{name}: one step's profile, {total:.1f} ms self {'device' if cuda else 'CPU'} time; costliest ops:")
    for op in ops:
        print(f"  {op['self_ms']:9.3f} ms {op['calls']:6d}x  {op['op']}")
    return {"total_self_ms": round(total, 3), "ops": ops}


def summarize(args, config, device, systems, times, loads, shared) -> dict:  # noqa: ANN001
    tokens = args.steps_per_rep * args.batch_size * args.seq_len
    tps = {name: tokens / statistics.median(t) for name, t in times.items()}
    n_shared = {name: len(shared) if name == "epas" else 0 for name in tps}
    flops = {name: estimate_flops(config, n_shared[name], args.seq_len) / args.seq_len for name in tps}
    name = device_name(device)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(device, torch.bfloat16)
    if args.precision == "32-true" and not args.peak_tflops:
        peak = None
    peers = {p: tps[p] for p in PEERS if p in tps}
    best = max(peers, key=peers.get) if peers else None
    ratios = {f"{s}_vs_best_peer": tps[s] / peers[best] for s in ("dense", "epas") if s in tps and best}
    targets = TARGETS[device.type]
    memory = step_peaks_mib(systems, times, args.steps_per_rep) if device.type == "cuda" else None
    result = {
        "model": args.model,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "compile": args.compile,
        "attention_reuse": args.attention_reuse,
        "tune_malloc": args.tune_malloc,
        "device": device.type,
        "device_name": name,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "n_shared": len(shared),
        "flop_cut": flop_cut(config, len(shared), args.seq_len),
        "tokens_per_s": tps,
        "best_peer": best,
        **ratios,
        "epas_vs_dense": tps["epas"] / tps["dense"] if {"epas", "dense"} <= set(tps) else None,
        "targets": targets,
        "targets_met": {k: ratios[k] >= v for k, v in targets.items() if k in ratios},
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": {s: tps[s] * flops[s] / peak for s in tps} if peak else None,
        "step_peak_memory_mib": memory,
        "reps": args.reps,
        "reps_done": {name: len(t) for name, t in times.items()},
        "steps_per_rep": args.steps_per_rep,
        "order": "ABBA",
        "rep_seconds": times,
        "rep_foreign_load": loads,
        "torch": torch.__version__,
        "versions": {s: _version(MODULES[s]) for s in MODULES if s in tps},
    }
    return result


def step_peaks_mib(systems: dict[str, System], times: dict[str, list[float]], steps_per_rep: int) -> dict[str, float]:
    """Each timed system's highest step peak (MiB above the step's start) over its timed steps, its last ones: the
    first step an optimizer takes allocates its AdamW state, which counted in the peak of whichever system warmed it up
    (dense and the peers, not the systems sharing our optimizer)."""
    return {name: max(systems[name].peak[-len(t) * steps_per_rep :]) / 2**20 for name, t in times.items()}


def _version(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return getattr(__import__(module), "__version__", None)


def print_table(r: dict) -> None:
    print()
    print(f"{r['model']}  seq {r['seq_len']} x batch {r['batch_size']}  {r['precision']}  on {r['device_name']}")
    mfu, memory = r["mfu"], r["step_peak_memory_mib"]  # MFU needs a peak, memory CUDA: either may be missing
    header = f"{'system':<14}{'tokens/s':>12}{'vs best peer':>14}"
    header += (f"{'MFU':>8}" if mfu else "") + (f"{'peak MiB':>10}" if memory else "")
    print(header)
    best = r["tokens_per_s"].get(r["best_peer"]) if r["best_peer"] else None
    for s, v in r["tokens_per_s"].items():
        line = f"{s:<14}{v:>12.1f}{(v / best if best else float('nan')):>14.3f}"
        line += (f"{mfu[s]:>8.3f}" if mfu else "") + (f"{memory[s]:>10.0f}" if memory else "")
        print(line)
    loads = [x for v in r["rep_foreign_load"].values() for x in v if x is not None]
    if loads:
        print(f"foreign load per rep (cores): median {statistics.median(loads):.2f}, max {max(loads):.2f}")
    print(f"flop_cut {r['flop_cut']:.4f}; targets {r['targets']}; met {r['targets_met']}")


if __name__ == "__main__":
    run_script(main)
