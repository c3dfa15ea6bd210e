"""Every command that loads weights refuses what the checkpoint's description shows (its region, vocabulary and
context) and what the flags and the data folder say before it reads a weight: one line, not minutes later."""

import pytest
from helpers import train_tiny_sentencepiece
from model_dirs import save_scripted

from epas_lightning import checkpoint
from epas_lightning.cli import main as cli_main

TOO_SMALL = "the tokenizer has 300 tokens but the model's vocab_size is 64"
DENSE = "trained dense (no sharing layers); 1 was asked for — --sharing-layers —"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Dense 2-layer models of context 64 with a 300-token sentencepiece tokenizer: ``{vocab_size: folder}``."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tiny_sentencepiece(root / "tokenizer.model")
    return {vocab: save_scripted(root / f"v{vocab}", tokenizer, vocab, [3, 4]) for vocab in (64, 320)}


@pytest.mark.parametrize(
    ("command", "vocab", "flags", "says"),
    [
        ("export", 64, [], TOO_SMALL),
        ("export", 320, ["--sharing-layers", "1"], DENSE),
    ],
)
def test_a_command_refuses_what_the_checkpoint_says_before_reading_the_weights(
    command, vocab, flags, says, models, tmp_path, capsys, monkeypatch
):
    """export loaded the whole model first, and only then refused a region the checkpoint never trained or a tokenizer
    larger than its vocabulary (minutes for a large checkpoint), both known from its metadata."""

    def read(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(checkpoint, "_load_weights", read)
    output = [] if command == "evaluate" else ["--output", str(tmp_path / "out")]
    argv = [command, "--checkpoint", str(models[vocab]), *output, *flags]
    rc = cli_main([*argv, *([] if command == "export" else ["--device", "cpu"])])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists()
