"""The command line: `python -m epas_lightning fit --config ...`, links, --print_config, early errors."""

import importlib.util
import os
import re
from pathlib import Path

import pytest
from helpers import DEBUG_CONFIG as DEBUG
from lightning.pytorch.cli import SaveConfigCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from epas_lightning.callbacks import ProgressiveSharing
from epas_lightning.cli import main
from epas_lightning.errors import ConfigError
from epas_lightning.flops import flop_cut
from epas_lightning.lightning_cli import lightning_cli
from epas_lightning.model.config import LlamaConfig, RopeScaling
from epas_lightning.region import TrainedRegion


def test_fit_through_the_entry_point_logs_and_checkpoints(tiny_corpus, debug_fit_run):
    result, cwd = debug_fit_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.name for p in tiny_corpus.parent.glob("stdlib-*") if p.is_dir()] == [tiny_corpus.name]  # reused
    assert "EPAS: step 3: 1 sharing layer(s) [1]" in result.stdout + result.stderr
    run_dir = cwd / "runs" / "debug" / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "config.yaml").exists()
    events = EventAccumulator(str(run_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/grad_norm",
        "val/loss",
        "val/ppl",
        "sharing/layers",
        "train/device/items_per_sec",
    } <= tags, tags
    assert not [tag for tag in tags if "loss_at_sharing" in tag]  # val_sharing_layers is off by default
    layers = [e.value for e in events.Scalars("sharing/layers")]
    assert layers[0] == 0.0 and layers[-1] == 1.0
    cuts = [e.value for e in events.Scalars("sharing/flop_cut")]  # the training FLOPs the region skips, per step
    debug = LlamaConfig.from_name("debug", block_size=32)
    assert cuts == [pytest.approx(flop_cut(debug, int(n), 32)) for n in layers] and cuts[-1] > 0


def test_links_set_length_layers_and_vocab_once():
    cli = lightning_cli(["--config", DEBUG, "--model.config.n_layer", "4", "--sharing.target", "3"], run=False)
    assert cli.model.config.n_layer == 4
    assert cli.datamodule.seq_len == 32 and cli.datamodule.vocab_size == 512
    (sharing,) = [c for c in cli.trainer.callbacks if isinstance(c, ProgressiveSharing)]
    assert sharing.n_layer == 4 and sharing.schedule.target_layers == (3, 2, 1)


def test_preset_override_from_the_command_line():
    cli = lightning_cli(
        ["--config", DEBUG, "--model.config.name", "demo", "--model.config.block_size", "64"], run=False
    )
    assert (cli.model.config.n_layer, cli.model.config.n_embd) == (8, 256)
    assert cli.datamodule.seq_len == 64 and cli.datamodule.vocab_size == 4096


def test_rope_scaling_from_the_command_line_reaches_the_model():
    """A Llama 3.x ``rope_scaling`` parses as class_path/init_args (an optional dataclass); the links' config reader
    passed that on as its fields and stopped the command."""
    scaling = '{"rope_type": "llama3", "factor": 32, "low_freq_factor": 1, "high_freq_factor": 4, '
    scaling += '"original_max_position_embeddings": 8192}'
    cli = lightning_cli(["--config", DEBUG, "--model.config.rope_scaling", scaling], run=False)
    assert cli.model.config.rope_scaling == RopeScaling("llama3", 32.0, 1.0, 4.0, 8192)


def test_print_config_shows_the_sharing_section_and_the_resolved_preset(capsys):
    assert main(["fit", "--config", DEBUG, "--print_config"]) == 0
    out = capsys.readouterr().out
    assert "sharing:" in out and "name: debug" in out and "throughput:" in out and "divergence:" in out
    assert "n_layer: 2" in out and "vocab_size: 512" in out and "block_size: 32" in out  # not null


REFUSED_PRINT_FLAG = (
    "error: --print_config has no flag 'foo' — --print_config=skip_default,foo — give --print_config alone, or with "
    "one or more of skip_default, skip_unset (--print_config=skip_default,skip_unset)"
)


@pytest.mark.parametrize(
    ("command", "flags", "status", "says"),
    [
        ("fit", "=skip_unset", 0, "name: debug"),
        ("fit", "=skip_default,foo", 2, REFUSED_PRINT_FLAG),
        ("generate", "=skip_default,foo", 2, REFUSED_PRINT_FLAG),  # was jsonargparse's, naming no flag it takes
    ],
)
def test_print_config_takes_jsonargparses_flags_and_refuses_others(capsys, command, flags, status, says):
    """`--print_config=foo` (and `=skip_unset`) printed the config as if plain: the flags were never read."""
    config = ["--config", DEBUG] if command == "fit" else []
    assert main([command, *config, "--print_config" + flags]) == status
    out, err = capsys.readouterr()
    assert says in (out if status == 0 else err.strip().splitlines()[-1])
    assert status != 0 or ": null" not in out


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).parents[1] / "configs").glob("*.yaml")))
def test_every_packaged_config_parses_by_name_with_the_monitors(name, capsys, tmp_path):
    """Configs are found by name (they ship in the wheel), and every run keeps the monitors and the guard; a config
    that starts from a model prints with the model it is given (its model.config is read from there).

    One on the built-in corpus that validates every N batches of an epoch must have N batches of all its ranks in the
    corpus (a token holds at least a byte): fsdp-multinode's 1000 batches of 2 x 8 GPUs did not, and fit refused to
    start at its size ("an epoch of the training stream is ... batches")."""
    import yaml
    from model_dirs import save_hf_config

    from epas_lightning.data.builtin import list_source_files, stdlib_root

    source = ["--model.init_from", str(save_hf_config(tmp_path / "hf"))] if name == "tinyllama-continual" else []
    assert main(["fit", "--config", name, *source, "--print_config"]) == 0
    out = capsys.readouterr().out
    for section in ("throughput:", "lr_monitor:", "checkpoint:", "divergence:", "sharing:"):
        assert f"\n{section}" in out, section
    config = yaml.safe_load(out)
    trainer, data = config["trainer"], config["data"]
    interval = trainer["val_check_interval"]
    if data["data_dir"] is None and type(interval) is int and trainer["check_val_every_n_epoch"] is not None:
        corpus = data["max_bytes"] or sum((stdlib_root() / f).stat().st_size for f in list_source_files(stdlib_root()))
        tokens = interval * trainer["devices"] * trainer["num_nodes"] * data["batch_size"] * data["seq_len"]
        assert tokens <= corpus, f"{interval} batches need {tokens:,} tokens; the corpus holds at most {corpus:,}"


def test_invalid_schedule_fails_before_training(tmp_path, tiny_corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--sharing.target", "2"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: a sharing target of 2 layers is invalid") and "— sharing.target —" in last
    assert "between 1 and n_layer - 1 = 1" in last
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.ckpt"))


def test_a_validation_region_longer_than_the_target_is_refused_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--sharing.val_sharing_layers", "[0, 2]"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        "error: 2 sharing layers were asked for; the target region has 1 (layers [1]) — sharing.val_sharing_layers — "
        "choose lengths in 0..1"
    )
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="list of layer counts"):
        ProgressiveSharing(val_sharing_layers=[-1])
    dense = TrainedRegion(4)  # a checkpoint that trained dense: "1 sharing layers were asked for"
    with pytest.raises(ConfigError, match=r"^1 sharing layer was asked for; the checkpoint's region has 0 "):
        ProgressiveSharing(val_sharing_layers=[1])._regions_of(dense, "the checkpoint's region")


def test_fit_in_pure_fp16_is_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--trainer.precision", "16-true"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "— trainer.precision: 16-true —" in err and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_a_transformer_engine_precision_without_the_package_is_one_line(subcommand, tmp_path, capsys, monkeypatch):
    """Lightning raised a ModuleNotFoundError traceback while building the precision plugin."""
    monkeypatch.chdir(tmp_path)
    assert main([subcommand, "--config", DEBUG, "--trainer.precision", "transformer-engine"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "— trainer.precision: transformer-engine —" in err.strip().splitlines()[-1]


WSD = "epas_lightning.WarmupStableDecayLR"
HELP_WSD = f"`python -m epas_lightning fit --model.lr_scheduler.help {WSD}` lists its arguments"


@pytest.mark.parametrize(
    ("flags", "yaml", "what"),
    [
        (["--model.lr_scheduler.decay_shape", "exp"], "decay_shape: exp", "--model.lr_scheduler.decay_shape of "
         "WarmupStableDecayLR takes one of linear, cosine, 1-sqrt, not 'exp'"),
        (["--model.lr_scheduler.warmup_steps", "abc"], "warmup_steps: abc", "--model.lr_scheduler.warmup_steps of "
         "WarmupStableDecayLR takes a whole number, not 'abc'"),
        (["--model.lr_scheduler.nonsense", "3"], "nonsense: 3", "WarmupStableDecayLR (given to "
         "--model.lr_scheduler) has no argument 'nonsense'"),
    ],
)  # fmt: skip
def test_a_bad_argument_of_a_given_class_names_the_argument(flags, yaml, what, capsys, tmp_path):
    """On the command line jsonargparse's error read as if no class had been given ("name the class first"); in a
    config's init_args it was "invalid value for --model.lr_scheduler (...)" with the parser's internals."""
    assert main(["fit", "--config", DEBUG, "--model.lr_scheduler", WSD, *flags, "--print_config"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == f"error: {what} — python -m epas_lightning fit — {HELP_WSD}"
    )
    config = tmp_path / "schedule.yaml"
    config.write_text(f"model:\n  lr_scheduler:\n    class_path: {WSD}\n    init_args:\n      {yaml}\n")
    assert main(["fit", "--config", DEBUG, "--config", str(config), "--print_config"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1] == f"error: {what} — python -m epas_lightning fit — {HELP_WSD}"
    )


@pytest.mark.parametrize(
    ("flags", "refused"),
    [
        (["--trainer.limit_train_batches", "3"], "3 training batches (trainer.limit_train_batches)"),
        (["--trainer.overfit_batches", "2"], "2 training batches (trainer.overfit_batches)"),
        (["--trainer.limit_train_batches", "3", "--trainer.check_val_every_n_epoch", "null"], None),
        (["--trainer.fast_dev_run", "2", "--trainer.limit_train_batches", "2"], None),  # its own interval: 1 epoch
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be at least 1, not 0"),  # % 0
        (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch must be at least 1, not 0"),
        (["--trainer.val_check_interval", "0.0"], None),  # a fraction of the epoch: every batch
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be at least 1, not 0"),
        (["--trainer.limit_train_batches", "-1"], "invalid value -1 for limit_train_batches"),  # not "an epoch of -1"
    ],
)
def test_a_validation_interval_longer_than_the_limited_epoch_is_one_line(tmp_path, monkeypatch, flags, refused):
    """debug.yaml validates every 4 batches; `--trainer.limit_train_batches 3` (or `overfit_batches 2`) made Lightning
    raise a ValueError traceback once data was set up. It is a config error before anything is built."""
    from epas_lightning.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    if refused is None:
        lightning_cli(["--config", DEBUG, *flags], run=False)
        return
    if "must be" not in refused and "invalid value" not in refused:
        refused = "trainer.val_check_interval (4) is longer than an epoch of " + refused
    with pytest.raises(ConfigError, match=re.escape(refused)):
        lightning_cli(["--config", DEBUG, *flags], run=False)


def test_a_float_first_union_parsed_earlier_in_the_process_leaves_integer_limits_integers(tmp_path, monkeypatch):
    """`--trainer.limit_train_batches -1` read as -1.0 (the refusal above said "invalid value -1.0") once the process
    had parsed a signature with `float | int | None = None` (a notebook's own jsonargparse parser; one test before it in
    a pytest-xdist worker): jsonargparse makes both `Optional[...]`, and typing's cache, to which unions of the same
    members in another order are equal, returned the float-first one for Lightning's `int | float | None`."""
    from jsonargparse import ArgumentParser

    def scaled(scale: float | int | None = None) -> None:  # the order that made it float first
        pass

    ArgumentParser(exit_on_error=False).add_function_arguments(scaled)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape("invalid value -1 for limit_train_batches")):
        lightning_cli(["--config", DEBUG, "--trainer.limit_train_batches", "-1"], run=False)
    cli = lightning_cli(
        ["--config", DEBUG, "--trainer.limit_train_batches", "3", "--trainer.val_check_interval", "2"], run=False
    )
    assert cli.config.trainer.limit_train_batches == 3 and isinstance(cli.config.trainer.limit_train_batches, int)


def test_built_in_corpus_settings_beside_a_prepared_folder(tmp_path, monkeypatch):
    """`--data.max_bytes` (or `cache_dir`) with `--data.data_dir` did nothing, without a word: given with the folder
    or after it (on the command line, in the same config file) they are refused; debug.yaml's own max_bytes, which a
    folder given after it overrides with its corpus, is dropped."""
    monkeypatch.chdir(tmp_path)
    prepared = ["--config", DEBUG, "--data.data_dir", str(tmp_path)]
    cli = lightning_cli(prepared, run=False)
    assert cli.datamodule.max_bytes is None and cli.config.data.max_bytes is None  # the saved config says it too
    with pytest.raises(ConfigError, match=r"^data.max_bytes limits the built-in corpus only; .* — data.max_bytes 9 —"):
        lightning_cli([*prepared, "--data.max_bytes=9"], run=False)
    (tmp_path / "mine.yaml").write_text(f"data:\n  data_dir: {tmp_path}\n  cache_dir: {tmp_path}\n")
    with pytest.raises(ConfigError, match=rf"built-in corpus is cached; .* — data.cache_dir {tmp_path} — remove it"):
        lightning_cli(["--config", DEBUG, "--config", str(tmp_path / "mine.yaml")], run=False)


def test_a_seed_numpy_cannot_take_is_one_line(tmp_path, monkeypatch):
    """`--seed_everything -5` was seed_everything's ValueError traceback, then a line in Lightning's words ("-5 is not
    in bounds, numpy accepts from 0 to 4294967295"); data.seed and --seed said theirs in others. One wording now."""
    monkeypatch.chdir(tmp_path)
    says = "seed must lie in 0..2**32-1, got -5 — --seed_everything -5 — give a seed in that range, or false"
    with pytest.raises(ConfigError, match=f"^{re.escape(says)}$"):
        lightning_cli(["--config", DEBUG, "--seed_everything", "-5"], run=False)


def test_seed_everything_true_chooses_a_seed_the_saved_config_repeats(tmp_path, caplog, monkeypatch):
    """`--seed_everything true` seeded 0 (Lightning's `seed_everything()` default), the same seed on every run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # so that the seed this test sets is undone after it
    monkeypatch.delenv("PL_GLOBAL_SEED")
    seeds = []
    for _ in range(2):
        cli = lightning_cli(["--config", DEBUG, "--seed_everything", "true"], run=False)
        (saved,) = [c for c in cli.trainer.callbacks if isinstance(c, SaveConfigCallback)]
        seeds.append(saved.config.seed_everything)
        monkeypatch.delenv("PL_GLOBAL_SEED")
    assert all(type(seed) is int for seed in seeds) and seeds[0] != seeds[1], seeds
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Seed set to")]
    assert said == [f"Seed set to {seed}" for seed in seeds]
    cli = lightning_cli(["--config", DEBUG, "--seed_everything", "false"], run=False)
    assert cli.config.seed_everything is False and "PL_GLOBAL_SEED" not in os.environ


@pytest.mark.parametrize(
    ("command", "key"),
    [("validate", "limit_val_batches"), ("test", "limit_test_batches"), ("fit", "limit_train_batches")],
)
def test_validate_or_test_of_no_batch_is_one_line(tmp_path, capsys, monkeypatch, command, key):
    """It ended with status 0, having scored (or trained) nothing."""
    monkeypatch.chdir(tmp_path)
    assert main([command, "--config", DEBUG, f"--trainer.{key}", "0"]) == 2
    does = "train" if command == "fit" else "score"
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: trainer.{key} is 0: {command} would {does} no batch — trainer.{key} — set it to 1 or more, or null"
    )


@pytest.mark.parametrize(
    ("flags", "yaml", "line"),
    [
        ([], "trainr:\n  max_steps: 3\n", "fit has no option trainr.max_steps (did you mean trainer.max_steps?) — "
         "--config {typo} — see `python -m epas_lightning fit --help`"),  # the file that holds it
        ([], "trainer.max_stp: 3\n", "fit has no option trainer.max_stp (did you mean trainer.max_steps?) — "
         "--config {typo} — see"),
        (["--sharing.intervall", "3"], None, "fit has no option sharing.intervall (did you mean sharing.interval?) — "
         "python -m epas_lightning fit — see `python -m epas_lightning fit --help`"),
        (["--trainer.max_step=3"], None, "fit has no option trainer.max_step (did you mean trainer.max_steps?) — "
         "python -m epas_lightning fit — see"),  # an abbreviation was taken for the option it begins
        (["--seed", "3"], None, "fit has no option seed (did you mean seed_everything?) — "),
        (["--model.config.n_query_groups", "5"], None, "fit has no option model.config.n_query_groups (did you mean "
         "model.config.n_kv_head?) — "),  # LitGPT's name
        ([], "model:\n  config:\n    n_layers: 3\n", "model.config has no field 'n_layers' (did you mean n_layer?) "
         "— model.config.n_layers — use one of name, n_layer,"),
        (["--trainer.logger.init_args.sav_dir", "x"], None, "TensorBoardLogger (given to --trainer.logger) has no "
         "argument 'sav_dir' (did you mean save_dir?) — python -m epas_lightning fit — "),
    ],
)  # fmt: skip
def test_a_misspelt_key_is_named_with_the_one_meant(tmp_path, capsys, flags, yaml, line):
    """A misspelt key said only that it was not accepted (a model.config field: the link's message with the whole
    namespace; a logger argument: that no class was given, where the default logger was); a config's key names the
    config file that holds it, of the several a run may be given."""
    typo = tmp_path / "typo.yaml"
    config = ["--config", str(typo)] if yaml else []
    if yaml:
        typo.write_text(yaml)
    assert main(["fit", "--config", DEBUG, *config, *flags, "--print_config"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: " + line.format(typo=typo))


@pytest.mark.parametrize(
    ("argv", "fix"),
    [
        (["inspect", "runs/x/last.ckpt"], "give it with its flag, e.g. --checkpoint runs/x/last.ckpt"),
        (["fit", "debug"], "give it with its flag: --config debug for a config, --ckpt_path debug for a checkpoint"),
        (["prepare", "corpus"], "give it with its flag"),
    ],
)
def test_a_value_without_its_flag_says_which_flag(capsys, argv, fix):
    """``inspect runs/x/last.ckpt`` said "unrecognized arguments" and to read --help; fit's would have suggested its
    checkpoint section's --checkpoint."""
    command, value = argv
    assert main(argv) == 2
    line = f"error: {command} takes flags only, not {value!r} alone — python -m epas_lightning {command} — {fix}"
    assert capsys.readouterr().err.strip().splitlines()[-1] == line


@pytest.mark.parametrize(
    "argv", [["inspect", "--checkpoint", "x.ckpt", ""], ["inspect", " ", "--checkpoint", "x.ckpt"], ["fit", ""]]
)
def test_an_empty_argument_without_a_flag_is_named(capsys, argv):
    """A stray empty argument (``"$EXTRA"``, EXTRA unset) said "unrecognized arguments:" followed by nothing."""
    command = argv[0]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: {command} takes flags only, not an empty argument — python -m epas_lightning {command} — drop it, or "
        "give the value it stood for (is a variable unset?)"
    )


@pytest.mark.parametrize(
    ("flags", "line"),
    [
        (["--model.optimizer", "torch.optim.AdamWW"], "torch.optim has no AdamWW (did you mean AdamW?) — "
         "--model.optimizer — check the class path (`python -m epas_lightning fit --help` lists known classes under "
         "--model.optimizer)"),
        # a short name that names no class (was "invalid value for --trainer.logger (Given value: ...)")
        (["--model.optimizer", "Adamw"], "no class named Adamw is known (did you mean AdamW?) — --model.optimizer — "
         "check the name, or give the full import path (`python -m epas_lightning fit --help` lists known classes)"),
        (["--trainer.callbacks=[{class_path: ModelCheckpont}]"], "no class named ModelCheckpont is known (did you mean "
         "ModelCheckpoint?) — --trainer.callbacks — check the name, or give the full import path (`python -m "
         "epas_lightning fit --help` lists known classes)"),
        (["--trainer.logger", "lightning.pytorch.loggers.LitLogger"], "lightning.pytorch.loggers.LitLogger is not a "
         "lightning.pytorch.loggers.logger.Logger, which --trainer.logger takes — --trainer.logger — give a subclass "
         "of Logger (`python -m epas_lightning fit --help` lists known ones)"),
        (["--trainer.callbacks+=no_such_package.Callback"], "no_such_package.Callback cannot be imported: no module "
         "named 'no_such_package' is installed — --trainer.callbacks — install it, or check the class path"),
        (["--model.lr_scheduler", "torch.optim.lr_scheduler.StepLR"], "StepLR (given to --model.lr_scheduler) needs "
         "step_size — python -m epas_lightning fit — `python -m epas_lightning fit --model.lr_scheduler.help "
         "torch.optim.lr_scheduler.StepLR` lists its arguments"),
        # a package that is not installed names the setting that needs it (was "— the configuration —")
        (["--trainer.logger", "MLFlowLogger"], "lightning.pytorch.loggers.MLFlowLogger needs mlflow>=1.0.0, which is "
         "not installed — trainer.logger: MLFlowLogger — pip install 'mlflow>=1.0.0', or choose another class"),
        (["--trainer.logger+=WandbLogger"], "lightning.pytorch.loggers.WandbLogger needs wandb>=0.12.10, which is not "
         "installed — trainer.logger: [TensorBoardLogger,WandbLogger] — pip install 'wandb>=0.12.10', or choose "
         "another class"),
        (["--trainer.strategy", "xla"], "a configured setting needs torch_xla>=1.13, which is not installed — "
         "trainer.strategy: xla — pip install 'torch_xla>=1.13', or choose another setting"),
        (["--trainer.strategy", "deepspeed"], "To use the `DeepSpeedStrategy`, you must have DeepSpeed installed. "
         "Install it by running `pip install -U deepspeed` — trainer.strategy: deepspeed — fix the value in the YAML "
         "or the flag"),
        (["--trainer.callbacks+=EarlyStopping"], "EarlyStopping (given to --trainer.callbacks) needs monitor — "
         "python -m epas_lightning fit — `python -m epas_lightning fit --trainer.callbacks.help "
         "lightning.pytorch.callbacks.EarlyStopping` lists its arguments"),
        (["--model.lr_scheduler", "ReduceLROnPlateau"], "ReduceLROnPlateau names several classes "
         "(torch.optim.lr_scheduler.ReduceLROnPlateau, lightning.pytorch.cli.ReduceLROnPlateau) — --model.lr_scheduler "
         "— give the full class path of one"),
        (["--trainer.accelerator", "tpu"], "the tpu accelerator needs torch_xla, which is not installed — "
         "trainer.accelerator: tpu — install torch_xla on a TPU machine, or pass --trainer.accelerator=cpu"),
        # what the Trainer refuses names the settings (was "— the configuration —")
        (["--trainer.devices", "-2"], "`devices` selected with `CPUAccelerator` should be an int > 0 — "
         "trainer.devices: -2 — fix the value in the YAML or the flag"),
        # 0 counts no device (Hugging Face's and vLLM's GPU 0): how to count them, and how to pick GPU 0
        (["--trainer.devices", "0"], "`Trainer(devices='0')` value is not a valid input using cpu accelerator — "
         "trainer.devices: 0 — give how many devices to train on (1, 2, ... or auto); for GPU 0 alone, [0]"),
        (["--trainer.val_check_interval", "1.5"], "You have passed invalid value 1.5 for val_check_interval, it has "
         "to be in [0.0, 1.0] or an int — trainer.val_check_interval: 1.5 — fix the value in the YAML or the flag"),
        (["--trainer.max_time", "1h"], "`Timer(duration='1h')` is not a valid duration. Expected a string in the "
         "format DD:HH:MM:SS — trainer.max_time: 1h — fix the value in the YAML or the flag"),
        (["--trainer.strategy", "fsdp"], "The strategy `fsdp` requires a GPU accelerator, but received "
         "`accelerator='cpu'`. Please set `accelerator='cuda'`, `accelerator='gpu'`, or pass a `CUDAAccelerator()` "
         "instance to use FSDP — trainer.strategy: fsdp, trainer.accelerator: cpu — fix the value in the YAML or the "
         "flag"),
    ],
)  # fmt: skip
def test_a_class_that_cannot_be_built_is_named(tmp_path, capsys, monkeypatch, flags, line):
    """A class path that does not import, or a class missing a required argument, was "invalid value for --flag
    (Given value: ...)"; a logger whose package is missing was jsonargparse's whole union error on one line, and the
    tpu accelerator without torch_xla Lightning's ModuleNotFoundError traceback."""
    for needs, package in (("MLFlowLogger", "mlflow"), ("WandbLogger", "wandb"), ("tpu", "torch_xla")):
        if needs in " ".join(flags) and importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed")
    for needs, package in (("xla", "torch_xla"), ("deepspeed", "deepspeed")):
        if needs in flags and importlib.util.find_spec(package) is not None:
            pytest.skip(f"{package} is installed")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, *flags]) == 2  # refused before any data or training
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: " + line


@pytest.mark.parametrize(
    ("yaml", "line"),
    [
        ("", "the config is empty, not a mapping of options — --config {} — write one `option: value` line per option"),
        ("- a\n- b\n", "the config is a list, not a mapping of options — --config {} — "),
        ("trainer: 5\n", "`trainer:` holds 5, not its settings — --config {} — indent `key: value` lines under "
         "`trainer:`"),
        ("sharing: [1]\n", "`sharing:` holds [1], not its settings — --config {} — "),  # was: sharing's defaults
    ],
)  # fmt: skip
def test_a_config_that_is_not_a_mapping_of_sections_is_one_line(tmp_path, capsys, yaml, line):
    """An empty or list config was "Unexpected config: ..."; `trainer: 5` an AttributeError traceback, and `sharing:
    [1]` silently replaced the sharing settings of the configs before it by the defaults."""
    config = tmp_path / "shape.yaml"
    config.write_text(yaml)
    assert main(["fit", "--config", DEBUG, "--config", str(config), "--print_config"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: " + line.format(config))


def test_a_listed_callback_lightning_refuses_at_setup_is_one_line(tmp_path, tiny_corpus, capsys, monkeypatch):
    """`DeviceStatsMonitor` with `--trainer.logger false` was Lightning's MisconfigurationException traceback."""
    monkeypatch.chdir(tmp_path)
    flags = ["--trainer.logger", "false", "--trainer.callbacks+=DeviceStatsMonitor"]
    assert main(["fit", "--config", DEBUG, *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: Cannot use `DeviceStatsMonitor` callback with `Trainer(logger=False)` — trainer.logger: false — fix "
        "the value in the YAML or the flag"
    )


def test_an_unknown_compile_backend_is_one_line_before_the_data(tmp_path, monkeypatch):
    """`--model.compile maybe` was torch's InvalidBackend traceback once fit built the model."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'maybe' is not a torch.compile backend — model.compile — give true"):
        lightning_cli(["--config", DEBUG, "--model.compile", "maybe"], run=False)


@pytest.mark.parametrize(
    ("flag", "value", "lr", "betas"),
    [
        ("--model.optimizer.lr", "1e-3", 1e-3, (0.9, 0.95)),
        ("--model.lr", "1e-3", 1e-3, (0.9, 0.95)),
        ("--model.lr=2e-3", None, 2e-3, (0.9, 0.95)),
        ("--model.optimizer.betas", "[0.9,0.9]", 3e-4, (0.9, 0.9)),
    ],
)
def test_an_optimizer_argument_without_a_class_keeps_fits_defaults_in_its_advice(
    tmp_path, capsys, monkeypatch, flag, value, lr, betas
):
    """debug.yaml leaves model.optimizer to the default AdamW, so `--model.optimizer.lr` alone has no class to go to
    (jsonargparse's message was "invalid value for --model.optimizer (Given value: NestedArg(key='lr', ...))"). The
    advice was to name a class first, and `--model.optimizer AdamW` alone trains with AdamW's own betas (0.9, 0.999)
    and weight decay 0.01, not fit's default (0.9, 0.95) and 0.1: it spells them out, and it builds that optimizer.
    LitGPT's `--lr` under `model.` said only that it was ambiguous with --model.lr_scheduler (with abbreviations
    refused, that fit has no such option): the same advice, for `--model.lr=1e-3` too. A list
    value (`--model.optimizer.betas [0.9,0.9]`) still had jsonargparse's message."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, flag, *([value] if value else []), "--print_config"]) == 2
    err = capsys.readouterr().err
    assert "NestedArg" not in err and "ambiguous" not in err
    advice = err.strip().splitlines()[-1].split("default settings: ")[1]
    import torch

    module = lightning_cli(["--config", DEBUG, *advice.split()], run=False).model
    (group,) = module.optimizer_factory([torch.nn.Parameter(torch.zeros(1))]).param_groups
    assert (group["lr"], group["betas"], group["weight_decay"]) == (lr, betas, 0.1)


@pytest.mark.parametrize("limit", ["max_steps", "max_epochs"])
def test_fit_of_no_step_is_one_line(tmp_path, capsys, monkeypatch, limit):
    """`--trainer.max_steps 0` (or `max_epochs 0`) ended with status 0, having trained nothing."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, f"--trainer.{limit}", "0", "--trainer.limit_val_batches", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: trainer.{limit} is 0: fit would train no step — trainer.{limit} — set it to 1 or more, or -1 for "
        "no limit"
    )


@pytest.mark.parametrize("size", ["0", "1"])
def test_a_throughput_window_too_short_is_one_line(tmp_path, monkeypatch, size):
    """Lightning's `assert window_size > 1` was an AssertionError traceback once fit set up, after the data."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"at least 2 entries, not {size} — throughput.window_size — set 2 or more"):
        lightning_cli(["--config", DEBUG, "--throughput.window_size", size], run=False)


def test_an_optimizer_argument_torch_refuses_is_one_line(tmp_path, tiny_corpus, capsys, monkeypatch):
    """`--model.optimizer.lr -0.01` was torch's ValueError traceback from configure_optimizers, after the data."""
    monkeypatch.chdir(tmp_path)
    flags = ["--model.optimizer", "AdamW", "--model.optimizer.lr", "-0.01", "--trainer.num_sanity_val_steps", "0"]
    assert main(["fit", "--config", DEBUG, *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: AdamW refused its arguments: Invalid learning rate: -0.01 — model.optimizer — fix its init_args"
    )


def test_the_run_callbacks_pickle_for_ddp_spawn(tmp_path, monkeypatch):
    """`--trainer.strategy ddp_spawn` pickles the trainer to its processes: the links' closures in the parser, which
    SaveConfigCallback holds, were 'Can't pickle local object' tracebacks. A listed ModelCheckpoint saves between
    optimizer steps as the run's does (see test_training), under its own state key, and pickles too."""
    import pickle

    from lightning.pytorch.callbacks import ModelCheckpoint

    from epas_lightning.run_checkpoint import ListedCheckpoint, RunCheckpoint

    monkeypatch.chdir(tmp_path)
    listed = ["--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.monitor=val/loss"]
    callbacks = lightning_cli(["--config", DEBUG, *listed], run=False).trainer.callbacks
    (checkpoint,) = [c for c in callbacks if isinstance(c, ModelCheckpoint) and not isinstance(c, RunCheckpoint)]
    assert type(checkpoint) is ListedCheckpoint
    assert checkpoint.state_key.startswith("ModelCheckpoint{'monitor': 'val/loss'")
    pickle.dumps(callbacks)


TORCH_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.10 GiB of which 1.06 GiB is "
    "free. Including non-PyTorch memory, this process has 78.03 GiB memory in use. See documentation for Memory "
    "Management"
)


LOST_WORKER = "DataLoader worker (pid 14451) is killed by signal: Killed. "


@pytest.mark.parametrize(
    ("error", "starts", "ends"),
    [
        (
            "OutOfMemoryError",
            "error: out of device memory (CUDA out of memory; Tried to allocate 2.00 GiB; GPU 0 has",
            "— fit — lower data.batch_size (trainer.accumulate_grad_batches keeps the tokens per optimizer step) or "
            "set model.activation_checkpointing: auto",
        ),
        (
            "RuntimeError",
            f"error: a data worker process died ({LOST_WORKER.strip('. ')}) — data.num_workers — lower",
            "are whole: resume with the same command and --ckpt_path auto (it starts again where none was saved yet)",
        ),
        (
            "OSError",
            "error: no space left on the device (or quota) while fit ran — runs/debug/version_0/events.out — free",
            "are whole: resume with the same command and --ckpt_path auto (it starts again where none was saved yet)",
        ),
    ],
)
def test_running_out_of_memory_in_fit_says_what_to_lower(
    tmp_path, tiny_corpus, capsys, monkeypatch, error, starts, ends
):
    """Was torch's traceback; now one line with what torch tried and what to change for this command, exit 2. A data
    worker the host's out-of-memory killer ended (SIGKILL) was a traceback of every frame of the training step, and
    so was a full disk under the TensorBoard log (its writer thread's error, raised at the next log)."""
    import errno

    import torch

    from epas_lightning.module import EPASModule

    errors = {
        "OutOfMemoryError": torch.OutOfMemoryError(TORCH_OOM),
        "RuntimeError": RuntimeError(LOST_WORKER),
        "OSError": OSError(errno.ENOSPC, "No space left on device", "runs/debug/version_0/events.out"),
    }

    def out_of_memory(self, batch, batch_idx):
        raise errors[error]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(EPASModule, "training_step", out_of_memory)
    assert main(["fit", "--config", DEBUG, "--trainer.max_steps", "1", "--trainer.num_sanity_val_steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(starts) and last.endswith(ends), last


def test_a_full_disk_under_the_tensorboard_log_is_one_line_without_its_writer_threads_traceback(
    tmp_path, tiny_corpus, capsys, monkeypatch
):
    """TensorBoard writes its event file on a thread of its own: a full disk printed that thread's traceback
    ("Exception in thread ...") before fit, raising the same error at the next log, printed its one line."""
    import errno
    import threading

    from tensorboard.summary.writer.record_writer import RecordWriter

    def full_disk(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/debug/version_0/events.out")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(RecordWriter, "write", full_disk)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # Python's, which prints; not pytest's
    assert main(["fit", "--config", DEBUG, "--trainer.max_steps", "2", "--trainer.num_sanity_val_steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: no space left on the device (or quota) while fit ran")


@pytest.mark.parametrize("where", ["checkpoint.monitor", "trainer.callbacks (EarlyStopping)"])
def test_a_monitor_naming_no_logged_metric_is_one_line(tmp_path, tiny_corpus, capsys, monkeypatch, where):
    """A typo in a checkpoint's or EarlyStopping's monitor was Lightning's traceback at the first check."""
    monkeypatch.chdir(tmp_path)
    stopping = "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
    (tmp_path / "es.yaml").write_text(stopping + "      init_args: {monitor: val/los}\n")
    flags = ["--checkpoint.monitor", "val/los"] if where == "checkpoint.monitor" else ["--config", "es.yaml"]
    quick = ["--trainer.max_steps", "1", "--trainer.val_check_interval", "1", "--trainer.num_sanity_val_steps", "0"]
    assert main(["fit", "--config", DEBUG, *quick, *flags]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "monitors 'val/los', which is not among the logged metrics (" in last, last
    assert last.endswith(
        f"val/loss, val/ppl, val/tokens{', epoch, step' * (where[0] == 'c')}) — {where} — monitor one of those"
    ), last


def test_package_logs_follow_stderr_when_it_is_replaced_later(monkeypatch):
    """The handler kept the stderr of the first `main()`; a later one in the same process (a notebook, a test) whose
    stderr was replaced got '--- Logging error ---' tracebacks from a closed stream, or its lines went elsewhere."""
    import io
    import logging

    from epas_lightning.cli import show_package_logs

    logger = logging.getLogger("epas_lightning")
    monkeypatch.setattr(logger, "handlers", [])
    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    show_package_logs()
    first.close()
    monkeypatch.setattr("sys.stderr", second)
    logger.info("region grows")
    assert second.getvalue() == "region grows\n"


def test_debug_reaches_the_processes_a_command_starts_while_it_runs(monkeypatch):
    """`--debug` was read from the command line only: serve's inference worker and other child processes, which see
    the environment, never knew it (errors.debug_enabled's EPAS_DEBUG). It is set while the command runs, then put
    back, so a later main() in the same process is not affected."""
    import os

    from epas_lightning import cli

    seen = []
    monkeypatch.delenv("EPAS_DEBUG", raising=False)
    monkeypatch.setattr(cli, "dispatch", lambda argv: seen.append(os.environ.get("EPAS_DEBUG")) or 0)
    assert main(["--debug", "generate"]) == 0 and main(["generate"]) == 0
    assert seen == ["1", None] and "EPAS_DEBUG" not in os.environ


def test_our_warnings_print_as_their_message_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning prints a warning from any path containing "lightning" as '<file>:<line>: <message>', so ours (the
    run-length warning of ProgressiveSharing, ...) began with '/…/epas_lightning/callbacks.py:108:'."""
    import warnings

    import lightning.pytorch  # installs Lightning's format

    from epas_lightning.lightning_messages import PACKAGE_DIR, print_our_warnings_as_lines

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # restored after the test
    print_our_warnings_as_lines()
    print_our_warnings_as_lines()  # once is enough: a second main() in the process wraps nothing more
    assert warnings.formatwarning("EPAS: x", UserWarning, str(PACKAGE_DIR / "callbacks.py"), 108) == "EPAS: x\n"
    theirs = str(Path(lightning.pytorch.__file__).parent / "trainer" / "trainer.py")
    assert warnings.formatwarning("y", UserWarning, theirs, 7) == f"{theirs}:7: y\n"


LAUNCHER_VARIABLES = ("TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "GROUP_RANK", "LOCAL_RANK",
                      "MASTER_ADDR", "MASTER_PORT", "NODE_RANK")  # fmt: skip
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": "0", "GROUP_RANK": "0",
            "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}  # fmt: skip
SLURM_JOB = {"SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"}
SRUN_TASK = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}
MATCH = "trainer.devices, trainer.num_nodes — pass --trainer.devices="


@pytest.mark.parametrize(
    ("environment", "flags", "line"),
    [
        (TORCHRUN, [], f"torchrun started 2 processes (WORLD_SIZE), but {{}} is 1 x 1 — {MATCH}2 --trainer.num_nodes"),
        (TORCHRUN, ["--trainer.strategy=fsdp2"], "torchrun started 2 processes (WORLD_SIZE), but {} is 1 x 1 —"),
        ({**SLURM_JOB, **SRUN_TASK, "SLURM_NTASKS_PER_NODE": "1(x2)"}, ["--trainer.strategy=fsdp2"],
         f"the SLURM job runs 2 tasks (SLURM_NTASKS), but {{}} is 1 x 1 — {MATCH}1 --trainer.num_nodes=2"),
        (SLURM_JOB, [], "the SLURM job asks for 2 tasks (SLURM_NTASKS) without saying how many per node"),
        ({**SLURM_JOB, "SLURM_NTASKS": "1"}, ["--trainer.strategy=fsdp2"],
         "SLURM_NTASKS is set but SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID not: this process was not started as a"),
        ({}, ["--trainer.strategy=fsdp2", "--trainer.num_nodes=2"],
         "trainer.num_nodes is 2, but no launcher started this process and MASTER_PORT is not set"),
        ({**SLURM_JOB, **SRUN_TASK, **TORCHRUN}, [], "torchrun started 2 processes (WORLD_SIZE), but {} is 1 x 1 —"),
        ({**TORCHRUN, "RANK": "1", "LOCAL_RANK": "1"}, ["--trainer.num_nodes=2"],
         "torchrun started 2 processes on each node (LOCAL_WORLD_SIZE=2), but trainer.devices is 1 — "
         f"{MATCH}2 --trainer.num_nodes=1 to match"),
        ({**SLURM_JOB, **SRUN_TASK, "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "1"},
         ["--trainer.strategy=fsdp2", "--trainer.num_nodes=2"],
         "the SLURM job runs 2 tasks on each node (SLURM_NTASKS_PER_NODE=2), but trainer.devices is 1 — "
         f"{MATCH}2 --trainer.num_nodes=1 to match"),
        ({**SLURM_JOB, **SRUN_TASK, "SLURM_NTASKS": "3", "SLURM_NTASKS_PER_NODE": "2(x1),1", "SLURM_PROCID": "1",
          "SLURM_LOCALID": "1"}, ["--trainer.strategy=fsdp2", "--trainer.num_nodes=3"],
         "this process is local rank 1 of its node, but trainer.devices is 1 — trainer.devices, trainer.num_nodes — "
         "set trainer.devices to the processes per node"),
        ({**SLURM_JOB, **SRUN_TASK, "SLURM_JOB_NAME": "interactive", "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "1",
          "SLURM_LOCALID": "1"}, [],
         "srun started this process as task 1 of a job named 'interactive', for which Lightning ignores SLURM: every "
         "task would train a model of its own — SLURM_JOB_NAME=interactive — give srun another --job-name"),
        ({"LOCAL_RANK": "0", "NODE_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
         ["--trainer.devices=2"], "this process runs on node 1 (counted from 0), but trainer.num_nodes is 1 — "
         "trainer.devices, trainer.num_nodes — set trainer.devices to the processes per node"),
    ],
    ids=["torchrun-one-device", "torchrun-fsdp2", "srun-fsdp2", "sbatch-ntasks", "no-srun-task", "no-launcher",
         "torchrun-in-srun", "torchrun-per-node", "srun-per-node", "srun-uneven-nodes", "srun-interactive",
         "by-hand-node-past"],
)  # fmt: skip
def test_processes_a_launcher_started_that_cannot_train_together_are_one_line(environment, flags, line, tmp_path,
                                                                               capsys, monkeypatch):  # fmt: skip
    """torchrun's or srun's processes against trainer.devices x trainer.num_nodes: with the default one device every
    process trained a model of its own into one run folder (exit 0); under FSDP2 a rank failed with an IndexError and
    the first waited. num_nodes: 2 with no launcher waited 30 minutes; SLURM without --ntasks-per-node, or without
    srun's task variables, was a traceback. torchrun's processes inside an srun of one task a node were refused for
    SLURM's missing --ntasks-per-node, which Lightning never reads for them. A count per node other than
    trainer.devices (the product right) was Lightning's IndexError; srun's tasks of a job named interactive each
    trained alone, exiting 0. A process started by hand on a node past trainer.num_nodes waited 30 minutes."""
    monkeypatch.chdir(tmp_path)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert main(["fit", "--config", DEBUG, *flags]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(
        "error: " + line.format("trainer.devices x trainer.num_nodes")
    ), err[-2000:]
    assert not (tmp_path / "runs").exists()


def test_an_srun_step_other_than_the_jobs_layout_is_not_refused(monkeypatch):
    """SLURM_NODEID counts the job's nodes, not the step's: an srun step on the second node of a job has node 1 with
    trainer.num_nodes 1, and its ranks come from SLURM_PROCID, which no node count can put past the world size. An
    srun of fewer tasks a node than the job's --ntasks-per-node runs as many as it says (SLURM_STEP_TASKS_PER_NODE)."""
    from types import SimpleNamespace

    from lightning.fabric.plugins.environments import SLURMEnvironment

    from epas_lightning.launch import check_processes_meet

    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {**SLURM_JOB, **SRUN_TASK, "SLURM_NTASKS_PER_NODE": "2", "SLURM_NODEID": "1"}.items():
        monkeypatch.setenv(name, value)
    connector = SimpleNamespace(cluster_environment=SLURMEnvironment())
    check_processes_meet(SimpleNamespace(_accelerator_connector=connector, num_devices=2, num_nodes=1))
    # srun's step of 1 task in a job of 2 a node: SLURM_NTASKS_PER_NODE is the job's, srun's layout the step's
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", "1")
    check_processes_meet(SimpleNamespace(_accelerator_connector=connector, num_devices=1, num_nodes=1))


def test_tensor_parallelism_the_model_has_no_plan_for_is_one_line(tmp_path, capsys, monkeypatch):
    """Lightning's ModelParallelStrategy splits a node's processes by tensor parallelism by default; the model shards
    over the data-parallel mesh alone, so each process trained a model of its own on its own data (exit 0)."""
    monkeypatch.chdir(tmp_path)
    strategy = "--trainer.strategy.class_path=lightning.pytorch.strategies.ModelParallelStrategy"
    assert main(["fit", "--config", DEBUG, "--trainer.devices=2", strategy]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: ModelParallelStrategy would split the model over 2 processes by tensor parallelism, which it has no "
        "plan for: each process would train a model of its own — trainer.strategy — use trainer.strategy: fsdp2 "
        "(FSDP2 over every process, no tensor parallelism)"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("data", "devices", "nodes"), [("auto", 2, 1), (1, 2, 1), (2, 2, 2), (4, 2, 1)])
def test_model_parallel_sizes_that_miss_the_processes_are_refused_before_launch(data, devices, nodes):
    """tensor_parallel_size 1 with the parent's data_parallel_size (the node count) fell short of the processes:
    Lightning raised a RuntimeError traceback on every rank after the launch."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from epas_lightning.strategy import FSDP2Strategy, check_data_parallel_only

    strategy = ModelParallelStrategy(data_parallel_size=data, tensor_parallel_size=1)
    size = nodes if data == "auto" else data
    refused = (
        f"ModelParallelStrategy's data_parallel_size {size} x tensor_parallel_size 1 is not the {devices * nodes} "
        f"processes of the run (trainer.devices {devices} x trainer.num_nodes {nodes})"
    )
    with pytest.raises(ConfigError, match=re.escape(refused)):
        check_data_parallel_only(strategy, devices, nodes)
    check_data_parallel_only(
        ModelParallelStrategy(data_parallel_size=devices * nodes, tensor_parallel_size=1), devices, nodes
    )
    check_data_parallel_only(FSDP2Strategy(), devices, nodes)  # its data-parallel size is every process


def test_ddp_static_graph_is_one_line_before_the_ranks_start(tmp_path, capsys, monkeypatch):
    """ProgressiveSharing refuses static_graph in setup, on every rank Lightning started (one line each, after the data
    was prepared); the command refuses it before it starts them."""
    monkeypatch.chdir(tmp_path)
    ddp = ["--trainer.strategy.class_path=lightning.pytorch.strategies.DDPStrategy"]
    ddp += [
        "--trainer.strategy.init_args.static_graph=true",
        "--trainer.strategy.init_args.find_unused_parameters=true",
    ]
    assert main(["fit", "--config", DEBUG, *ddp]) == 2
    err = capsys.readouterr().err
    assert "corpus" not in err and [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: DDP's static_graph=True cannot train a growing sharing region: the sharing layers' q/k projections "
        "stop getting gradients at step 4, and a static graph fails there — trainer.strategy: static_graph — leave "
        "static_graph unset (find_unused_parameters=True is set for you)"
    ]
    assert not (tmp_path / "runs").exists()


def test_ddp_static_graph_fits_a_region_whole_from_the_first_step(tmp_path, capsys, monkeypatch):
    """sharing.start_step 0 with the whole region in one stage: the same parameters get gradients every step, which a
    static graph takes; fit refused it as a growing region."""
    monkeypatch.chdir(tmp_path)
    ddp = ["--trainer.strategy.class_path=lightning.pytorch.strategies.DDPStrategy"]
    ddp += ["--trainer.strategy.init_args.static_graph=true", "--sharing.start_step=0", "--trainer.max_steps=2"]
    assert main(["fit", "--config", DEBUG, *ddp, "--trainer.logger=false", "--trainer.enable_checkpointing=false"]) == 0
    assert "error:" not in capsys.readouterr().err


def test_a_master_port_another_program_holds_is_one_line(tmp_path, capsys, monkeypatch):
    """torch's DistNetworkError traceback (EADDRINUSE) when the first rank's store could not listen on MASTER_PORT."""
    import socket

    monkeypatch.chdir(tmp_path)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        assert main(["fit", "--config", DEBUG, "--trainer.strategy=fsdp2", "--trainer.logger=false"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"error: port {port} is in use by another program: the ranks cannot meet on it — MASTER_PORT={port} — set "
        "MASTER_PORT to a free port, or leave it unset on one machine (a free one is picked)"
    )


@pytest.mark.parametrize(
    ("name", "near"),
    [("fsdp3", " (did you mean 'fsdp2'?)"), ("ddp-spawn", " (did you mean 'ddp_spawn'?)"), ("zero", "")],
)
def test_a_strategy_name_lightning_does_not_know_names_the_nearest(name, near, tmp_path, capsys, monkeypatch):
    """Lightning's refusal listed four examples (fsdp2 not among them) and sent the user to its website."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, f"--trainer.strategy={name}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: unknown strategy '{name}'{near} — trainer.strategy: {name} — give auto, ddp, fsdp2 or another name "
        "of Lightning's StrategyRegistry, or a class_path"
    )


@pytest.mark.parametrize("name", ["lightning.pytorch.strategies.ModelParallelStrategy", "FSDP2Strategy"])
def test_a_strategy_class_given_as_a_name_says_how_to_give_a_class(name, tmp_path, capsys, monkeypatch):
    """--trainer.strategy=<class path> is read as a registry name; the refusal said "or a class_path" as if it was
    not one (also for a class's bare name, which class_path takes as it takes a path)."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, f"--trainer.strategy={name}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: unknown strategy '{name}' — trainer.strategy: {name} — a class is given as "
        f"--trainer.strategy.class_path={name} (YAML: strategy: {{class_path: {name}}})"
    )


def test_init_args_after_a_strategy_name_say_to_give_its_class(tmp_path, capsys, monkeypatch):
    """`--trainer.strategy=fsdp2 --trainer.strategy.init_args.…` (the README: its class_path form takes init_args) was
    "no class named fsdp2 is known", though fsdp2 is a name fit knows."""
    monkeypatch.chdir(tmp_path)
    args = ["--trainer.strategy=fsdp2", "--trainer.strategy.init_args.save_distributed_checkpoint=false"]
    assert main(["fit", "--config", DEBUG, *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: fsdp2 is a strategy name, which takes no init_args — --trainer.strategy — give its class to set "
        "them: --trainer.strategy.class_path=epas_lightning.strategy.FSDP2Strategy (YAML: strategy: {class_path: "
        "epas_lightning.strategy.FSDP2Strategy, init_args: {...}})"
    )


def test_init_args_after_a_strategy_name_keep_the_settings_of_the_name(tmp_path, capsys, monkeypatch):
    """ddp_spawn is DDPStrategy with start_method spawn: the class path alone, as the refusal said to give, would have
    started the ranks another way (DDPStrategy's own default, popen)."""
    monkeypatch.chdir(tmp_path)
    args = [
        "--trainer.strategy=ddp_spawn_find_unused_parameters_true",
        "--trainer.strategy.init_args.static_graph=false",
    ]
    assert main(["fit", "--config", DEBUG, *args]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: ddp_spawn_find_unused_parameters_true is a strategy name, which takes no init_args — "
        "--trainer.strategy — give its class to set them: "
        "--trainer.strategy.class_path=lightning.pytorch.strategies.ddp.DDPStrategy "
        "--trainer.strategy.init_args.find_unused_parameters=true --trainer.strategy.init_args.start_method=spawn "
        "(YAML: strategy: {class_path: lightning.pytorch.strategies.ddp.DDPStrategy, init_args: "
        "{find_unused_parameters: true, start_method: spawn, ...}})"
    )


def test_a_strategy_whose_package_is_missing_is_one_line(tmp_path, capsys, monkeypatch):
    """Lightning's XLAStrategy raised a ModuleNotFoundError traceback (DeepSpeed's says it as a misconfiguration)."""
    if importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed")
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--trainer.strategy=xla"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and "pip install" in last
    assert last.startswith("error: a configured setting needs torch_xla")


def test_a_start_refused_by_a_check_prints_its_line_alone(tmp_path):
    """A mistyped data folder was checked only once Lightning had built the Trainer, so the refusal came after
    Lightning's "Seed set", "GPU available" and "TPU available" lines (and, for a val_dir, after preparing the built-in
    corpus), as was a vocabulary too small for the built-in corpus; a setting a constructor refuses came after "Seed
    set". Both are the command's only line now, in a fresh process (in-process runs do not show Lightning's start-up
    lines; the three cases share one, each with its own stderr)."""
    from helpers import run_cli_commands

    cases = {
        "data folder": ["--data.val_dir", "nodata"],
        "built-in corpus vocabulary": ["--model.config.vocab_size", "100"],
        "sharing target": ["--sharing.target", "[0, 1]"],
    }
    (cwd := tmp_path / "cwd").mkdir()
    commands = [["fit", "--config", DEBUG, *flags] for flags in cases.values()]
    done = run_cli_commands(commands, cwd, tmp_path / "cache", tmp_path / "stderr")
    for case, (status, err) in zip(cases, done, strict=True):
        assert status == 2, (case, err)
        assert err.startswith("error: ") and err.count("\n") == 1, (case, err)
    assert not (cwd / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_gradient_clip_value_of_nan_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    """`--trainer.gradient_clip_val .nan` (YAML's NaN) passed, being no number at or below 0 (Lightning's "no
    clipping"): every gradient came out NaN, and the run stopped as diverged, blaming the learning rate."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--trainer.gradient_clip_val", ".nan"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: trainer.gradient_clip_val must be a number, not nan — trainer.gradient_clip_val — set a positive "
        "number, or leave it unset for no clipping"
    )


def _prompts(prompt: list[str] | None = None, prompt_file: Path | None = None) -> list[str] | None:
    """A stand-in command with a list option."""
    return prompt


@pytest.mark.parametrize(
    ("argv", "prompts"),
    [
        (["--config", "{config}", "--prompt", "c"], ["c"]),  # the command line replaces the file's list
        (["--config", "{config}", "--prompt", "c", "--prompt", "d"], ["c", "d"]),  # and its own flags add up
        (["--prompt", "c", "--config", "{config}"], ["a", "b"]),  # a later --config replaces, as for any option
        (["--config", "{config}", "--prompt", "[c, d]"], ["[c, d]"]),
        (["--config", "{config}"], ["a", "b"]),
    ],
)
def test_a_list_flag_replaces_the_list_of_an_earlier_config(tmp_path, argv, prompts):
    """`generate --config g.yaml --prompt x` generated for the file's prompts and x: a repeated list flag appended to
    the list --config had set, where any other flag on the command line overrides the file."""
    from epas_lightning.cli import run_function

    (config := tmp_path / "g.yaml").write_text("prompt: [a, b]\n")
    argv = [str(config) if arg == "{config}" else arg for arg in argv]
    assert run_function(_prompts, "prompts", argv) == prompts


def _paths(input: list[Path], val_input: list[Path] | None = None) -> tuple[list[Path], list[Path] | None]:
    """A stand-in command with path list options."""
    return input, val_input


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ("input: a.txt\n", ([Path("a.txt")], None)),  # was "--input takes a list ... not 'a.txt'"
        ("input: a.txt\nval_input: v\n", ([Path("a.txt")], [Path("v")])),
        ("input: [a.txt, b]\nval_input: null\n", ([Path("a.txt"), Path("b")], None)),
    ],
)
def test_a_single_value_in_a_config_is_a_list_of_one_for_a_path_list_flag(tmp_path, yaml, expected):
    """`input: a.txt` in a --config was refused as "takes a list", where the flag given once (`--input a.txt`) is a
    list of one."""
    from epas_lightning.cli import run_function

    (config := tmp_path / "c.yaml").write_text(yaml)
    assert run_function(_paths, "paths", ["--config", str(config)]) == expected


@pytest.mark.parametrize(
    ("argv", "paths"),
    [
        (["--input", "[a.txt, b]"], [Path("[a.txt, b]")]),  # was two paths, a.txt and b
        (["--input=a", "--input", "[b,c]"], [Path("a"), Path("[b,c]")]),
        (["--input", "[]"], [Path("[]")]),  # was no input at all
        (["--input", "a", "--input+", "-"], [Path("a"), Path("-")]),
    ],
)
def test_every_value_of_a_path_list_flag_is_one_path(argv, paths):
    """`--input [a,b]` was two paths, where --help says to repeat the flag for several and a YAML string
    (`input: "[a, b]"`) is one path: each value of a list flag is one item, as typed, as a --prompt is."""
    from epas_lightning.cli import run_function

    assert run_function(_paths, "paths", argv) == (paths, None)


@pytest.mark.parametrize(
    ("yaml", "prompts"),
    [
        ("prompt: hello\n", ["hello"]),  # was "--prompt takes a list ... not 'hello'"
        ("prompt: '[a, b]'\n", ["[a, b]"]),  # a YAML string is one prompt, as typed (was two)
        ("prompt: '#include <x>'\n", ["#include <x>"]),  # was None: read again as YAML, a comment
        ("prompt: [a, '[b]']\n", ["a", "[b]"]),
        ("prompt: null\n", None),
    ],
)
def test_a_single_value_in_a_config_is_one_item_of_a_text_list_flag(tmp_path, yaml, prompts):
    """`prompt: hello` in a --config was refused as "takes a list"; a YAML string for a text list flag is one item, as
    typed, as the flag's value on the command line is."""
    from epas_lightning.cli import run_function

    (config := tmp_path / "g.yaml").write_text(yaml)
    assert run_function(_prompts, "prompts", ["--config", str(config)]) == prompts


def test_a_bad_value_on_the_command_line_is_quoted_as_typed(tmp_path, capsys, monkeypatch):
    """`--checkpoint.train_time_interval 30:00` said "not '1800'": the value as YAML 1.1 reads it (sexagesimal)."""
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "--config", DEBUG, "--checkpoint.train_time_interval", "30:00"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        'error: --checkpoint.train_time_interval takes a duration "H:MM:SS" (e.g. "0:30:00"), not \'30:00\' — '
        "python -m epas_lightning fit — see `python -m epas_lightning fit --help`"
    )


def test_two_save_triggers_of_the_checkpoint_section_are_refused_at_their_settings(tmp_path, capsys, monkeypatch):
    """`train_time_interval` with `every_n_train_steps` (the README: "not together") was Lightning's sentence at "the
    configuration", with "fix the value in the YAML or the flag": neither the settings nor which to drop."""
    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint.every_n_train_steps", "100", "--checkpoint.train_time_interval", "0:30:00"]
    assert main(["fit", "--config", DEBUG, *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: the checkpoint section saves by more than one trigger (steps, epochs, time) — "
        "checkpoint.every_n_train_steps: 100, checkpoint.train_time_interval: 0:30:00 — set one of them"
    )
    assert not (tmp_path / "runs").exists()


def test_two_save_triggers_of_a_checkpoint_callback_of_the_trainer_are_not_blamed_on_the_checkpoint_section(
    tmp_path, capsys, monkeypatch
):
    """A StepCheckpoint of trainer.callbacks given two triggers was refused as 'the checkpoint section' at
    checkpoint.every_n_train_steps and checkpoint.every_n_epochs, settings the config does not have."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "callbacks.yaml").write_text(
        "trainer:\n  callbacks:\n    - class_path: epas_lightning.StepCheckpoint\n      init_args:\n"
        "        dirpath: mine\n        every_n_train_steps: 5\n        every_n_epochs: 1\n"
    )
    assert main(["fit", "--config", DEBUG, "--config", "callbacks.yaml"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: a checkpoint callback of trainer.callbacks saves by more than one trigger (steps, epochs, time) — "
        "trainer.callbacks: every_n_train_steps: 5, every_n_epochs: 1 — set one of them"
    )
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "prompts"),
    [
        (["--prompt", "[INST] hi"], ["[INST] hi"]),  # text that starts with "[" is a prompt, not a broken list
        (["--prompt=[INST] hi", "--prompt", "b"], ["[INST] hi", "b"]),
        (["--prompt=", "--prompt", "b"], ["", "b"]),  # an empty `=` value is a value: `--prompt` took the next flag
        (["--config", "{config}", "--prompt+", "c", "--prompt", "d"], ["a", "b", "c", "d"]),  # jsonargparse's `+`
        (["--prompt", "c", "--prompt", "[d, e]"], ["c", "[d, e]"]),  # a value is one prompt, as typed
        (["--prompt", "c", "--config", "{config}", "--prompt", "d"], ["d"]),  # d replaces the list of the --config
        (["--config", "{config}", "--config", "{config}", "--prompt", "c"], ["c"]),
        (["--prompt", "#include <stdio.h>"], ["#include <stdio.h>"]),  # was None: a YAML comment
        (["--prompt", "a", "--prompt", "null"], ["a", "null"]),  # was None: YAML's null dropped every prompt
        (["--prompt", "~", "--prompt=&x"], ["~", "&x"]),  # were None too
        (["--prompt", "- item", "--prompt", "[x for x in y]"], ["- item", "[x for x in y]"]),  # were item, x for x in y
        (["--prompt", "-.5", "--prompt+", "1e3", "--prompt", "-"], ["-.5", "1e3", "-"]),  # -.5 was -0.5
        (["--prompt", "[a]", "--prompt", "[]", "--prompt", "{a: 1}"], ["[a]", "[]", "{a: 1}"]),
    ],
)
def test_every_value_of_a_list_flag_is_kept(tmp_path, argv, prompts):
    """`--prompt "[INST] hi"` was refused as a list that does not parse, `--prompt= --prompt b` took `--prompt` as the
    value of the first, `--prompt+ c --prompt d` dropped c (the inserted `--prompt=[]` came after it), and
    `--prompt c --config g.yaml --prompt d` added d to the file's list. A value was read as YAML: `#include <x>` was a
    comment (no prompt at all), `null` no list, `[a, b]` two prompts and `[x for x in y]` the prompt "x for x in y"; a
    text flag's value is one prompt, as typed (a YAML list of prompts is a --config's)."""
    from epas_lightning.cli import run_function

    (config := tmp_path / "g.yaml").write_text("prompt: [a, b]\n")
    argv = [str(config) if arg == "{config}" else arg for arg in argv]
    assert run_function(_prompts, "prompts", argv) == prompts


def test_a_dash_value_after_prompt_plus_is_said_to_be_written_with_prompt_plus(tmp_path):
    """`--prompt+ -x` (add -x to a --config's prompts) was told to write `--prompt=-x`, which replaces them."""
    from epas_lightning.cli import run_function
    from epas_lightning.errors import ConfigError

    (config := tmp_path / "g.yaml").write_text("prompt: [a, b]\n")
    with pytest.raises(ConfigError) as refused:
        run_function(_prompts, "prompts", ["--config", str(config), "--prompt+", "-x"])
    assert refused.value.fix == 'give --prompt a value; write --prompt+=-x for one that starts with "-"'
    assert run_function(_prompts, "prompts", ["--config", str(config), "--prompt+=-x"]) == ["a", "b", "-x"]


def test_print_config_writes_text_flag_values_as_typed(capsys):
    """`--print_config` writes each --prompt as the command reads it (one prompt, as typed)."""
    import yaml

    from epas_lightning.cli import run_function

    with pytest.raises(SystemExit):
        run_function(_prompts, "prompts", ["--prompt", "#include <x>", "--prompt", "[a, b]", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["prompt"] == ["#include <x>", "[a, b]"]


def test_generate_help_says_how_a_prompt_is_read(capsys):
    """The rule for a --prompt value (one prompt as typed; `--prompt=-x` for one that starts with "-") is in --help."""
    assert main(["generate", "--help"]) == 0
    helped = " ".join(capsys.readouterr().out.split())
    assert "'[a, b]' is one prompt too" in helped and 'one that starts with "-" is written --prompt=-x' in helped


def _count(n: int = 1) -> int:
    """A stand-in command with a number option."""
    return n


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["--n", "x", "--n", "5"], "x"),  # the parser stops at the bad one, not the last
        (["--n=x", "--n=5"], "x"),
        (["--n", "5", "--config", "{config}"], "x"),  # a --config after the flag gave the bad value
        (["--n", "5", "--n", "1e3"], "1e3"),  # which the parser reports as it reads it, 1000.0
    ],
)
def test_the_value_quoted_as_typed_is_the_bad_one(tmp_path, argv, bad):
    """`--n x --n 5` and `--n 5 --config c.yaml` (with `n: x`) said "--n takes a whole number, not '5'"."""
    from epas_lightning.cli import run_function

    (config := tmp_path / "c.yaml").write_text("n: x\n")
    argv = [str(config) if arg == "{config}" else arg for arg in argv]
    with pytest.raises(ConfigError) as error:
        run_function(_count, "count", argv)
    assert str(error.value).startswith(f"--n takes a whole number, not {bad!r} — ")
