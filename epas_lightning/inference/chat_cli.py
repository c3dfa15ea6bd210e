"""``python -m epas_lightning chat --checkpoint ... [--system ...]``: talk to an instruct model in the terminal."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from epas_lightning.checkpoint import describe_checkpoint
from epas_lightning.data.tokenizer import TextTokenizer, check_tokenizer_flag
from epas_lightning.errors import ConfigError, error_line
from epas_lightning.inference.chat import Conversation, Sampling, stream_reply
from epas_lightning.inference.generate import set_region
from epas_lightning.inference.generate_cli import (
    check_device,
    check_sampling_flags,
    check_seed,
    describe_region,
    load_for_inference,
    resolve_tokenizer,
)
from epas_lightning.region import SHARING_FLAGS
from epas_lightning.runtime import DType, check_counts
from epas_lightning.serve.chat import checked_chat_template

DEFAULT_REPLY_TOKENS = 512
"""The longest reply by default (at most half the model's context length)."""
RESET, EXIT = "/reset", "/exit"
PROMPT, REPLY = ">> Prompt: ", ">> Reply: "
"""What a terminal shows before the user's line and before the reply (as LitGPT's chat)."""


def chat_command(
    checkpoint: Path,
    system: str | None = None,
    sharing_layers: int | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.8,
    top_k: int | None = 50,
    top_p: float | None = None,
    seed: int = 1234,
    tokenizer: Path | None = None,
    device: str = "auto",
    dtype: DType = "auto",
    attention_reuse: bool = True,
    force: bool = False,
) -> None:
    """Talk to an instruct model in the terminal, at any sharing region it trained.

    Each line read is a user message: the whole conversation is rendered with the checkpoint's chat template (as
    serve's chat renders it) and the reply streams to stdout until an end token of the model. Piped input works the
    same (each line a message; the command ends at its end): replies go to stdout, one after the other, each ending
    with a newline; the region and notes go to stderr. /reset clears the history, /exit or Ctrl+D quits, Ctrl+C
    during a reply stops it (what was shown stays in the history; at a terminal's prompt it clears the line; before
    the reply starts it drops the message). Each reply prefills the whole conversation anew (no KV cache is kept
    across turns: the template renders the history anew). A conversation that outgrows the model's context drops its
    oldest turns (the system message stays), said once on stderr; a message too long even alone is refused in one
    line (in a terminal the chat goes on; piped, it stops with exit status 2, naming the message's line: going on
    would shift every later reply against its line).

    Args:
        checkpoint: A .ckpt file, an FSDP2 checkpoint folder, a consolidated folder or a Hugging Face LLaMA folder.
        system: A system message that starts the conversation (kept when turns are dropped or /reset).
        sharing_layers: The first N layers of the trained region (in its growth order) share; default: all of it (an
            export's folder: the N it was exported with).
        max_new_tokens: The longest reply, in tokens (default: 512, or half the model's context length if less);
            the conversation is kept short enough to leave it room.
        temperature: 0 is greedy decoding.
        top_k: Sample among the k most likely tokens.
        top_p: Sample among the most likely tokens whose probability reaches p; 0 keeps the most likely alone
            (greedy decoding, as serve's top_p 0).
        seed: Seed of the first reply's sampling; each later reply takes the next seed.
        tokenizer: Tokenizer file or folder (default: the one the checkpoint records); its folder's chat template is
            the one used.
        device: auto (CUDA when available), cpu, cuda, cuda:1, ...
        dtype: Weights and activations; auto is bfloat16 on CUDA (float16 before Ampere: V100, T4), float32 elsewhere.
        attention_reuse: Sharing layers reuse the source layer's attention probabilities (the same model, less work).
        force: Allow a region longer than the trained one (its extra layers never learned to share: quality drops
            sharply); of a stock export, which runs dense, any region above 0.
    """
    check_sampling_flags(temperature, top_k, top_p)  # everything is checked before the weights load
    check_seed(seed)
    check_counts({"--max-new-tokens": max_new_tokens})
    check_device(device, dtype)
    check_tokenizer_flag(tokenizer)
    recorded = describe_checkpoint(checkpoint)
    text_tokenizer = resolve_tokenizer(recorded, tokenizer)
    where = f"--checkpoint {checkpoint}" if tokenizer is None else f"--tokenizer {tokenizer}"
    template = chat_template(text_tokenizer, where)
    n_shared = recorded.default_sharing if sharing_layers is None else sharing_layers
    recorded.region.first(n_shared, force, SHARING_FLAGS)
    context_length = recorded.config.context_length
    reply_tokens = reply_length(max_new_tokens, context_length)
    conversation = Conversation(template, text_tokenizer, context_length, reply_tokens, system)
    conversation.check_room()
    loaded = load_for_inference(checkpoint, device, dtype, attention_reuse)
    layers = set_region(loaded.model, n_shared, loaded.region, force)
    interactive = sys.stdin.isatty()
    keys = "; /reset clears the history, /exit or Ctrl+D quits, Ctrl+C stops a reply" if interactive else ""
    print(f"chat: {describe_region(loaded, layers)}; replies of up to {reply_tokens} tokens{keys}", file=sys.stderr)
    if interactive:
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 reach the message's check, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    replies, told, number = 0, False, 0
    while (line := read_line(interactive)) is not None:
        number += 1
        text = line.strip()
        if text == EXIT:
            break
        if text == RESET:
            conversation.reset()
            told = False
            print("history cleared", file=sys.stderr)
            continue
        if not text:
            continue
        try:
            prompt, dropped = conversation.prompt(text)
        except ConfigError as e:
            if not interactive:
                raise on_input_line(e, number) from None
            print(error_line(e), file=sys.stderr)
            continue
        except KeyboardInterrupt:  # just after the line was sent, as the reply is about to start: drop the message
            if not interactive:
                raise
            print("message dropped (Ctrl+C)", file=sys.stderr)
            continue
        if dropped and not told:
            told = True
            print(dropped_note(context_length, reply_tokens, system is not None), file=sys.stderr)
        if interactive:
            write(REPLY)
        sampling = Sampling(temperature, top_k, top_p, seed + replies)
        reply, stopped = stream_reply(loaded.model, prompt, text_tokenizer, reply_tokens, sampling, write)
        write("\n")
        if stopped:
            print("reply stopped (Ctrl+C); what was shown stays in the history", file=sys.stderr)
        conversation.answer(reply)
        replies += 1
    if interactive and line is None:  # Ctrl+D: the shell's prompt on a line of its own
        write("\n")


def on_input_line(error: ConfigError, number: int) -> ConfigError:
    """``error`` about a piped message, naming the message's line of the input (piped, "the message" said not which
    of the lines it was)."""
    if error.where != "the message":
        return error
    return ConfigError(error.what, f"the message on line {number} of the input", error.fix)


def dropped_note(context_length: int, reply_tokens: int, system: bool) -> str:
    """The note said when a conversation first drops its oldest turns (the system message, if any, stays)."""
    return (
        f"note: the conversation outgrew the model's context length of {context_length} tokens (with room for a reply "
        f"of {reply_tokens}): its oldest turns are dropped from now on{'; the system message stays' if system else ''}"
    )


def chat_template(tokenizer: TextTokenizer, where: str) -> str:
    """The chat template beside the tokenizer file; a :class:`ConfigError` saying what to do when there is none."""
    template, why = checked_chat_template(tokenizer.path)
    if template is None:
        raise ConfigError(
            why,
            where,
            "pass --tokenizer <a folder holding this tokenizer and its chat template>; a base model continues text "
            "with `generate`",
        )
    return template


def reply_length(max_new_tokens: int | None, context_length: int) -> int:
    """``--max-new-tokens``, checked to leave room for a message, or its default."""
    if max_new_tokens is None:
        return min(DEFAULT_REPLY_TOKENS, context_length // 2)
    if max_new_tokens >= context_length:
        raise ConfigError(
            f"a reply of {max_new_tokens} tokens leaves no room for a message in the model's context length of "
            f"{context_length}",
            "--max-new-tokens",
            f"ask for at most {context_length - 1}",
        )
    return max_new_tokens


def read_line(interactive: bool) -> str | None:
    """The next line of input (with the prompt in a terminal), or ``None`` at its end (Ctrl+D). Ctrl+C at the prompt
    of a terminal drops the line typed and asks again (a second Ctrl+C meant for a reply that just ended would
    otherwise end the conversation)."""
    while True:
        try:
            return input(PROMPT if interactive else "")
        except EOFError:
            return None
        except KeyboardInterrupt:
            if not interactive:
                raise
            write("\n")
            print("(/exit or Ctrl+D quits)", file=sys.stderr)


def write(text: str) -> None:
    """Text on stdout at once (a reply streams)."""
    sys.stdout.write(text)
    sys.stdout.flush()
