"""README.md, docs/guide.md and the configs cannot drift from the code: the guide's speed-up table is regenerated and
compared, the commands they quote are checked against the parsers, the README's Python blocks for training and
generating run, and every other Python block compiles and imports names that exist."""

import ast
import importlib
import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_table_script():
    spec = importlib.util.spec_from_file_location("make_speedup_table", REPO / "docs" / "make_speedup_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guide_speedup_table_is_the_generated_one():
    script = load_table_script()
    table = script.speedup_table()
    assert script.guide_table((REPO / "docs" / "guide.md").read_text()) == table, (
        "docs/guide.md is out of date: run `python docs/make_speedup_table.py --write`"
    )
    # the FLOPs model reproduces the paper's Table 1 in the rows the guide shows
    assert "| 1.81 | 3, 1.77" in table and "6, 1.72" in table
    assert "| 14.98 |" in table and "11, 14.34" in table


@pytest.mark.parametrize("blank", ["", "\n"])
def test_write_updates_only_the_table_whatever_the_blank_lines_around_it(tmp_path, monkeypatch, blank):
    """The table used to be matched with exactly one newline on each side: with a blank line it was left stale while
    the script said "updated"."""
    script = load_table_script()
    guide = tmp_path / "guide.md"
    guide.write_text(f"intro\n{script.BEGIN}\n{blank}| stale |\n{blank}{script.END}\noutro\n")
    monkeypatch.setattr(script, "GUIDE", guide)
    assert script.main(["--write"]) == 0
    assert guide.read_text() == f"intro\n{script.BEGIN}\n{script.speedup_table()}\n{script.END}\noutro\n"


DOCS = ("README.md", "docs/guide.md", "benchmarks/RESULTS.md")


def quoted_commands(text: str) -> list[str]:
    """Every command line the text quotes: the lines of its fenced blocks (``\\`` continuations joined) and its inline
    code spans (which may wrap onto the next line), each without a trailing ``# comment``."""
    text = text.replace("\\\n", " ")
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)
    outside = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    lines = [line for block in blocks for line in block.splitlines()]
    lines += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", outside)]
    return [line.split(" # ")[0] for line in lines]


def config_comment_commands(text: str) -> list[str]:
    """The command lines a YAML config's comments quote (``\\`` continuations joined)."""
    comments = "\n".join(
        line.lstrip().lstrip("#").strip() for line in text.splitlines() if line.lstrip().startswith("#")
    )
    return [line.split(" # ")[0] for line in comments.replace("\\\n", " ").splitlines()]


def flags(arguments: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", arguments))


def lightning_flags(arguments: str) -> set[str]:
    """The flags of a ``fit``/``validate``/``test`` command line: dotted (``--trainer.max_steps``), maybe ``=value``."""
    return set(re.findall(r"(?<![\w-])(--[a-z][\w.-]*[\w])", arguments))


def lightning_help(command: str, capsys) -> str:  # noqa: ANN001
    from epas_lightning.cli import main

    assert main([command, "--help"]) == 0
    return capsys.readouterr().out


def known_lightning_flag(flag: str, help_text: str) -> bool:
    """``flag`` is an option the help lists, or sets an argument of the class given to one (``--trainer.logger`` for
    ``--trainer.logger.init_args.name``; a section's own option, ``--trainer CONFIG``, does not count)."""
    parts = flag.split(".")
    prefixes = [".".join(parts[:n]) for n in range(min(2, len(parts)), len(parts) + 1)]
    return any(re.search(rf"(?<![\w.-]){re.escape(prefix)}(?![\w.-])", help_text) for prefix in prefixes)


def script_help(script: Path, positionals: list[str], monkeypatch, capsys) -> str:  # noqa: ANN001
    """The ``--help`` of a script (of its subcommand, for ``gpu_session.py run``), run in this process."""
    spec = importlib.util.spec_from_file_location(f"doc_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [str(script), *positionals, "--help"])
    with pytest.raises(SystemExit):
        module.main()
    return capsys.readouterr().out


def test_quoted_commands_use_flags_that_exist(monkeypatch, capsys):
    """The commands README.md, the guide, RESULTS.md and the configs' comments tell a user to run take those flags:
    every tool command's, every ``fit``/``validate``/``test``'s and every benchmark or experiment script's flags are
    checked against its parser."""
    from epas_lightning.cli import LIGHTNING_COMMANDS, TOOLS, function_parser, tool
    from epas_lightning.config_resolution import packaged_config

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    tool_flags = {name: set(function_parser(tool(name), name)._option_string_actions) for name in TOOLS}
    tool_command = re.compile(r"epas_lightning (" + "|".join(map(re.escape, TOOLS)) + r")\b(.*)")
    lightning_command = re.compile(r"epas_lightning (" + "|".join(LIGHTNING_COMMANDS) + r")\b(.*)")
    script_command = re.compile(r"python3? ((?:benchmarks|experiments)/\w+\.py)((?: +[a-z]\w*)*)(.*)")
    quoted = [(doc, line) for doc in DOCS for line in quoted_commands((REPO / doc).read_text())]
    quoted += [
        (f"configs/{config.name}", line)
        for config in sorted((REPO / "configs").glob("*.yaml"))
        for line in config_comment_commands(config.read_text())
    ]
    unknown, helps, lightning_helps = [], {}, {}
    for doc, line in quoted:
        if match := lightning_command.search(line):
            name, arguments = match.groups()
            if name not in lightning_helps:
                lightning_helps[name] = lightning_help(name, capsys)
            for flag in sorted(lightning_flags(arguments)):
                if not known_lightning_flag(flag, lightning_helps[name]):
                    unknown.append(f"{doc}: {name} {flag}")
            for config in re.findall(r"--config[ =](\S+)", arguments):
                if config != "..." and packaged_config(config) is None and not (REPO / config).is_file():
                    unknown.append(f"{doc}: {name} --config {config} (no such config)")
        elif match := tool_command.search(line):
            name, arguments = match.groups()
            unknown += [f"{doc}: {name} {flag}" for flag in sorted(flags(arguments) - tool_flags[name])]
        elif match := script_command.search(line):
            script, positionals, arguments = match.group(1), match.group(2).split(), match.group(3)
            key = (script, *positionals)
            if key not in helps:
                helps[key] = script_help(REPO / script, positionals, monkeypatch, capsys)
            unknown += [f"{doc}: {script} {flag}" for flag in sorted(flags(arguments) - flags(helps[key]))]
    assert len(helps) >= 10 and set(lightning_helps) == {"fit"}  # the scripts and the fit commands were found
    assert unknown == []


@pytest.mark.parametrize("doc", ["README.md", "docs/guide.md"])
def test_command_tables_name_every_command(doc):
    """The command table of README.md and of the guide lists exactly the commands ``python -m epas_lightning --help``
    does: a command added, renamed or removed shows in both tables or fails here."""
    from epas_lightning.cli import LIGHTNING_COMMANDS, TOOLS

    tables = re.findall(r"^\| command \|.*\n\|[-|]+\|\n((?:\|.*\n)+)", (REPO / doc).read_text(), flags=re.MULTILINE)
    assert len(tables) == 1
    named = [name for row in tables[0].splitlines() for name in re.findall(r"`([\w-]+)`", row.split("|")[1])]
    assert sorted(named) == sorted([*LIGHTNING_COMMANDS, *TOOLS])


def test_yaml_blocks_are_configs_fit_accepts(tmp_path, capsys):
    """Every YAML block of README.md and the guide that sets run sections (``model``, ``sharing``, ``checkpoint``, ...)
    parses as a ``fit`` config: a renamed or misspelt key, or a value of the wrong type, fails here. They are read in
    one ``--print_config`` over the debug config, later blocks overriding earlier ones, as repeated ``--config`` do;
    the blocks that start from a model (``init_from``) in another, from an HF folder of the debug preset's shape (its
    config.json is what ``fit`` reads first)."""
    import yaml
    from model_dirs import save_hf_config

    from epas_lightning.cli import main
    from epas_lightning.lightning_cli import RUN_SECTIONS

    hf = save_hf_config(tmp_path / "hf")
    sections = {"seed_everything", "trainer", "model", "data", *RUN_SECTIONS}
    configs, sourced = [], []
    for doc in ("README.md", "docs/guide.md"):
        blocks = re.findall(r"^```yaml\n(.*?)^```", (REPO / doc).read_text(), flags=re.DOTALL | re.MULTILINE)
        for n, block in enumerate(blocks):
            if set(yaml.safe_load(block)) <= sections:  # not the lm-eval task YAML
                listed = sourced if "init_from:" in block else configs
                listed += ["--config", str(tmp_path / f"{Path(doc).stem}-{n}.yaml")]
                Path(listed[-1]).write_text(re.sub(r"init_from: \S+", f"init_from: {hf}", block))
    assert len(configs) + len(sourced) >= 2 * 6  # the README's five fit blocks and the guide's sharing block were found
    for listed in (configs, sourced):
        assert main(["fit", "--config", "debug", *listed, "--print_config"]) == 0, capsys.readouterr().err


def test_fit_help_titles_every_section_with_its_whole_summary(capsys):
    """``fit --help`` titles a section's options with the first line of its class's docstring (docstring_parser's short
    description), so a summary that wraps onto a second line is cut mid-sentence there: the ``lr_monitor`` section read
    "... logging once per optimizer step under gradient:"."""
    import inspect

    from epas_lightning import EPASModule, TokenDataModule
    from epas_lightning.lightning_cli import RUN_SECTIONS

    titles = set(lightning_help("fit", capsys).splitlines())
    for section in (EPASModule, TokenDataModule, *RUN_SECTIONS.values()):
        summary = " ".join(inspect.getdoc(section).split("\n\n")[0].split())
        assert f"{summary.rstrip('.')}:" in titles, f"{section.__name__}: keep its docstring's summary on one line"


@pytest.mark.parametrize("command", ["fit", "validate", "test"])
def test_lightning_command_help_says_what_the_command_does(command, capsys):
    """``fit``/``validate``/``test --help`` open with the line ``python -m epas_lightning --help`` gives the command,
    and title their ``--ckpt_path`` options with it: they showed the first line of Lightning's ``Trainer.<command>``
    docstring, which for ``test`` stopped mid-sentence ("... to make sure you never run on your")."""
    from epas_lightning.cli import LIGHTNING_HELP

    help_text = lightning_help(command, capsys)
    description = " ".join(help_text.split("\n\n")[1].split())
    assert description == LIGHTNING_HELP[command]
    assert f"{LIGHTNING_HELP[command].rstrip('.')}:" in help_text.splitlines()
    assert "never run on your" not in help_text


def test_chat_takes_the_flags_the_readme_says():
    """README.md said ``chat`` came "with generate's flags", and it has none of its prompt, batch, CUDA-graph or
    ``--json`` ones: it takes generate's loading, region and sampling flags and ``--system``, as it now says."""
    from epas_lightning.cli import function_parser, tool

    def options(name: str) -> set[str]:
        return {o for o in function_parser(tool(name), name)._option_string_actions if o.startswith("--")}

    readme = " ".join((REPO / "README.md").read_text().split())
    assert (
        "with its region and sampling flags (and `--system`; none of its prompt, batch, CUDA-graph or `--json` ones)"
        in readme
    )
    generate_only = {"--prompt", "--prompt+", "--prompt-file", "--batch-size", "--cuda-graph", "--json", "--no-json"}
    generate_only |= {"--ignore-eos", "--no-ignore-eos"}
    assert options("chat") == (options("generate") - generate_only) | {"--system"}


def readme_defaults() -> list[tuple[str, object, object]]:
    """``(what the README says, the value it states, the code's)`` for the defaults and limits it quotes."""
    import inspect

    import torch

    from epas_lightning import Llama, LlamaConfig, WarmupCosineLR, WarmupStableDecayLR
    from epas_lightning.cli import tool
    from epas_lightning.data.builtin import prepare_builtin_corpus
    from epas_lightning.data.sources import MAX_DOCUMENT_BYTES
    from epas_lightning.divergence import DivergenceGuard
    from epas_lightning.inference.chat_cli import DEFAULT_REPLY_TOKENS
    from epas_lightning.init_from import INIT_READ_BYTES, LONGEST_TAKEN_BLOCK_SIZE
    from epas_lightning.lightning_cli import DEFAULT_LOGGER
    from epas_lightning.optim import DEFAULT_ADAMW
    from epas_lightning.progress import LINE_EVERY_S
    from epas_lightning.serve.chat import MAX_PRODUCT, MAX_TOKEN_CHARS, RENDER_SECONDS
    from epas_lightning.serve.protocol import DEFAULT_MAX_TOKENS, MAX_STOP, SamplingRequest
    from epas_lightning.serve.template_process import RENDER_MEMORY

    def default(function, name):  # noqa: ANN001, ANN202
        return inspect.signature(function).parameters[name].default

    demo = LlamaConfig.from_name("demo")
    with torch.device("meta"):
        demo_params = sum(p.numel() for p in Llama(demo).parameters())
    logger = DEFAULT_LOGGER["init_args"]
    wsd = WarmupStableDecayLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))  # its defaults
    return [
        (
            "8 layers, d 256, 4 heads, SwiGLU 704, vocab 4096: 8.5M parameters",
            (8, 256, 4, 704, 4096, 8.5),
            (
                demo.n_layer,
                demo.n_embd,
                demo.n_head,
                demo.intermediate_size,
                demo.vocab_size,
                round(demo_params / 1e6, 1),
            ),
        ),
        (
            "AdamW with lr 3e-4, betas (0.9, 0.95) and weight decay 0.1",
            (3e-4, (0.9, 0.95), 0.1),
            (DEFAULT_ADAMW["lr"], DEFAULT_ADAMW["betas"], DEFAULT_ADAMW["weight_decay"]),
        ),
        ("a cosine to a tenth of the peak", 0.1, default(WarmupCosineLR, "min_lr_ratio")),
        ("`decay_fraction` of `max_steps`, 20% by default", 0.2, wsd.decay_fraction),
        ("its `warmup_steps` is 100 unless set", 100, wsd.warmup_steps),
        ("(2% of files held out", 0.02, default(prepare_builtin_corpus, "val_fraction")),
        ("`--val-fraction` (default 1%)", 0.01, default(tool("prepare"), "val_fraction")),
        ("the field named by `--text-field`, default `text`", "text", default(tool("prepare"), "text_field")),
        ("`--batch-size` prompts at a time (16 by default)", 16, default(tool("generate"), "batch_size")),
        ("`--max-new-tokens` (default 512, or half the context)", 512, DEFAULT_REPLY_TOKENS),
        (
            "(default 8 × 4: a quick check)",
            (8, 4),
            (default(tool("bench"), "batches"), default(tool("bench"), "batch_size")),
        ),
        ("`max_tokens` (default 16)", 16, DEFAULT_MAX_TOKENS),
        ("`temperature` (default 1; 0 is greedy)", 1.0, SamplingRequest.model_fields["temperature"].default),
        ("`stop` (up to 4 strings)", 4, MAX_STOP),
        ("8 MiB by default: a 413", 8, default(tool("serve"), "max_request_mb")),
        ("up to 30 s (LitServe's graceful timeout)", 30, graceful_timeout()),
        ("may take 2 s and 2 GiB of memory", (2, 2), (RENDER_SECONDS, RENDER_MEMORY / 2**30)),
        ("(256 a token)", 256, MAX_TOKEN_CHARS),
        ("more than 10 million characters", 10_000_000, MAX_PRODUCT),
        ("a document over 16 MiB", 16, MAX_DOCUMENT_BYTES / 2**20),
        ("about 256 MB at a time", 256, INIT_READ_BYTES / 2**20),
        ("when that is at most 8192 tokens", 8192, LONGEST_TAKEN_BLOCK_SIZE),
        ("prints a line on stderr every 10 s", 10, LINE_EVERY_S),
        ("until the scale is down to `min_loss_scale` (1)", 1, default(DivergenceGuard, "min_loss_scale")),
        ("with `min_steps` alone Lightning sets `min_epochs` to 1", 1, lightning_min_epochs(min_steps=5)),
        ("(`runs/epas` unless the config sets another)", "runs/epas", f"{logger['save_dir']}/{logger['name']}"),
    ]


def lightning_min_epochs(min_steps: int) -> int:
    """The ``min_epochs`` Lightning's fit loop takes where a ``Trainer`` sets ``min_steps`` and no ``min_epochs``."""
    from types import SimpleNamespace

    from lightning.pytorch.loops.utilities import _parse_loop_limits

    return _parse_loop_limits(min_steps, 10, None, None, SimpleNamespace(callbacks=[]))[0]


def graceful_timeout() -> float:
    """LitServe's graceful shutdown timeout, as ``LitServer.__init__`` sets it."""
    import inspect

    from litserve import LitServer

    return float(re.search(r"uvicorn_graceful_timeout = (\d+)", inspect.getsource(LitServer.__init__)).group(1))


def test_defaults_the_readme_quotes_are_the_codes():
    """Each default or limit README.md states (and where) is the code's: a value changed on one side fails here."""
    readme = " ".join((REPO / "README.md").read_text().split())  # wherever its lines wrap
    wrong = []
    for phrase, stated, actual in readme_defaults():
        assert " ".join(phrase.split()) in readme, f"README.md no longer says {phrase!r}: update this test with it"
        if stated != actual:
            wrong.append(f"README.md says {phrase!r} ({stated!r}); the code's is {actual!r}")
    assert wrong == []


def python_block(doc: str, containing: str) -> str:
    """The first fenced ``python`` block of ``doc`` that contains ``containing``."""
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / doc).read_text(), flags=re.DOTALL | re.MULTILINE)
    return next(block for block in blocks if containing in block)


def epas_imports(block: str) -> list[tuple[str, str | None]]:
    """What a Python block imports from this package: ``(module, name)``, ``name`` ``None`` for ``import module``."""
    imported = []
    for node in ast.walk(ast.parse(block)):
        if isinstance(node, ast.Import):
            imported += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported += [(node.module, alias.name) for alias in node.names]
    return [(module, name) for module, name in imported if module.split(".")[0] == "epas_lightning"]


def test_every_python_block_compiles_and_imports_what_exists(capsys):
    """The Python blocks of README.md and the guide that no test runs (a server's client, lm-eval's evaluator, the
    guide's FLOPs question) compile, and each name they import from this package exists (the modules are found, not
    imported: the lm-eval adapter would import lm-eval); the guide's block runs (arithmetic on a config)."""
    blocks = [
        block
        for doc in ("README.md", "docs/guide.md")
        for block in re.findall(r"^```python\n(.*?)^```", (REPO / doc).read_text(), flags=re.DOTALL | re.MULTILINE)
    ]
    imported = [pair for block in blocks for pair in epas_imports(block)]
    assert len(blocks) >= 6 and ("epas_lightning.evaluation.lm_eval_adapter", None) in imported
    for module, name in imported:
        if name is None:
            assert importlib.util.find_spec(module) is not None, module
        else:  # a package's lazy exports are listed without importing them (Lightning's import takes seconds)
            exported = getattr(importlib.import_module(module), "__all__", None)
            assert name in exported if exported else hasattr(sys.modules[module], name), f"from {module} import {name}"
    exec(compile(python_block("docs/guide.md", "flop_cut("), "docs/guide.md", "exec"), {})
    assert capsys.readouterr().out == "6.6%\n"


def test_demo_section_scores_region_lengths_the_demo_trains():
    """The region lengths README.md's "The demo" section has every validation also score (``val_sharing_layers``,
    and the ``val/loss_at_sharing/N`` it names) fit configs/demo.yaml's region: its ``[0, 6]`` was the llama-125m
    example's, and ``fit --config demo`` refused a length of 6 for a region of 4 layers."""
    import yaml

    from epas_lightning import LlamaConfig
    from epas_lightning.schedule import SharingSchedule

    readme = (REPO / "README.md").read_text()
    start = readme.index("## The demo\n")
    demo = " ".join(readme[start : readme.index("\n## ", start)].split())
    lengths = {n for found in re.findall(r"val_sharing_layers: (\[[^\]]*\])", demo) for n in yaml.safe_load(found)}
    lengths |= {int(n) for n in re.findall(r"val/loss_at_sharing/(\d+)", demo)}
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    sharing = config["sharing"]
    n_layer = LlamaConfig.from_name(config["model"]["config"]["name"]).n_layer
    schedule = SharingSchedule.build(
        n_layer, sharing["target"], sharing["growth"], sharing["interval"], sharing["start_step"]
    )
    assert lengths, "the demo section no longer names val_sharing_layers: update this test"
    assert max(lengths) <= len(schedule.target_layers), (sorted(lengths), schedule.target_layers)


def test_readme_training_script_runs_with_every_section_of_fit(tiny_corpus, tmp_path, monkeypatch):
    """The README's "In Python" script, shrunk to the debug model and 2 steps: it trains, and its Trainer has the
    callback of every section ``fit`` adds (a plain ``Trainer`` had none: no divergence guard, no last.ckpt at the
    end, no graceful stop, no FLOPs) and writes checkpoints atomically."""
    from epas_lightning import AtomicCheckpointIO
    from epas_lightning.lightning_cli import RUN_SECTIONS

    script = python_block("README.md", "trainer.fit(")
    tiny = {
        'LlamaConfig.from_name("demo")': 'LlamaConfig.from_name("debug", block_size=32)',
        "max_steps=200,": "max_steps=2, accelerator='cpu', enable_progress_bar=False, limit_val_batches=0,",
        "TokenDataModule(": "TokenDataModule(max_bytes=1_500_000, batch_size=2, ",  # the session's tiny corpus
    }
    for text, replacement in tiny.items():
        assert script.count(text) == 1, text
        script = script.replace(text, replacement)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(script, "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.global_step == 2
    assert {type(callback) for callback in trainer.callbacks} >= set(RUN_SECTIONS.values())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert (Path(trainer.checkpoint_callback.dirpath) / "last.ckpt").is_file()


def test_readme_generate_from_python_runs(debug_fit_run):
    """The README's "generate from Python" block on the debug run's checkpoint (region [1], context 32): the prompt it
    builds is token ids, as ``generate`` takes them (text raised a TypeError about comparing str and int)."""
    script = python_block("README.md", "generate(loaded.model")
    _, cwd = debug_fit_run
    tiny = {
        '"runs/demo/version_0/checkpoints/last.ckpt"': repr(str(cwd / "runs/debug/version_0/checkpoints/last.ckpt")),
        "set_region(loaded.model, 2,": "set_region(loaded.model, 1,",
        "max_new_tokens=60": "max_new_tokens=8",
    }
    for text, replacement in tiny.items():
        assert script.count(text) == 1, text
        script = script.replace(text, replacement)
    namespace: dict = {}
    exec(compile(script, "README.md", "exec"), namespace)
    assert namespace["loaded"].model.sharing.shared_layers == [1]
    assert 1 <= len(namespace["result"].tokens[0]) <= 8


def test_guide_names_every_scalar_a_fit_logs(debug_fit_run):
    """The guide's list of what TensorBoard shows names every scalar a ``fit`` logs (a group by its prefix, such as
    ``train/device/``; Lightning's ``epoch`` aside): it left out ``val/tokens``, the validations' ``validate/`` counts
    and the learning rate's tag names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, cwd = debug_fit_run
    (events,) = (cwd / "runs").glob("debug/version_0/events.out.tfevents.*")
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"]) - {"epoch"}
    named = set(re.findall(r"`([\w/-]+)`", (REPO / "docs" / "guide.md").read_text()))
    groups = tuple(name for name in named if name.endswith("/"))
    assert {"train/loss", "val/loss", "sharing/layers"} < tags  # the run's logs were read
    assert sorted(tag for tag in tags if tag not in named and not tag.startswith(groups)) == []
