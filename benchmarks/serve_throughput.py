"""Serving throughput of one model at two budgets: requests/s and tokens/s of ``serve`` under N concurrent clients.

What it measures: a random model of ``--model``'s shape whose trained region is the deepest half of its layers (the
paper's 50%) is written as a consolidated checkpoint into a temporary folder and served by ``python -m
epas_lightning serve`` in a subprocess. ``--clients`` threads each send ``--requests`` completions one after the
other (greedy, ``--prompt-len`` random token ids, ``--max-tokens`` new tokens, not streamed) to the same server, once
with ``sharing_layers: 0`` (dense) and once with the whole trained region; the two settings alternate over ``--reps``
rounds (forward order, then reversed), after one untimed warm-up round each. Reported per setting: the median
requests/s and completion tokens/s (``usage.completion_tokens`` over the wall time of a round), and the KV cache one
request held (``epas.kv_cache_bytes``). ``gain = tokens/s at the trained region / tokens/s dense - 1``.

Usage::

    python benchmarks/serve_throughput.py --model demo --clients 8

A table goes to stdout; the last line is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from harness import emit, preset_config
from safetensors.torch import save_file

from epas_lightning.data.tokenizer import train_byte_level_bpe
from epas_lightning.errors import ConfigError, run_script
from epas_lightning.model import Llama, LlamaConfig
from epas_lightning.runtime import json_text
from epas_lightning.script_args import ScriptParser, count

ROOT = Path(__file__).resolve().parents[1]
NAME = "bench"
START_TIMEOUT_S = 300


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ScriptParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="LlamaConfig preset name")
    p.add_argument("--clients", type=count, default=8, help="concurrent clients")
    p.add_argument("--requests", type=count, default=4, help="requests per client per round")
    p.add_argument("--prompt-len", type=count, default=32)
    p.add_argument("--max-tokens", type=count, default=64)
    p.add_argument("--reps", type=count, default=3, help="timed rounds per setting")
    p.add_argument("--max-batch-size", type=count, default=8, help="serve --max-batch-size")
    p.add_argument("--batch-timeout", type=float, default=0.05, help="serve --batch-timeout")
    p.add_argument("--device", default="cpu", help="serve --device")
    p.add_argument("--threads", type=count, default=None, help="torch threads of the server (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    quick = {"model": "debug", "clients": 2, "requests": 2, "reps": 1, "prompt_len": 8, "max_tokens": 8}
    p.add_quick("a tiny model and a few requests", **quick)
    return p.parse_args(argv)


def write_checkpoint(folder: Path, config: LlamaConfig, seed: int) -> tuple[int, int]:
    """A random model whose trained region is the deepest half of its layers; returns that region's size and the
    tokenizer's (serve takes prompt ids below it)."""
    texts = ["def main():\n    return 0\n", "import os\nprint('hello world')\n"] * 50
    tokenizer = train_byte_level_bpe(texts, min(config.vocab_size, 512))
    tokenizer.save(str(folder / "tokenizer.json"))
    torch.manual_seed(seed)
    model = Llama(config)
    n_shared = config.n_layer // 2
    layers = list(range(config.n_layer - n_shared, config.n_layer))
    model.set_shared_layers(layers)
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    record = {
        "model": config.to_dict(),
        "sharing": {"shared_layers": layers, "region": {"layers": layers[::-1], "order": "deep_first"}},
        "tokenizer": {"path": "tokenizer.json", "bos_id": 0, "eos_id": 1},
    }
    (folder / "config.json").write_text(json_text(record))
    return n_shared, tokenizer.get_vocab_size()


class Server:
    """``python -m epas_lightning serve`` in a subprocess, on a free port."""

    def __init__(self, checkpoint: Path, args: argparse.Namespace, log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        command = [
            sys.executable, "-m", "epas_lightning", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
            "--model-name", NAME, "--device", args.device, "--max-batch-size", str(args.max_batch_size),
            "--batch-timeout", str(args.batch_timeout),
        ]  # fmt: skip
        self.log_path, self.log = log, log.open("w")
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                silent = f"no answer within {START_TIMEOUT_S} s" if self.process.poll() is None else "no output"
                self.stop()
                raise ConfigError(f"the server did not start: {self.last_line() or silent}")
            time.sleep(0.5)

    def last_line(self) -> str:
        """The server's last output line (its one-line error, or the last line of a traceback): the log lives in a
        temporary folder that is gone when the script ends, so the reason travels in the message."""
        lines = [line.strip() for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1].removeprefix("error: ") if lines else ""

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def complete(self, body: dict) -> dict:
        data = json_text(body).encode()
        request = urllib.request.Request(self.url + "/v1/completions", data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())

    def stop(self) -> int:
        self.process.terminate()  # SIGTERM: a clean shutdown
        code = self.process.wait(timeout=120)
        self.log.close()
        return code


def run_round(server: Server, args: argparse.Namespace, prompts: list[list[int]], n_shared: int) -> dict:
    """Every client sends its requests one after the other; the round's wall time covers them all."""

    def client(c: int) -> list[dict]:
        out = []
        for r in range(args.requests):
            body = {
                "model": NAME, "prompt": prompts[(c * args.requests + r) % len(prompts)], "max_tokens": args.max_tokens,
                "temperature": 0, "sharing_layers": n_shared,
            }  # fmt: skip
            out.append(server.complete(body))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        responses = [r for rs in pool.map(client, range(args.clients)) for r in rs]
    seconds = time.perf_counter() - start
    tokens = sum(r["usage"]["completion_tokens"] for r in responses)
    return {
        "seconds": seconds,
        "requests": len(responses),
        "completion_tokens": tokens,
        "requests_per_s": len(responses) / seconds,
        "tokens_per_s": tokens / seconds,
        "kv_cache_bytes": responses[0]["epas"]["kv_cache_bytes"],
        "dense_kv_cache_bytes": responses[0]["epas"]["dense_kv_cache_bytes"],
        "mean_batch_size": statistics.mean(r["epas"]["batch_size"] for r in responses),
        "shared_layers": responses[0]["epas"]["shared_layers"],
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    config = preset_config(args.model, args.prompt_len + args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="serve_throughput_") as tmp:
        folder = Path(tmp) / "model"
        folder.mkdir()
        trained, vocab = write_checkpoint(folder, config, args.seed)
        generator = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(2, vocab, (args.clients * args.requests, args.prompt_len), generator=generator)
        settings = {"dense": 0, "trained": trained}
        server = Server(folder, args, Path(tmp) / "server.log")
        try:
            rounds: dict[str, list[dict]] = {label: [] for label in settings}
            for n in settings.values():
                run_round(server, args, prompts.tolist(), n)  # warm-up
            for rep in range(args.reps):
                order = list(settings.items())
                for label, n in order if rep % 2 == 0 else order[::-1]:
                    result = run_round(server, args, prompts.tolist(), n)
                    rounds[label].append(result)
                    print(f"  rep {rep} {label:>7}: {result['tokens_per_s']:9.1f} tok/s", flush=True)
        finally:
            exit_code = server.stop()
    summary = summarize(args, config, settings, rounds, exit_code)
    print_table(summary)
    return emit(summary)


def summarize(args, config: LlamaConfig, settings: dict, rounds: dict, exit_code: int) -> dict:
    results = {}
    for label, n in settings.items():
        last = rounds[label][-1]
        results[label] = {
            "sharing_layers": n,
            "shared_layers": last["shared_layers"],
            "requests_per_s": statistics.median(r["requests_per_s"] for r in rounds[label]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rounds[label]),
            "kv_cache_bytes_per_request": last["kv_cache_bytes"],
            "kv_cache_saving": 1 - last["kv_cache_bytes"] / last["dense_kv_cache_bytes"],
            "mean_batch_size": statistics.mean(r["mean_batch_size"] for r in rounds[label]),
            "rounds": rounds[label],
        }
    return {
        "model": args.model,
        "n_layer": config.n_layer,
        "device": args.device,
        "clients": args.clients,
        "requests_per_client": args.requests,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "max_batch_size": args.max_batch_size,
        "batch_timeout": args.batch_timeout,
        "reps": args.reps,
        "threads": args.threads,
        "results": results,
        "gain_tokens_per_s": results["trained"]["tokens_per_s"] / results["dense"]["tokens_per_s"] - 1,
        "gain_requests_per_s": results["trained"]["requests_per_s"] / results["dense"]["requests_per_s"] - 1,
        "server_exit_code": exit_code,
        "torch": torch.__version__,
    }


def print_table(s: dict) -> None:
    print()
    print(
        f"{s['model']} ({s['n_layer']} layers) on {s['device']}: {s['clients']} clients x {s['requests_per_client']} "
        f"requests, prompt {s['prompt_len']}, {s['max_tokens']} new tokens, median of {s['reps']}"
    )
    print(f"{'setting':>8} {'shared':>6} {'req/s':>8} {'tok/s':>9} {'KV/req KiB':>11} {'KV saved':>9} {'batch':>6}")
    for label, r in s["results"].items():
        print(
            f"{label:>8} {r['sharing_layers']:>6} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>9.1f} "
            f"{r['kv_cache_bytes_per_request'] / 1024:>11.1f} {r['kv_cache_saving']:>9.1%} {r['mean_batch_size']:>6.2f}"
        )
    print(f"gain at the trained region: {s['gain_tokens_per_s']:+.1%} tokens/s, {s['gain_requests_per_s']:+.1%} req/s")


if __name__ == "__main__":
    run_script(main)
