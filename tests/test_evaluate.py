"""Evaluation: the held-out loss over the real vocabulary, multiple-choice scoring (lm-eval style), the CLI.

lm-eval itself (the `epas` model, the `lm-eval` command) is tested in test_lm_eval.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import strict_json, without_heldout_sequences
from model_dirs import save_consolidated

from epas_lightning import Llama, LlamaConfig, checkpoint
from epas_lightning.cli import main as cli_main
from epas_lightning.errors import ConfigError, DataError
from epas_lightning.evaluation import evaluate_perplexity, evaluate_task, load_task, score_continuations


def evaluate_main(argv: list[str]) -> int:
    return cli_main(["evaluate", *argv])


VOCAB = 512


def tiny_model(n_layer: int = 4, block_size: int = 32, shared: int = 0, padded: int | None = None) -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(
        n_layer=n_layer, n_embd=64, n_head=4, n_kv_head=2, vocab_size=VOCAB, block_size=block_size,
        padded_vocab_size=padded,
    )  # fmt: skip
    model = Llama(config).eval()
    model.set_shared_layers(range(n_layer - shared, n_layer))
    return model


def direct_loglik(model: Llama, context: list[int], continuation: list[int]) -> float:
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = F.log_softmax(model(tokens[:, :-1])[0, :, :VOCAB], dim=-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return sum(logprobs[p, t].item() for p, t in zip(positions, continuation, strict=True))


def test_score_continuations_equals_direct_computation() -> None:
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    requests = [
        (torch.randint(0, VOCAB, (n,), generator=g).tolist(), torch.randint(0, VOCAB, (m,), generator=g).tolist())
        for n, m in [(1, 3), (10, 1), (5, 7), (20, 4)]
    ]
    scores = score_continuations(model, requests, batch_size=3)  # mixed lengths in one padded batch
    for (context, continuation), (score, _) in zip(requests, scores, strict=True):
        assert score == pytest.approx(direct_loglik(model, context, continuation), abs=1e-4)
    # too long: cut from the left to block_size inputs, the continuation kept whole
    context, continuation = list(range(40)), [7, 8]
    (score, _) = score_continuations(model, [(context, continuation)])[0]
    assert score == pytest.approx(direct_loglik(model, context[-31:], continuation), abs=1e-4)


class CharTokenizer:
    """ord(c) per character; BOS 0, EOS 1."""

    bos_id, eos_id = 0, 1

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


class FavoursA(Llama):
    """A 'model' whose next token is 'a' with probability ~1 everywhere: every other character costs ~ -L."""

    def __init__(self) -> None:
        super().__init__(LlamaConfig(n_layer=2, n_embd=8, n_head=2, vocab_size=128, block_size=16))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*input_ids.shape, self.config.padded_vocab_size)
        logits[..., ord("a")] = 20.0
        return logits


def test_multiple_choice_acc_and_acc_norm_known_answers(tmp_path: Path) -> None:
    task = tmp_path / "task.jsonl"
    lines = [
        {"context": "q1", "choices": ["x", "a"], "label": 1},  # both metrics right
        {"context": "q2", "choices": ["x", "aaaaxx"], "label": 1},  # sum picks the short one, per-char the long one
        {"context": "q3", "choices": ["ab", "x"], "label": 1},  # both pick "ab": wrong
    ]
    task.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    result = evaluate_task(FavoursA(), CharTokenizer(), load_task(task), batch_size=2)
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}


def test_acc_norm_of_an_empty_choice_divides_by_its_zero_length_as_lm_eval_does(tmp_path: Path) -> None:
    """lm-eval divides each log-likelihood by its choice's length in characters: an empty choice (scored by the
    context's trailing space alone) gets -inf and is never its pick; it was divided by 1 here, and picked."""
    task = tmp_path / "task.jsonl"
    task.write_text(json.dumps({"context": "q ", "choices": ["", "xx"], "label": 1}) + "\n")
    # about -20 for " " and -60 for " xx": acc picks "", acc_norm -inf against -30 picks "xx"
    assert evaluate_task(FavoursA(), CharTokenizer(), load_task(task)) == {"acc": 0.0, "acc_norm": 1.0, "n": 1}


def test_a_question_the_model_cannot_score_names_its_line(tmp_path: Path) -> None:
    """An empty choice, or one longer than the model's context, ended evaluate --tasks with a ValueError traceback;
    token ids outside the model's vocabulary (a --tokenizer of another model) with an IndexError."""
    task = tmp_path / "task.jsonl"
    for n, (choice, says) in enumerate((("", "no tokens"), ("a" * 17, "17 tokens, more than the model's context")), 2):
        lines = [{"context": "q1", "choices": ["x", "a"], "label": 1}] * (n - 1) + [
            {"context": "q2", "choices": ["x", choice], "label": 1}
        ]
        task.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
        with pytest.raises(DataError, match=f"choice 2 has {says}.* — {task}:{n} — "):
            evaluate_task(FavoursA(), CharTokenizer(), load_task(task))
    task.write_text(json.dumps({"context": "q", "choices": ["x", "\u00e9"], "label": 0}) + "\n")  # id 233: not in 128
    with pytest.raises(DataError, match=rf"token ids must lie in 0\.\.127 .*, got 0\.\.233 — {task}:1 — "):
        evaluate_task(FavoursA(), CharTokenizer(), load_task(task))  # (a --tokenizer of another model): no IndexError


def test_evaluate_task_from_python_refuses_what_it_cannot_score_with_one_line() -> None:
    """Questions as dicts, an out-of-range label (scored as wrong), no questions (a ZeroDivisionError), a tokenizer
    path, batch_size 0 (a ValueError from range) and a LoadedModel or a meta model failed deep inside or not at all."""
    import numpy as np

    from epas_lightning.evaluation.multiple_choice import Question

    model, tokenizer, question = FavoursA(), CharTokenizer(), Question("q", ["x", "a"], 1)
    assert evaluate_task(model, tokenizer, [question])["acc"] == 1.0
    for label in (np.int64(1), torch.tensor(1)):  # a label from a data frame or a tensor was scored before the check
        assert evaluate_task(model, tokenizer, [Question("q", ["x", "a"], label)])["acc"] == 1.0
    bad = [
        (dict(questions=[]), DataError, "no questions to evaluate — questions — "),
        (dict(questions=[{"context": "q"}]), DataError, "a question must be a Question, not a dict — questions\\[0\\]"),
        (dict(questions=[question, Question("q", ["x", "a"], 2)]), DataError, "label 2 is not the index of one of its "
         "2 choices — questions\\[1\\] — set it to 0..1$"),
        (dict(tokenizer=Path("tokenizer.json")), ConfigError, "tokenizer must be a loaded tokenizer, not a \\w*Path"),
        (dict(batch_size=0), ConfigError, "must be at least 1, got 0 — batch_size"),
        (dict(batch_size="2"), ConfigError, "must be a whole number, got '2' — batch_size"),
        (dict(model=object()), ConfigError, "model must be a Llama, not a object — model"),
    ]  # fmt: skip
    for kwargs, error, message in bad:
        arguments = {"model": model, "tokenizer": tokenizer, "questions": [question], **kwargs}
        with pytest.raises(error, match=f"^{message}"):
            evaluate_task(**arguments)
    with torch.device("meta"):
        meta = FavoursA()
    with pytest.raises(ConfigError, match="^model is on the meta device"):
        evaluate_task(meta, tokenizer, [question])
    with pytest.raises(ConfigError, match="^model is on the meta device"):
        evaluate_perplexity(meta, None)  # before any data is read or built
    with pytest.raises(ConfigError, match="^must be at least 1, got 0 — batch_size — "):
        evaluate_perplexity(model, None, batch_size=0)  # named the command's --batch-size


def test_load_task_names_bad_lines(tmp_path: Path) -> None:
    task = tmp_path / "bad.jsonl"
    task.write_text('{"context": "c", "choices": ["a", "b"], "label": 0}\n{"context": "c", "choices": ["a"]}\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_task(task)
    task.write_text('{"context": "c", "choices": ["a", "b"], "label": 2}\n')
    with pytest.raises(DataError, match="label 2 is not one of the 2 choices — .*:1 — give the index .*, 0 to 1$"):
        load_task(task)
    task.write_text('{"context": "c", "choices": ["a"], "label": 0}\n')  # was "label 0 is not one of 1 choices"
    with pytest.raises(DataError, match="^the question has 1 choice: accuracy needs 2 or more — .*:1 — add the"):
        load_task(task)
    with pytest.raises(DataError, match="does not exist"):
        load_task(tmp_path / "missing.jsonl")
    (tmp_path / "t.yaml").write_text("task: t\n")
    for lm_eval_task in (tmp_path / "t.yaml", "hellaswag"):  # a JSON error; "task file does not exist"
        with pytest.raises(
            ConfigError, match=f"reads as an lm-eval task .* — --tasks {lm_eval_task} — run it with the"
        ):
            load_task(lm_eval_task)
    for fields, says in [  # each was scored, read as str() or int() of what it held
        ('"context": null, "choices": [" a", " b"], "label": 0', "context must be text, not null"),
        ('"context": "c", "choices": " a b", "label": 0', 'choices must be a list of texts, not " a b"'),
        ('"context": "c", "choices": [" a", 5], "label": 0', 'choices must be a list of texts, not [" a", 5]'),
        (
            '"context": "c", "choices": [" a", " b"], "label": 1.7',
            "label must be the index of the right choice, not 1.7",
        ),
        (
            '"context": "c", "choices": [" a", " b"], "label": true',
            "label must be the index of the right choice, not true",
        ),
    ]:
        task.write_text("{" + fields + "}\n")
        with pytest.raises(DataError, match=f"^{re.escape(says)} — {re.escape(str(task))}:1 — write it as "):
            load_task(task)
    task.write_text("\n  \n")  # said what and where, not what to do
    with pytest.raises(
        DataError, match=f"^the task file holds no questions — {re.escape(str(task))} — write one a line"
    ):
        load_task(task)
    task.write_bytes(b"\xa8\x00\x01")  # was a UnicodeDecodeError traceback
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xa8 at offset 0\) — --tasks .*bad.jsonl — "):
        load_task(task)


def test_a_task_file_may_start_with_a_byte_order_mark(tmp_path: Path) -> None:
    """Files saved by Windows editors start with a UTF-8 BOM: it failed the first line's JSON (as it would have
    started the first prompt of generate --prompt-file, read alike)."""
    task = tmp_path / "bom.jsonl"
    task.write_bytes(b'\xef\xbb\xbf{"context": "c", "choices": [" a", " b"], "label": 1}\r\n')
    assert [(q.context, q.choices, q.label) for q in load_task(task)] == [("c", [" a", " b"], 1)]


def test_a_task_line_holding_a_unicode_line_separator_is_one_question(tmp_path: Path) -> None:
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (``json.dumps(..., ensure_ascii=False)`` writes them
    so, and lm-eval's JSON loader reads the line whole): the file was split at them as at newlines, and a valid task
    refused as "Unterminated string" on a line number no editor shows."""
    task = tmp_path / "separators.jsonl"
    contexts = ["a\u2028b", "c\u2029d", "e\x85f"]
    lines = [json.dumps({"context": c, "choices": [" x", " y"], "label": 0}, ensure_ascii=False) for c in contexts]
    task.write_text("\n".join([*lines, '{"context": "g", "choices": [" x"], "label": 0}']) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=f"has 1 choice: .* — {re.escape(str(task))}:4 — "):  # the 4th line, as written
        load_task(task)
    task.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert [q.context for q in load_task(task)] == contexts


def test_two_task_files_of_one_name_are_refused_before_the_model_loads(tmp_path, capsys) -> None:
    """evaluate --tasks a/code.jsonl --tasks b/code.jsonl printed one `code` column: one task's results were lost."""
    line = json.dumps({"context": "c", "choices": ["a", "b"], "label": 0}) + "\n"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "code.jsonl").write_text(line)
    tasks = ["--tasks", str(tmp_path / "a" / "code.jsonl"), "--tasks", str(tmp_path / "b" / "code.jsonl")]
    assert evaluate_main(["--checkpoint", str(tmp_path / "missing.ckpt"), *tasks]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: two task files are named code (") and "— --tasks — rename one" in err, err


def test_lm_loss_softmax_runs_over_the_real_vocabulary() -> None:
    from epas_lightning import lm_loss, next_token_loss

    model = tiny_model(padded=576)  # 64 padded rows of random weights
    batch = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        logits = model(batch[:, :-1])
        expected = F.cross_entropy(logits[..., :VOCAB].flatten(0, 1), batch[:, 1:].flatten())
        assert next_token_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-6)
        assert lm_loss(logits, batch[:, 1:], VOCAB).item() == pytest.approx(expected.item(), rel=1e-6)
        assert lm_loss(logits, batch[:, 1:]).item() > expected.item()  # the padded rows take probability mass


def test_a_loss_past_what_exp_can_hold_has_an_infinite_perplexity_not_an_overflow_traceback() -> None:
    """A loss above ~709.8 nats (a far-off model: here its head scaled up) failed evaluate and bench in math.exp."""
    from epas_lightning.evaluation.perplexity import perplexity_of_batches

    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(5000)
    result = perplexity_of_batches(model, [torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))])
    assert result["loss"] > 710 and result["ppl"] == float("inf")


def test_evaluate_json_writes_an_infinite_perplexity_as_null(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    """--json wrote val_ppl Infinity (Python's json), which jq and JavaScript refuse: strict JSON has null for it."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(5000)
    save_consolidated(model, tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tiny_corpus), "--batches", "1", "--json"]
    assert evaluate_main(argv) == 0
    (row,) = strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["val_loss"] > 710 and row["val_ppl"] is None


def test_perplexity_equals_direct_cross_entropy(tiny_corpus: Path) -> None:
    from epas_lightning import TokenDataModule

    model = tiny_model(block_size=32, padded=576)
    result = evaluate_perplexity(model, tiny_corpus, batch_size=4, max_batches=3)
    data = TokenDataModule(str(tiny_corpus), seq_len=32, batch_size=4, vocab_size=VOCAB)
    data.setup("validate")
    losses = []
    with torch.no_grad():
        for i, batch in enumerate(data.val_dataloader()):
            if i == 3:
                break
            batch = batch.long()
            logits = model(batch[:, :-1])[..., :VOCAB]  # the softmax over the real vocabulary
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
    expected = (torch.stack(losses).sum() / result["tokens"]).item()
    assert result["tokens"] == 3 * 4 * 32 and result["sequences"] == 3 * 4
    assert result["loss"] == pytest.approx(expected, rel=1e-4)
    assert result["ppl"] == pytest.approx(torch.tensor(expected).exp().item(), rel=1e-4)


def test_perplexity_refuses_sequences_longer_than_the_context_before_reading_data(tmp_path: Path) -> None:
    model = tiny_model(n_layer=2, block_size=32)
    with pytest.raises(
        ConfigError, match="seq_len \\(64\\) exceeds the model's context length \\(32\\) — seq_len — use at most 32$"
    ):
        evaluate_perplexity(model, tmp_path / "missing", seq_len=64)  # checked before the (missing) data
    with pytest.raises(ConfigError, match="must be at least 1, got 0 — max_batches"):
        evaluate_perplexity(model, tmp_path / "missing", max_batches=0)  # was: "is the validation split empty?"
    with pytest.raises(ConfigError, match="must be at least 1, got 0 — seq_len"):
        evaluate_perplexity(model, tmp_path / "missing", seq_len=0)  # was taken for the default, the block size


def test_seq_len_errors_say_what_to_lower(tiny_corpus: Path, tmp_path: Path) -> None:
    """The block_size is named only when it is not the context length (an HF folder never trained at its context
    length); held-out data without one sequence names --seq-len (a split shorter than a batch is one batch)."""
    config = LlamaConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, block_size=32, max_position_embeddings=64)
    model = Llama(config).eval()
    with pytest.raises(ConfigError, match=r"context length \(64\) — seq_len — use at most 64 \(it trained at 32\)$"):
        evaluate_perplexity(model, tiny_corpus, seq_len=65)
    empty = without_heldout_sequences(tiny_corpus, tmp_path / "empty")
    with pytest.raises(DataError, match=r"no sequence of 65 tokens — .*empty/val — lower --seq-len"):
        evaluate_perplexity(model, empty, seq_len=64)


def test_evaluate_batches_with_tasks_scores_the_run_data_too(tmp_path: Path, tiny_corpus: Path, capsys) -> None:
    """--batches asks for the held-out loss: with --tasks it is still scored on the run's own data, not dropped.
    --tasks alone scores the tasks only, which it did without a word: a note says so and how to get the loss."""
    from epas_lightning.evaluation.evaluate_cli import evaluation_summary

    ckpt = save_consolidated(tiny_model(), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    record = json.loads((ckpt / "config.json").read_text())
    record["tokenizer"]["data_dir"] = str(tiny_corpus)  # as consolidate records the run's data
    (ckpt / "config.json").write_text(json.dumps(record))
    task = tmp_path / "code.jsonl"
    task.write_text(json.dumps({"context": "import", "choices": [" os", " the"], "label": 0}) + "\n")
    rows = evaluation_summary(ckpt, tasks=[task], batches=1, batch_size=2, device="cpu")["rows"]
    assert rows[0]["val_tokens"] == 2 * 32 and "code/acc" in rows[0]
    capsys.readouterr()
    tasks_alone = evaluation_summary(ckpt, tasks=[task], device="cpu")["rows"]  # no --batches: only the tasks
    assert "val_loss" not in tasks_alone[0]
    says = "evaluate: the tasks only, no held-out loss: give --batches B or --data DIR for one\n"
    assert capsys.readouterr().err == says
    bare = save_consolidated(tiny_model(), tmp_path / "bare", tiny_corpus / "tokenizer.json")  # records no data
    evaluation_summary(bare, tasks=[task], device="cpu")
    says = "evaluate: the tasks only, no held-out loss: give --data DIR for one (the checkpoint does not say which "
    assert capsys.readouterr().err.startswith(says)


def test_held_out_data_that_is_gone_is_named(tmp_path, tiny_corpus, capsys) -> None:
    """The run's data moved or deleted: evaluate and analyze said the checkpoint "does not say which data it trained
    on" (it does), and bench left out the held-out loss without a word (and, having said so, then showed the progress
    of a held-out loss it did not compute)."""
    ckpt = save_consolidated(tiny_model(n_layer=2), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    record = json.loads((ckpt / "config.json").read_text())
    record["tokenizer"]["data_dir"] = str(tmp_path / "gone")  # as consolidate records the run's data
    (ckpt / "config.json").write_text(json.dumps(record))
    gone = f"the data the checkpoint trained on is gone ({tmp_path / 'gone'})"
    for command in ("evaluate", "analyze", "bench"):
        output = [] if command == "evaluate" else ["--output", str(tmp_path / command)]
        reps = ["--reps", "1"] if command == "bench" else []  # bench still measures speed, and says what it lacks
        status = cli_main([command, "--checkpoint", str(ckpt), "--device", "cpu", *output, *reps])
        assert status == (0 if command == "bench" else 2)
        err = capsys.readouterr().err
        assert gone in err and "--data" in err, err
        assert "bench: held-out loss" not in err, err  # the progress of a loss not computed
    (tmp_path / "file").write_text("")  # a file where the val_dir was: it said "gone", of a path that is there
    record["tokenizer"]["data_dir"] = str(tiny_corpus)
    record["training"] = {"heldout": {"data_dirs": [str(tiny_corpus)], "val_dir": str(tmp_path / "file"), "seed": 42}}
    (ckpt / "config.json").write_text(json.dumps(record))
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"validated on ({tmp_path / 'file'}) is a file now, not the folder it was — --data / --tasks — give" in err


def test_a_recorded_val_dir_is_scored_when_the_training_folder_is_gone(tmp_path, tiny_corpus, capsys) -> None:
    """The run validated on a data.val_dir, which replaced its data folder's val split: with that folder gone (the
    val_dir still there), evaluate said the data was gone and asked for --data. It scores the val_dir, as fit did;
    one whose tokenizer is not the file fit found it prepared with (the checkpoint's hash) is refused, as fit did."""
    import shutil

    from helpers import record_tokenizer_of
    from tokenizers import Tokenizer

    from epas_lightning.data.tokenizer import file_sha256

    heldout = tmp_path / "heldout"
    heldout.mkdir()
    for name in ("train", "val"):
        (heldout / name).symlink_to(tiny_corpus / name)
    shutil.copy(tiny_corpus / "tokenizer.json", heldout / "tokenizer.json")
    record_tokenizer_of(heldout, tiny_corpus)
    ckpt = save_consolidated(tiny_model(n_layer=2), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    record = json.loads((ckpt / "config.json").read_text())
    record["tokenizer"] |= {"data_dir": str(tmp_path / "gone"), "sha256": file_sha256(tiny_corpus / "tokenizer.json")}
    record["training"] = {"heldout": {"data_dirs": [str(tmp_path / "gone")], "val_dir": str(heldout), "seed": 42}}
    (ckpt / "config.json").write_text(json.dumps(record))
    argv = ["evaluate", "--checkpoint", str(ckpt), "--batches", "1", "--device", "cpu", "--json"]
    assert cli_main(argv) == 0, capsys.readouterr().err
    own = json.loads(capsys.readouterr().out.splitlines()[-1])[0]["val_loss"]
    assert cli_main([*argv, "--data", str(heldout)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])[0]["val_loss"] == own
    Tokenizer.from_file(str(heldout / "tokenizer.json")).save(str(heldout / "tokenizer.json"), pretty=False)
    record_tokenizer_of(heldout, tiny_corpus)  # prepared again, with another file (of the same ids, here)
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: its tokenizer is not the file the checkpoint recorded ({ckpt / 'tokenizer.json'}, by its " in err
    assert err.endswith(f"— {heldout}, the held-out data the checkpoint's run validated on — pass --data with a "
                        "folder prepared with the model's tokenizer\n")  # fmt: skip


def test_held_out_data_of_another_vocabulary_than_the_model_is_one_line(tmp_path, tiny_corpus, capsys) -> None:
    """evaluate, bench and analyze scored a --data folder tokenized with another vocabulary (no larger than the
    model's) as if its ids were the model's tokens: numbers that mean nothing, without a word."""
    from helpers import record_tokenizer_of
    from tokenizers import Tokenizer

    from epas_lightning.data.tokenizer import same_token_ids, train_byte_level_bpe

    other = tmp_path / "other"  # the same streams, prepared (as far as anything can tell) with a 300-token BPE
    other.mkdir()
    for name in ("train", "val"):
        (other / name).symlink_to(tiny_corpus / name)
    train_byte_level_bpe(["def main():\n    return 0\n"] * 4, 300).save(str(other / "tokenizer.json"))
    record_tokenizer_of(other, tiny_corpus)
    ckpt = save_consolidated(tiny_model(n_layer=2), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    for command in ("evaluate", "bench", "analyze"):
        output = [] if command == "evaluate" else ["--output", str(tmp_path / command)]
        argv = [command, "--checkpoint", str(ckpt), "--data", str(other), "--batches", "1", "--device", "cpu"]
        assert cli_main([*argv, *output]) == 2
        err = capsys.readouterr().err.splitlines()[-1]  # analyze first says what it analyses
        assert err.startswith(f"error: prepared with another tokenizer ({other / 'tokenizer.json'}) than the model")
        assert err.endswith(f"— --data {other} — prepare it with --tokenizer {ckpt / 'tokenizer.json'}")  # only that:
    # "or leave --data unset for the checkpoint's own data" was said of checkpoints (HF folders) that record none
    record = json.loads((ckpt / "config.json").read_text())
    record["tokenizer"]["data_dir"] = str(tiny_corpus)  # one that records it
    (ckpt / "config.json").write_text(json.dumps(record))
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--data", str(other), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.endswith(", or leave --data unset for the checkpoint's own data\n")
    record["tokenizer"]["data_dir"] = str(other)  # its own data prepared again: --data unset reads it, and is refused
    (ckpt / "config.json").write_text(json.dumps(record))
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    fix = f"prepare it with --tokenizer {ckpt / 'tokenizer.json'}"
    assert capsys.readouterr().err.endswith(f"— --data {other} — {fix}\n")
    # the data.val_dir it validated on prepared again: refused as such (was: fit's "data.val_dir was tokenized
    # differently from data.data_dir ... prepare them with the same --tokenizer")
    record["training"] = {"heldout": {"data_dirs": [str(tiny_corpus)], "val_dir": str(other), "seed": 42}}
    (ckpt / "config.json").write_text(json.dumps(record))
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    fix = f"pass --data with a folder prepared with --tokenizer {ckpt / 'tokenizer.json'}"
    assert capsys.readouterr().err.endswith(f"— {other} — {fix}\n")
    # there, but no longer a stream (emptied, or hand-edited): it said to leave data.val_dir unset, as if to fit
    record["training"]["heldout"]["val_dir"] = str(tmp_path)
    (ckpt / "config.json").write_text(json.dumps(record))
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    recorded = f"data.val_dir {tmp_path}, the held-out data the checkpoint's run validated on"
    assert capsys.readouterr().err.endswith(
        f"— {recorded} — pass --data with a folder prepared with the model's tokenizer\n"
    )
    resaved = tmp_path / "resaved.json"  # one vocabulary in another file gives the ids the same tokens
    Tokenizer.from_file(str(tiny_corpus / "tokenizer.json")).save(str(resaved), pretty=False)
    assert same_token_ids(resaved, ckpt / "tokenizer.json")
    assert not same_token_ids(other / "tokenizer.json", ckpt / "tokenizer.json")


def test_held_out_token_ids_outside_the_vocabulary_are_one_line(tmp_path, tiny_corpus, capsys) -> None:
    """A held-out chunk corrupted in place (sizes and index still agreeing) passed every check: evaluate and bench
    died with an IndexError traceback in the embedding, and analyze named only "batch 1", not the data."""
    import shutil

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in ("train", "meta.json", "tokenizer.json"):
        (corrupt / name).symlink_to(tiny_corpus / name)
    shutil.copytree(tiny_corpus / "val", corrupt / "val")
    chunk = next((corrupt / "val").glob("*.bin"))
    tokens = bytearray(chunk.read_bytes())
    tokens[12 + 4 * 5 : 12 + 4 * 6] = (70_000).to_bytes(4, "little")  # after the 12-byte header: the 6th token
    chunk.write_bytes(bytes(tokens))
    ckpt = save_consolidated(tiny_model(n_layer=2), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    for command in ("evaluate", "bench", "analyze"):
        output = [] if command == "evaluate" else ["--output", str(tmp_path / command)]
        argv = [command, "--checkpoint", str(ckpt), "--data", str(corrupt), "--batches", "1", "--device", "cpu"]
        assert cli_main([*argv, *output]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"error: token ids must lie in 0..{VOCAB - 1} (the model's vocab_size), got 0..70000")
        assert f"— {corrupt} — the token stream is corrupt" in err
    record = json.loads((ckpt / "config.json").read_text())  # the data.val_dir the run validated on: the training
    record["training"] = {"heldout": {"data_dirs": [str(tiny_corpus)], "val_dir": str(corrupt), "seed": 42}}
    (ckpt / "config.json").write_text(json.dumps(record))  # folder was named, where the val_dir's chunk was corrupt
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    assert f"— {corrupt} — the token stream is corrupt" in capsys.readouterr().err
    chunk.write_bytes(bytes(tokens[:-4]))  # truncated: in the held-out data the checkpoint records, it said only
    record = json.loads((ckpt / "config.json").read_text())  # to pass --data, which does not mend it
    record["training"] = {"heldout": {"data_dirs": [str(corrupt)], "val_dir": None, "seed": 42}}
    (ckpt / "config.json").write_text(json.dumps(record))
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: corrupt or truncated chunk: ") and f"— {chunk}, the held-out data the " in err, err
    again = "— prepare the data again, or pass --data with another folder prepared with the model's tokenizer\n"
    assert err.endswith(again), err
    (corrupt / "val" / "index.json").unlink()  # a part of the folder removed since: it said only to pass --data
    assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: incomplete data directory: missing val/index.json — {corrupt}, the held-out "), err
    assert err.endswith(again), err
    for val_dir in (corrupt, corrupt / "val"):  # the data.val_dir it validated on, so: "neither a token stream ..."
        record["training"] = {"heldout": {"data_dirs": [str(tiny_corpus)], "val_dir": str(val_dir), "seed": 42}}
        (ckpt / "config.json").write_text(json.dumps(record))
        assert cli_main(["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: incomplete data directory: missing val/index.json — {corrupt}, the held"), err
        assert err.endswith(again), err


def test_evaluate_cli_sweeps_regions(tmp_path: Path, tiny_corpus: Path, capsys: pytest.CaptureFixture) -> None:
    model = tiny_model(shared=2)
    save_consolidated(model, tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    task = tmp_path / "code.jsonl"
    task.write_text(json.dumps({"context": "import", "choices": [" os", " the"], "label": 0}) + "\n")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--sharing-layers", "all", "--data", str(tiny_corpus)]
    assert evaluate_main([*argv, "--tasks", str(task), "--batches", "2", "--json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out.strip().splitlines()[-1])
    assert [row["sharing_layers"] for row in rows] == [0, 1, 2]
    assert [row["shared_layers"] for row in rows] == [[], [3], [3, 2]]  # in growth order
    assert {"val_loss", "val_ppl", "code/acc", "code/acc_norm"} <= set(rows[0])
    assert rows[0]["val_loss"] != rows[2]["val_loss"]  # the region changes the model
    assert "| sharing_layers |" in out
    too_many = ["--checkpoint", str(tmp_path / "ckpt"), "--sharing-layers", "3", "--data", str(tiny_corpus)]
    assert evaluate_main(too_many) == 2
    assert "trained with at most 2 sharing layers" in capsys.readouterr().err
    assert evaluate_main([*argv[:3], "3", "--force", "--data", str(tiny_corpus), "--batches", "1"]) == 0
    capsys.readouterr()
    empty = without_heldout_sequences(tiny_corpus, tmp_path / "empty")
    assert evaluate_main([*argv[:-1], str(empty)]) == 2  # a split without one sequence: one line
    assert "the validation split holds no sequence of 33 tokens" in capsys.readouterr().err
    save_consolidated(model, tmp_path / "bare")  # no data recorded: --batches asked for a loss, none came, no word
    bare = ["--checkpoint", str(tmp_path / "bare"), "--tokenizer", str(tiny_corpus / "tokenizer.json")]
    assert evaluate_main([*bare, "--tasks", str(task), "--batches", "2", "--json"]) == 0
    says = "evaluate: no held-out loss: the checkpoint does not say which data it trained on (pass --data for one)\n"
    assert capsys.readouterr().err.endswith(says)


def test_evaluate_output_writes_the_table_and_what_was_scored(tmp_path, tiny_corpus, capsys, monkeypatch) -> None:
    """evaluate printed its table only (and --json): --output writes it as bench, analyze and lm-eval write theirs, a
    folder built beside the target and renamed into place, replaced only with --overwrite and only if evaluate wrote
    it; a folder it may not write is refused before the weights load."""
    save_consolidated(tiny_model(shared=2), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    out = tmp_path / "scores"
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(tiny_corpus), "--batches", "1", "--output", str(out)]
    assert evaluate_main([*argv, "--sharing-layers", "all", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary = strict_json((out / "evaluate.json").read_text())
    assert summary["rows"] == printed and [row["sharing_layers"] for row in printed] == [0, 1, 2]
    assert summary["data"] == [str(tiny_corpus)] and summary["batches"] == 1 and summary["dtype"] == "float32"
    table = (out / "evaluate.csv").read_text().splitlines()
    assert table[0].startswith("sharing_layers,shared_layers,val_loss,val_ppl,val_tokens") and len(table) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "scores"]  # nothing hidden left beside it

    def read(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(checkpoint, "_load_weights", read)
    assert evaluate_main(argv) == 2
    assert "the output already exists" in capsys.readouterr().err
    mine = tmp_path / "mine"
    (mine / "notes.txt").parent.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert evaluate_main([*argv[:-1], str(mine), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--overwrite replaces only a folder epas_lightning wrote as its evaluate" in err
    assert evaluate_main([*argv[:-1], str(tmp_path / "ckpt" / "scores")]) == 2
    assert "the output lies inside the input" in capsys.readouterr().err
    monkeypatch.undo()
    assert evaluate_main([*argv, "--overwrite"]) == 0  # its own output, replaced
    assert len((out / "evaluate.csv").read_text().splitlines()) == 2 and (mine / "notes.txt").read_text() == "keep"


def test_evaluate_output_inside_what_it_reads_is_refused_before_the_weights_load(
    tmp_path, tiny_corpus, capsys, monkeypatch
) -> None:
    """evaluate --output refused only an output inside the checkpoint: one inside the --data folder (or a --tokenizer
    folder) it reads was built there, a folder of ours inside the user's prepared data (which ``prepare --overwrite``
    then deletes with it)."""
    import shutil

    save_consolidated(tiny_model(shared=2), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    data = shutil.copytree(tiny_corpus, tmp_path / "data")
    argv = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--batches", "1", "--device", "cpu"]

    def read(*args):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(checkpoint, "_load_weights", read)
    assert evaluate_main([*argv, "--output", str(data / "scores")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"the output lies inside the input {data.resolve()}" in err, err
    assert evaluate_main([*argv, "--tokenizer", str(data), "--output", str(data / "scores")]) == 2
    assert "the output lies inside the input" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == sorted(p.name for p in tiny_corpus.iterdir())


def test_evaluate_output_of_a_stock_export_records_the_region_its_weights_trained(tmp_path, tiny_corpus, capsys):
    """A stock export runs dense (its trained_region is empty) while its weights trained a region, which a forced
    sweep shares: bench's JSON records it as weights_trained_region, evaluate.json did not, leaving its rows past
    the empty region unexplained."""
    save_consolidated(tiny_model(shared=2), tmp_path / "ckpt", tiny_corpus / "tokenizer.json")
    export = ["export", "--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "hf"), "--sharing-layers"]
    assert cli_main([*export, "0"]) == 0
    out = tmp_path / "scores"
    argv = ["--checkpoint", str(tmp_path / "hf"), "--data", str(tiny_corpus), "--batches", "1", "--device", "cpu"]
    assert evaluate_main([*argv, "--sharing-layers", "2", "--force", "--output", str(out)]) == 0
    summary = strict_json((out / "evaluate.json").read_text())
    assert summary["trained_region"]["layers"] == [] and summary["rows"][0]["shared_layers"] == [3, 2]
    assert summary["weights_trained_region"] == {"layers": [3, 2], "order": "deep_first"}
    assert evaluate_main(["--checkpoint", str(tmp_path / "ckpt"), *argv[2:], "--output", str(tmp_path / "own")]) == 0
    assert strict_json((tmp_path / "own" / "evaluate.json").read_text())["weights_trained_region"] is None
