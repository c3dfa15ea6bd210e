"""Every command that loads weights refuses what the checkpoint's description shows (its region, vocabulary and
context) and what the flags and the data folder say before it reads a weight: one line, not minutes later."""

import pytest
from helpers import train_tiny_sentencepiece
from model_dirs import save_consolidated, save_scripted

from epas_lightning import Llama, LlamaConfig, checkpoint
from epas_lightning.cli import main as cli_main

TOO_SMALL = "the tokenizer has 300 tokens but the model's vocab_size is 64"
DENSE = "trained dense (no sharing layers); 1 was asked for — --sharing-layers —"
PAST_CONTEXT = "the data's seq_len (100) exceeds the model's context length (64)"
OTHER_TOKENIZER = "prepared with another tokenizer"
NO_DEVICE = "— --device cuda:99 —"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Dense models of context 64 with a 300-token sentencepiece tokenizer, of 2 layers with vocabularies of 64 and
    320 (``{vocab_size: folder}``) and of 1 layer (``{1: folder}``)."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tiny_sentencepiece(root / "tokenizer.model")
    models = {vocab: save_scripted(root / f"v{vocab}", tokenizer, vocab, [3, 4]) for vocab in (64, 320)}
    one_layer = Llama(LlamaConfig.from_name("debug", n_layer=1, vocab_size=320, block_size=64))
    return {**models, 1: save_consolidated(one_layer, root / "one_layer", tokenizer)}


@pytest.mark.parametrize(
    ("command", "vocab", "flags", "says"),
    [
        ("export", 64, [], TOO_SMALL),
        ("export", 320, ["--sharing-layers", "1"], DENSE),
        ("evaluate", 320, ["--sharing-layers", "1"], DENSE),
        ("evaluate", 320, ["--seq-len", "100"], PAST_CONTEXT),
        ("evaluate", 320, [], "nothing to evaluate: the checkpoint does not say which data it trained on"),
        ("evaluate", 320, ["--data", "CORPUS"], OTHER_TOKENIZER),
        ("bench", 320, ["--sharing-layers", "1"], DENSE),
        ("bench", 320, ["--prompt-len", "64"], "a prompt of 64 tokens leaves no room for new ones"),
        ("bench", 320, ["--data", "CORPUS"], OTHER_TOKENIZER),
        ("bench", 320, ["--budget", "0.5"], "no region fits a budget of 0.5 x dense"),
        ("analyze", 320, ["--seq-len", "100"], PAST_CONTEXT),
        ("analyze", 320, [], "held-out text in another tokenization would measure nothing"),
        ("analyze", 320, ["--data", "CORPUS"], OTHER_TOKENIZER),
        ("analyze", 1, [], "a 1-layer model has no layer that could share"),
        ("evaluate", 320, ["--device", "cuda:99"], NO_DEVICE),
        ("bench", 320, ["--device", "cuda:99"], NO_DEVICE),
        ("analyze", 320, ["--data", "CORPUS", "--device", "cuda:99"], NO_DEVICE),
        ("lm-eval", 64, [], TOO_SMALL),
        ("lm-eval", 320, ["--sharing-layers", "1"], DENSE),
    ],
)
def test_a_command_refuses_what_the_checkpoint_says_before_reading_the_weights(
    command, vocab, flags, says, models, tiny_corpus, tmp_path, capsys, monkeypatch
):
    """export, evaluate, bench, analyze and lm-eval loaded the whole model first, and only then refused a region the
    checkpoint never trained, a tokenizer larger than its vocabulary, a length past its context or a data folder of
    another tokenizer (minutes for a large checkpoint), all known from its metadata. A device this machine lacks is
    said first and alone (not after a note on the data)."""

    def read(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(checkpoint, "_load_weights", read)
    flags = [str(tiny_corpus) if flag == "CORPUS" else flag for flag in flags]
    output = ["--output", str(tmp_path / "out")]
    device = [] if command == "export" else ["--device", "cpu"]  # a --device in flags comes after: it wins
    if command == "lm-eval":
        pytest.importorskip("lm_eval")
        (tmp_path / "task.yaml").write_text("task: tiny\ndataset_path: json\noutput_type: multiple_choice\n")
        device += ["--tasks", str(tmp_path / "task.yaml")]
    rc = cli_main([command, "--checkpoint", str(models[vocab]), *output, *device, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()


def test_epaslm_refuses_a_region_past_the_trained_one_before_reading_the_weights(models, monkeypatch):
    """``EPASLM(checkpoint, sharing_layers=N)`` from Python loaded every weight and only then refused an N the
    checkpoint never trained, known from its metadata; now refused first, naming the model arguments."""
    from epas_lightning.errors import ConfigError

    lm_eval_adapter = pytest.importorskip("epas_lightning.evaluation.lm_eval_adapter")

    def read(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(checkpoint, "_load_weights", read)
    with pytest.raises(ConfigError, match="trained dense \\(no sharing layers\\); 1 was asked for — sharing_layers —"):
        lm_eval_adapter.EPASLM(str(models[320]), sharing_layers=1, device="cpu")


@pytest.mark.parametrize("command", ["evaluate", "bench", "analyze"])
def test_an_output_inside_the_data_folder_read_is_refused_before_the_weights(
    command, models, tiny_corpus, tmp_path, capsys, monkeypatch
):
    """The commands that read a --data folder refused an --output inside the checkpoint only: one inside the
    prepared data folder was built there (after minutes of work, and deleted by the next ``prepare --overwrite``)."""
    import shutil

    def read(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(checkpoint, "_load_weights", read)
    data = shutil.copytree(tiny_corpus, tmp_path / "data")
    flags = ["--checkpoint", str(models[320]), "--data", str(data), "--device", "cpu", "--output", str(data / "out")]
    rc = cli_main([command, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"the output lies inside the input {data.resolve()}" in err, err
    assert not (data / "out").exists()
