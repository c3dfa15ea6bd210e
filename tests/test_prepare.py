"""`prepare` on user corpora (text, JSONL, parquet; sentencepiece, HF, trained tokenizers), bad input, mixing,
resume through a Lightning checkpoint and two-rank reading. Tiny inputs in tmp dirs; no network."""

import codecs
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import cpu_trainer, run_ranks_at_once, write_token_stream
from lightning.pytorch.callbacks import ModelCheckpoint

from epas_lightning.cli import main as cli_main
from epas_lightning.data import TokenDataModule, load_tokenizer
from epas_lightning.data import prepare as prepare_module
from epas_lightning.data.layout import DataCheckError, load_meta
from epas_lightning.data.prepare import prepare_dataset as prepare
from epas_lightning.data.sources import DataPreparationError
from epas_lightning.errors import DataError, OutputError

WORDS = (
    *("the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as", "by", "at", "from", "data"),
    *("model", "token", "train", "layer", "share", "query", "key", "value", "attention", "résumé", "naïve", "東京"),
    *("→", "✓"),
)
SP_VOCAB = 320  # 256 byte-fallback pieces, 3 specials, the rest merges


def make_text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + " .\n"


def write_corpus(root: Path, seed: int = 0) -> dict[str, list[str]]:
    """Text files, JSONL, gzipped JSONL and parquet; returns the documents of each file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    docs: dict[str, list[str]] = {}
    (root / "notes").mkdir(parents=True)
    for i in range(6):
        docs[f"notes/n{i}.md"] = [make_text(rng, 150)]
        (root / f"notes/n{i}.md").write_text(docs[f"notes/n{i}.md"][0])
    docs["a.jsonl"] = [make_text(rng, 40) for _ in range(150)]
    (root / "a.jsonl").write_text(
        "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs["a.jsonl"]))
    )
    docs["b.jsonl.gz"] = [make_text(rng, 40) for _ in range(80)]
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs["b.jsonl.gz"])
    docs["c.parquet"] = [make_text(rng, 30) for _ in range(100)]
    pq.write_table(pa.table({"text": docs["c.parquet"]}), root / "c.parquet")
    (root / "notes" / "image.png").write_bytes(b"\x89PNG not a text file")  # unknown suffix: ignored
    return docs


def train_sentencepiece(path: Path, vocab_size: int = SP_VOCAB, **options) -> Path:
    import sentencepiece as spm

    rng = random.Random(1)
    text_file = path.with_suffix(".txt")
    text_file.write_text("".join(make_text(rng, 30) for _ in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(path.with_suffix("")),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
        **options,
    )
    return path.with_suffix(".model")


def train_hf_tokenizer(path: Path) -> Path:
    """A tiny word-level ``tokenizer.json`` with LLaMA-style ``<s>``/``</s>`` (like TinyLlama's file)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(
        [" ".join(WORDS) + " ."], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
    )
    tok.save(str(path))
    return path


def documents_of(stream_dir: Path, bos: int, eos: int) -> list[list[int]]:
    """The token stream cut back into its BOS ... EOS documents."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    dataset = StreamingDataset(str(stream_dir), item_loader=TokensLoader(block_size=1))
    tokens = torch.cat([dataset[i] for i in range(len(dataset))]).tolist()
    docs, current = [], None
    for t in tokens:
        if t == bos and current is None:
            current = []
        elif t == eos and current is not None:
            docs.append(current)
            current = None
        else:
            assert current is not None, "token outside a BOS ... EOS document"
            current.append(t)
    assert current is None
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


@pytest.fixture(scope="module")
def sp_data(corpus, sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "data"
    return prepare(corpus[0], out, sp_model, val_fraction=0.1, num_workers=2)


def tiny_dm(data_dir, **kwargs) -> TokenDataModule:
    kwargs = {"seq_len": 16, "batch_size": 4, "vocab_size": 512} | kwargs
    dm = TokenDataModule(data_dir=data_dir, **kwargs)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------------------------------
# Preparing
# ---------------------------------------------------------------------------------------------------------------------


def test_sentencepiece_corpus_holds_every_document_once_as_bos_eos(corpus, sp_data: Path, sp_model: Path):
    _, docs = corpus
    meta = json.loads((sp_data / "meta.json").read_text())
    assert sorted(p.name for p in sp_data.iterdir()) == [
        ".epas_output.json",
        "meta.json",
        "tokenizer.model",
        "train",
        "val",
    ]
    assert (meta["tokenizer_kind"], meta["vocab_size"], meta["bos_id"], meta["eos_id"]) == (
        "sentencepiece",
        SP_VOCAB,
        1,
        2,
    )
    all_docs = [d for texts in docs.values() for d in texts]
    assert meta["documents"] == len(all_docs) == sum(s["documents"] for s in meta["splits"].values())
    assert meta["bytes"] == sum(len(d.encode()) for d in all_docs)
    assert 0.03 < meta["splits"]["val"]["documents"] / meta["documents"] < 0.25
    assert meta["val_split"] == "text-hash"  # how: a folder prepared before has no such entry (by file or record key)
    tokenizer = load_tokenizer(sp_data / "tokenizer.model")
    decoded = {
        split: [tokenizer.decode(ids) for ids in documents_of(sp_data / split, 1, 2)] for split in ("train", "val")
    }
    assert sum(len(v) for v in decoded.values()) == meta["documents"]
    assert Counter(decoded["train"] + decoded["val"]) == Counter(d.rstrip("\n") for d in all_docs)  # sp drops "\n"
    assert meta["tokens"] == sum(len(ids) + 2 for ids in map(tokenizer.encode, all_docs))
    # text files are held out whole: a markdown note is in one split only
    assert not set(decoded["train"]) & set(decoded["val"])


def test_cli_with_hf_tokenizer_and_separate_val_input(corpus, tmp_path: Path, capsys: pytest.CaptureFixture):
    root, docs = corpus
    hf = train_hf_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')  # a chat model's
    (tmp_path / "config.json").write_text('{"model_type": "llama", "eos_token_id": [2, 5]}')  # its end tokens
    out = tmp_path / "hf"
    argv = ["prepare", "--input", str(root / "a.jsonl"), "--input", str(root / "c.parquet")]
    argv += ["--input", str(root / "notes" / "n0.md")]  # also a validation file: held out, not trained on
    os.link(root / "notes" / "n1.md", tmp_path / "n1.md")
    argv += ["--input", str(tmp_path / "n1.md")]  # a hard link to one: was trained on as well (a leak)
    argv += ["--val-input", str(root / "notes")]
    argv += ["--output", str(out), "--tokenizer", str(hf), "--no-progress", "--num-workers", "2", "--json"]
    assert cli_main(argv) == 0
    said = capsys.readouterr().out.splitlines()
    assert f"Prepared {out}: 256 documents (250 train / 6 val)" in said[-2]
    meta = json.loads((out / "meta.json").read_text())
    assert json.loads(said[-1]) == {"output": str(out), **meta}  # --json: the last line
    assert meta["val_split"] == "val-input"
    assert (meta["tokenizer"], meta["tokenizer_kind"]) == ("tokenizer.json", "hf")
    assert json.loads((out / "tokenizer_config.json").read_text()) == {"chat_template": "{{ messages }}"}  # kept
    tok = load_tokenizer(out / "tokenizer.json")
    assert tok.stop_ids == (tok.eos_id, 5)  # kept too, with the EOS documents end with first
    assert (meta["bos_id"], meta["eos_id"]) == (tok.backend.token_to_id("<s>"), tok.backend.token_to_id("</s>"))
    val_docs = [tok.decode(ids) for ids in documents_of(out / "val", meta["bos_id"], meta["eos_id"])]
    assert val_docs == [" ".join(docs[f"notes/n{i}.md"][0].split()) for i in range(6)]
    batch = next(iter(tiny_dm(str(out), vocab_size=meta["vocab_size"]).train_dataloader()))
    assert batch.shape == (4, 17) and batch.max() < meta["vocab_size"]


def test_the_tokenizer_file_in_an_input_folder_is_not_a_document(tmp_path: Path, caplog):
    """A model folder given as --input with its tokenizer.json as --tokenizer: the vocabulary (megabytes of JSON)
    was trained on as one more text document, without a word."""
    (tmp_path / "model").mkdir()
    hf = train_hf_tokenizer(tmp_path / "model" / "tokenizer.json")
    (tmp_path / "model" / "notes.txt").write_text("the model of the data")
    (tmp_path / "val.txt").write_text("the data of the model")
    with caplog.at_level("WARNING", logger="epas_lightning"):
        out = prepare(tmp_path / "model", tmp_path / "out", tmp_path / "model", val_input=tmp_path / "val.txt")
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["documents"] == 1
    assert f"Left out {hf}, the --tokenizer file, found among the inputs" in caplog.text


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--train-tokenizer", "--vocab-size", "100"], "at least 258 tokens (256 bytes, BOS, EOS), not 100 — --vocab"),
        (["--tokenizer", "t.json", "--vocab-size", "300"], "the --tokenizer given has its own — --vocab-size"),
        (["--tokenizer", "missing.json"], "tokenizer file does not exist — --tokenizer missing.json — check"),
        (["--train-tokenizer", "--vocab-size", "300", "--num-workers", "0"], "at least 1, got 0 — --num-workers"),
        (["--train-tokenizer", "--vocab-size", "300", "--num-workers", "-1"], "at least 1, got -1 — --num-workers"),
        (["--train-tokenizer", "--vocab-size", "300", "--val-fraction", "1"], "in (0, 1), got 1.0 — --val-fraction"),
        (  # it held out a text file all the same, or found the val split empty: "raise --val-fraction"
            ["--train-tokenizer", "--vocab-size", "300", "--val-fraction", "0"],
            "holds out no documents, but a dataset needs a val split (fit validates on it) — --val-fraction — give a",
        ),
        (["--train-tokenizer", "--vocab-size", "300", "--bos-token", ""], "empty token names none of the tokenizer's"),
        (  # the workers' TokenizerError traceback, naming the hidden build folder's tokenizer.json, after training
            ["--train-tokenizer", "--vocab-size", "300", "--eos-token", "</s>"],
            "a trained tokenizer's special tokens are <|bos|> and <|eos|>, not '</s>' — --eos-token — leave it out",
        ),
    ],
)
def test_flags_that_cannot_apply_are_refused_before_any_work(flags, says, tmp_path, capsys):
    argv = ["prepare", "--input", str(tmp_path), "--output", str(tmp_path / "out"), *flags]
    assert cli_main(argv) == 2
    assert says in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("vocab_size", [2**31 + 1, 10**20])
def test_a_vocabulary_too_large_for_the_token_streams_is_refused_before_any_work(vocab_size, tmp_path, capsys):
    """10**20 was the tokenizer trainer's OverflowError traceback; 3e9 aborted the process in its allocation."""
    (tmp_path / "a.txt").write_text("def main():\n    return 1\n" * 20)
    argv = ["prepare", "--input", str(tmp_path / "a.txt"), "--output", str(tmp_path / "out"), "--no-progress"]
    assert cli_main([*argv, "--train-tokenizer", "--vocab-size", str(vocab_size), "--val-fraction", "0.5"]) == 2
    says = f"error: the token streams hold ids as int32: at most {2**31} tokens, not {vocab_size} — --vocab-size — "
    assert capsys.readouterr().err.startswith(says) and not (tmp_path / "out").exists()


def test_a_tokenizer_file_this_user_may_not_read_is_one_line(tmp_path: Path, capsys, monkeypatch):
    """It was a PermissionError traceback: in prepare and export (--tokenizer), and wherever a checkpoint's recorded
    tokenizer is hashed (inspect, consolidate, export)."""
    from epas_lightning.data.tokenizer import TokenizerError, file_sha256

    tokenizer, opened = train_hf_tokenizer(tmp_path / "tokenizer.json"), Path.open

    def denied(self, *args, **kwargs):
        if self == tokenizer:
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", denied)
    says = "cannot read the tokenizer file (permission denied)"
    assert (
        cli_main(
            ["prepare", "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--tokenizer", str(tokenizer)]
        )
        == 2
    )
    assert capsys.readouterr().err == f"error: {says} — --tokenizer {tokenizer} — make it readable for this user\n"
    with pytest.raises(TokenizerError, match=rf"^{re.escape(says)} — {tokenizer} — make it readable"):
        file_sha256(tokenizer)


def test_a_document_larger_than_a_chunk_prints_no_litdata_warning(tmp_path: Path, sp_model: Path):
    """A document of more tokens than a chunk holds (a book) printed litdata's UserWarning, with its source line, from
    every worker that met one; the chunk just grows, as it should."""
    for i in range(2):
        (tmp_path / f"book{i}.txt").write_text(make_text(random.Random(i), 600))
    out = tmp_path.parent / f"{tmp_path.name}-out"
    script = "import sys; from epas_lightning.data import writing, prepare_dataset as p; writing.CHUNK_BYTES = '1kB'"
    argv = [sys.executable, "-c", f"{script}; p(*sys.argv[1:])", tmp_path, out, sp_model]
    run = subprocess.run(argv, capture_output=True)
    assert run.returncode == 0 and (out / "meta.json").is_file(), run.stderr.decode()
    assert "larger than the target chunk size" not in run.stderr.decode()


def test_trained_tokenizer_is_saved_next_to_the_data(corpus, tmp_path: Path):
    root, _ = corpus
    out = prepare(
        root / "notes", tmp_path / "bpe", train_tokenizer=True, vocab_size=300, num_workers=1, bos_token="<|eos|>"
    )
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["tokenizer_source"], meta["vocab_size"]) == ("tokenizer.json", "trained", 300)
    eos = meta["eos_id"]  # one token for both, as GPT-2's: meta.json said <|bos|>'s id, which no document starts with
    assert meta["bos_id"] == eos and documents_of(out / "val", eos, eos)
    assert meta["splits"]["val"]["documents"] >= 1  # one note at least, held out whole
    with pytest.raises(DataError, match=r"has 300 tokens but the model's vocab_size is 280"):
        tiny_dm(str(out), vocab_size=280)


def test_a_tokenizer_json_saved_with_truncation_and_padding_reads_whole_documents(tmp_path: Path):
    """transformers saves the truncation and padding a tokenizer last used into its tokenizer.json: every document was
    cut at that max_length and padded to that length in the prepared streams (and prompts, chats too), unsaid."""
    from tokenizers import Tokenizer

    from epas_lightning.serve.chat import control_token_encoder

    plain = load_tokenizer(train_hf_tokenizer(tmp_path / "plain.json"))
    saved = Tokenizer.from_file(str(plain.path))
    saved.enable_truncation(max_length=16)
    saved.enable_padding(length=20, pad_id=0, pad_token="<unk>")
    (tmp_path / "tok").mkdir()
    saved.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "in").mkdir()
    docs = [make_text(random.Random(i), 60) for i in range(6)]
    for i, doc in enumerate(docs):
        (tmp_path / "in" / f"d{i}.txt").write_text(doc)
    out = prepare(tmp_path / "in", tmp_path / "out", tmp_path / "tok", val_fraction=0.3, num_workers=1)
    streams = [documents_of(out / split, plain.bos_id, plain.eos_id) for split in ("train", "val")]
    assert sorted(ids for stream in streams for ids in stream) == sorted(map(plain.encode, docs))
    assert len(plain.encode(docs[0])) > 20
    tokenizer = load_tokenizer(out / "tokenizer.json")
    assert tokenizer.encode(docs[0]) == control_token_encoder(tokenizer)(docs[0]) == plain.encode(docs[0])


def test_special_token_text_in_a_document_is_text(tmp_path: Path, sp_model: Path):
    """A document quoting a tokenizer.json's special tokens ('<|eos|>') was cut there: the text became the EOS id in
    mid-document (sentencepiece always read it as text). Every kind reads it as text, as generate and serve do."""
    (tmp_path / "in").mkdir()
    docs = [make_text(random.Random(i), 60) for i in range(4)]
    docs[0] += "a <|eos|> b <|bos|>c</s><s> <|endoftext|>"
    for i, doc in enumerate(docs):
        (tmp_path / "in" / f"d{i}.txt").write_text(doc)
    out = prepare(tmp_path / "in", tmp_path / "bpe", train_tokenizer=True, vocab_size=300, val_fraction=0.3)
    tok = load_tokenizer(out / "tokenizer.json")
    streams = [documents_of(out / split, tok.bos_id, tok.eos_id) for split in ("train", "val")]
    assert sorted(tok.decode(ids) for stream in streams for ids in stream) == sorted(docs)
    for kind in (tok, load_tokenizer(sp_model)):
        assert not {kind.bos_id, kind.eos_id} & set(kind.encode(docs[0])), kind


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------


def test_linked_files_and_folders_are_read_once_and_link_loops_end(tmp_path: Path):
    from epas_lightning.data.sources import discover_files

    (tmp_path / "shards" / "a").mkdir(parents=True)
    (tmp_path / "shards" / "a" / "doc.txt").write_text("text")
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a").symlink_to(tmp_path / "shards" / "a")  # a corpus assembled from links
    (tmp_path / "corpus" / "b").symlink_to(tmp_path / "shards" / "a")  # the same folder again
    (tmp_path / "shards" / "a" / "loop").symlink_to(tmp_path / "shards")
    (tmp_path / "corpus" / "latest.txt").symlink_to(tmp_path / "shards" / "a" / "doc.txt")  # a linked file
    os.link(tmp_path / "shards" / "a" / "doc.txt", tmp_path / "corpus" / "linked.txt")  # a hard link: was read twice
    # each real file once: a linked file, a folder given twice, a file inside a folder given too
    inputs = [tmp_path / "corpus", tmp_path / "corpus", tmp_path / "shards" / "a" / "doc.txt"]
    assert [f.key for f in discover_files(inputs)] == ["latest.txt"]


def test_files_of_unknown_kind_in_a_folder_are_counted_in_one_warning(tmp_path: Path, caplog):
    """A folder's files of no known suffix (a compressed .txt.gz, images) were left out without a word, and a missing
    --val-input was called --input."""
    from epas_lightning.data.sources import discover_files

    for name in ("a.txt", "b.txt.gz", "c.txt.gz", "d.png", ".hidden.bin", "sub/e.md"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("x")
    with caplog.at_level("WARNING", logger="epas_lightning"):
        assert [f.key for f in discover_files([tmp_path])] == ["a.txt", "sub/e.md"]
    assert [r.getMessage() for r in caplog.records] == [
        f"Left out 3 files of no known kind under --input {tmp_path} (.gz: 2, .png: 1; e.g. {tmp_path / 'b.txt.gz'}): "
        "prepare reads text and code files, .jsonl[.gz|.zst], .json.gz|.zst, .ndjson and .parquet (a file given as "
        "an input is read as text whatever its suffix)"
    ]
    with pytest.raises(DataPreparationError, match="input does not exist — --val-input"):  # not --input
        discover_files([tmp_path / "gone"], split="val")


def test_folders_this_project_wrote_are_not_read_as_documents(tmp_path: Path, caplog):
    """A corpus folder holding an earlier prepare's output (or an export) had its tokenizer.json, meta.json and
    index.json files read as documents, without a word; such an output given as the input itself was read the same
    way, as was a folder inside one."""
    from epas_lightning.data.sources import discover_files
    from epas_lightning.outputs import write_marker

    corpus = tmp_path / "corpus"
    meta = json.dumps({"format_version": 1, "tokenizer_sha256": "0" * 64})
    for folder in ("export", "sub/old", "tok1"):
        for name in ("meta.json", "tokenizer.json", "train/index.json", "val/index.json"):
            (corpus / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (corpus / folder / name).write_text(meta)
    write_marker(corpus / "export", "hf-export")
    write_marker(corpus / "tok1", "dataset")  # sub/old: prepared before output folders carried a marker
    (corpus / "sub" / "a.txt").write_text("x")
    with caplog.at_level("WARNING", logger="epas_lightning"):
        assert [f.key for f in discover_files([corpus])] == ["sub/a.txt"]
    assert [r.getMessage() for r in caplog.records] == [
        f"Left out 3 folders under --input {corpus} that epas_lightning wrote (e.g. {corpus / 'export'}, its "
        "hf-export output): what it writes is not documents"
    ]
    fix = re.escape("give the corpus it was prepared from (its meta.json lists the inputs)")
    for given, says in (
        (corpus / "tok1", r"is an output of epas_lightning \(dataset\)"),
        (corpus / "sub" / "old", r"is an output of epas_lightning \(dataset\)"),
        (corpus / "tok1" / "val", rf"lies inside an output of epas_lightning \(dataset: {corpus / 'tok1'}\)"),
        (corpus / "tok1" / "meta.json", rf"lies inside an output of epas_lightning \(dataset: {corpus / 'tok1'}\)"),
        (corpus / "sub/old/train/index.json", rf"lies inside an output .*\(dataset: {corpus / 'sub' / 'old'}\)"),
    ):  # a file was read as a text document: only folders were looked at
        with pytest.raises(DataPreparationError, match=rf"^the input {says}, not documents — --val-input {given} — "):
            discover_files([given], split="val")
    with pytest.raises(DataPreparationError, match=rf" — --input {corpus / 'tok1'} — {fix}$"):
        discover_files([corpus / "tok1"])
    with pytest.raises(DataPreparationError, match=r"\(hf-export\), not documents — .* — give the documents"):
        discover_files([corpus / "export"])


def test_json_lines_named_json_are_said_to_be_read_as_one_text_document(tmp_path: Path, caplog):
    """Hugging Face ``datasets``' ``to_json`` writes JSON Lines named ``.json``: each file was read as one document of
    JSON syntax without a word. A JSON document (a config, even a one-line one) is not JSON Lines."""
    from epas_lightning.data.sources import discover_files

    records = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3))
    for name in ("train.json", "sub/test.json"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(records)
    (tmp_path / "package.json").write_text('{\n  "name": "x"\n}\n')
    (tmp_path / "one.json").write_text('{"name": "x"}\n')
    (tmp_path / "list.json").write_text("[1, 2]\n")
    rows = [{"text": f"document {i}"} for i in range(3)]
    (tmp_path / "records.json").write_text(json.dumps(rows, indent=2))  # pandas' to_json(orient="records"): was silent
    with caplog.at_level("WARNING", logger="epas_lightning"):
        assert len(discover_files([tmp_path, tmp_path / "one.json"])) == 6
    assert [r.getMessage() for r in caplog.records] == [
        f"2 .json files hold JSON Lines (e.g. {tmp_path / 'train.json'}), each read as one text document of JSON: "
        "name them .jsonl to read a document per line",
        f"1 .json file holds a JSON array of records (e.g. {tmp_path / 'records.json'}), each read as one text "
        "document of JSON: write the records as JSON Lines (one a line, named .jsonl) to read a document per record",
    ]


def test_broken_links_and_folders_that_cannot_be_listed_are_named(tmp_path: Path, caplog, monkeypatch):
    """A broken link and a folder prepare may not list were left out without a word; an input folder that cannot be
    listed was 'no input files found', a broken link or a pipe given as an input 'does not exist'."""
    from epas_lightning.data.sources import discover_files

    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "a.txt").write_text("x")
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere.txt")
    scandir = os.scandir

    def denied(path="."):  # root lists any folder: deny this one as a chmod would for a user
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    def unsearchable(path, *args, stat=os.stat, **kwargs):  # nor look into it: its meta.json cannot be looked up
        if os.path.dirname(os.fspath(path)).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", denied)
    monkeypatch.setattr(os, "stat", unsearchable)
    with caplog.at_level("WARNING", logger="epas_lightning"):
        assert [f.key for f in discover_files([tmp_path])] == ["b.txt"]
    assert [r.getMessage() for r in caplog.records] == [
        f"Left out 1 broken link under --input {tmp_path} (e.g. {tmp_path / 'gone.txt'}): check the links",
        f"Left out 1 folder under --input {tmp_path} that cannot be listed (e.g. {tmp_path / 'locked'}: Permission "
        "denied): check their permissions",
    ]
    locked = tmp_path / "locked"
    with pytest.raises(
        DataPreparationError, match=rf"cannot be listed \(Permission denied\) — --input {locked} — check"
    ):
        discover_files([locked])
    with pytest.raises(DataPreparationError, match=rf"input is a broken link — --val-input {tmp_path / 'gone.txt'}"):
        discover_files([tmp_path / "gone.txt"], split="val")
    os.mkfifo(pipe := tmp_path / "pipe")  # `--input <(zcat corpus.jsonl.gz)`: said 'input does not exist'
    with pytest.raises(
        DataPreparationError, match=rf"neither a file nor a folder \(a pipe\?\) — --input {pipe} — write"
    ):
        discover_files([pipe])


def test_no_input_at_all_is_refused_in_one_line_naming_the_flag(tmp_path: Path, capsys, monkeypatch):
    """`--input null` (null: no inputs) said 'input does not exist — --input null — check the path', as for a file
    named null; `input: []` in a config said 'no input files found — --input  —', naming nothing. A file named null
    is still an input."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("input: []\n")
    tail = ["--output", "out", "--train-tokenizer", "--vocab-size", "300"]
    for args, where in ((["--input", "null"], "--input null"), (["--config", "empty.yaml"], "--input")):
        assert cli_main(["prepare", *args, *tail]) == 2
        assert capsys.readouterr().err == (
            f"error: no input given — {where} — give one or more files or folders (text, JSONL or parquet)\n"
        )
    (tmp_path / "null").write_text("")
    assert cli_main(["prepare", "--input", "null", *tail]) == 2
    assert capsys.readouterr().err.startswith("error: the input files are all empty or whitespace — --input null")
    assert not (tmp_path / "out").exists()


def test_an_empty_input_path_is_no_input_not_the_current_folder(tmp_path: Path, capsys, monkeypatch):
    """`--input "$DATA"` with DATA unset (an empty path) read the current folder as the corpus, every file in it, and
    prepared it without a word; `--val-input ""` held the current folder out. An empty path flag is refused in one line
    (every command's), and ``discover_files`` takes an empty input as none."""
    from epas_lightning.data.sources import discover_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a document of the current folder\n")
    (tmp_path / "corpus.txt").write_text("the corpus\n\nmeant to be read\n")
    out = str(tmp_path.parent / f"{tmp_path.name}-out")
    tail = ["--train-tokenizer", "--vocab-size", "300"]
    for args, where in (
        (["--input", "", "--output", out], "--input ''"),
        (["--input", "corpus.txt", "--val-input= ", "--output", out], "--val-input ' '"),
        (["--input", "corpus.txt", "--output="], "--output ''"),
    ):
        assert cli_main(["prepare", *args, *tail]) == 2
        flag = where.split()[0]
        assert (
            capsys.readouterr().err
            == f"error: {flag} is given an empty path — {where} — give a path (is a variable unset?)\n"
        )
    assert not Path(out).exists()
    with pytest.raises(DataPreparationError, match="^no input given — --input '' — give one or more files"):
        discover_files([""])


def test_an_empty_path_in_a_config_is_refused_as_on_the_command_line(tmp_path: Path, capsys, monkeypatch):
    """A config's ``input: [""]`` (a template whose variable was unset) was the current folder: prepare took every file
    there, the config too, as the corpus without a word; ``tokenizer: ""`` was read as the folder ``.``. The argv scan
    of empty path flags does not see a config's values: they are refused in the same one line, naming the config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("a document of the current folder\n")
    out = str(tmp_path.parent / f"{tmp_path.name}-out")
    for lines, key in (
        (["input: ['']", f"output: {out}"], "input"),
        (["input: [notes.txt, ' ']", f"output: {out}"], "input"),
        (["input: [notes.txt]", "output: ''"], "output"),
        (["input: [notes.txt]", f"output: {out}", "tokenizer: ''"], "tokenizer"),
    ):
        (tmp_path / "prepare.yaml").write_text("\n".join([*lines, "train_tokenizer: true", "vocab_size: 300"]) + "\n")
        assert cli_main(["prepare", "--config", "prepare.yaml"]) == 2
        assert capsys.readouterr().err == (
            f"error: {key} is given an empty path — --config prepare.yaml — give a path (is a variable unset?)\n"
        )
    assert not Path(out).exists()


def test_compressed_json_shards_are_json_lines(tmp_path: Path):
    """C4 and Dolma ship JSON Lines as .json.gz: in a folder they were left out, named alone read as one binary text."""
    from epas_lightning.data.sources import discover_files, iter_documents

    with gzip.open(tmp_path / "c4-train.00000-of-01024.json.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in "ab")
    for inputs in ([tmp_path], [next(tmp_path.iterdir())]):
        assert [text for f in discover_files(inputs) for _, text in iter_documents(f, "text", print)] == ["a", "b"]
    (tmp_path / "c4-train.00000-of-01024.json.gz").rename(tmp_path / "SHARD.JSON.GZ")  # was read undecompressed
    assert [text for f in discover_files([tmp_path]) for _, text in iter_documents(f, "text", print)] == ["a", "b"]


def test_zstd_json_lines_are_read(tmp_path: Path):
    """Every .jsonl.zst file was skipped as 'unreadable (UnsupportedOperation: )': zstandard's reader has no lines. A
    corrupt one is unreadable too. One written with zstd's largest window (`zstd --long=31`, or piped in) was skipped
    as 'Frame requires too much memory for decoding'."""
    zstandard = pytest.importorskip("zstandard")
    from epas_lightning.data.sources import discover_files, iter_documents

    with zstandard.open(tmp_path / "slimpajama.jsonl.zst", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in "ab")
    long_window = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(window_log=31))
    with long_window.stream_writer((tmp_path / "the-stack.jsonl.zst").open("wb")) as f:
        f.write((json.dumps({"text": "c"}) + "\n").encode())
    (tmp_path / "corrupt.jsonl.zst").write_bytes(b"not zstd data")  # its error was a traceback, not a bad file
    bad = []
    texts = [text for f in discover_files([tmp_path]) for _, text in iter_documents(f, "text", bad.append)]
    assert sorted(texts) == ["a", "b", "c"]
    assert [b.where for b in bad] == [str(tmp_path / "corrupt.jsonl.zst")] and "unreadable (ZstdError" in bad[0].reason


def test_a_compressed_file_cut_short_keeps_its_first_lines_and_says_so(tmp_path: Path):
    """A .gz cut short (a download stopped) was reported as skipped, 'unreadable', though its first lines were kept; a
    .zst cut short lost the rest of its lines without a word. Both name the line they break off at, and say that the
    lines before it were kept; so does a parquet file unreadable from a row on."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    zstandard = pytest.importorskip("zstandard")
    from epas_lightning.data.sources import discover_files, iter_documents

    lines = [json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)]
    gz = gzip.compress("".join(lines).encode())
    (tmp_path / "a.jsonl.gz").write_bytes(gz[: len(gz) // 2])
    frames = [zstandard.ZstdCompressor().compress("".join(part).encode()) for part in (lines[:50], lines[50:])]
    (tmp_path / "b.jsonl.zst").write_bytes(frames[0] + frames[1][: len(frames[1]) // 2])  # cut in its second frame
    for f in discover_files([tmp_path]):
        bad = []
        docs = [text for _, text in iter_documents(f, "text", bad.append)]
        assert 0 < len(docs) < len(lines) and docs == [f"doc {i}" for i in range(len(docs))]
        assert [b.where for b in bad] == [f"{f.path}:{len(docs) + 1}"]
        assert "unreadable from this line on (EOFError" in bad[0].reason
        assert bad[0].reason.endswith("the lines before it were kept, the rest lost")
    assert len(docs) == 50  # the .zst: its first frame
    parquet = tmp_path / "rows" / "c.parquet"
    parquet.parent.mkdir()
    pq.write_table(pa.table({"text": [f"doc {i}" for i in range(6000)]}), parquet, row_group_size=3000)
    column = pq.read_metadata(parquet).row_group(1).column(0)
    with parquet.open("r+b") as out:  # the second row group's data overwritten
        out.seek(column.dictionary_page_offset or column.data_page_offset)
        out.write(b"\xff" * column.total_compressed_size)
    bad = []
    docs = [text for f in discover_files([parquet]) for _, text in iter_documents(f, "text", bad.append)]
    assert 0 < len(docs) < 6000 and [b.where for b in bad] == [f"{parquet} row {len(docs) + 1}"]
    assert bad[0].reason.startswith("unreadable parquet from this row on") and "before it were kept" in bad[0].reason


def test_a_document_too_large_to_tokenize_at_once_is_a_bad_document(tmp_path: Path, monkeypatch):
    """A text file without its documents split (1 GB with no newline), or a 300 MB JSON line, was read and tokenized
    whole: a worker took many times its size in memory until the machine killed it (10 MB took 2.2 GB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from epas_lightning.data import sources

    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 100, raising=False)
    (tmp_path / "corpus.txt").write_text("w " * 60)
    (tmp_path / "note.txt").write_text("note")
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a", "w " * 60, "b")))
    pq.write_table(pa.table({"text": ["c", "w " * 60]}), tmp_path / "rows.parquet")
    bad = []
    files = sources.discover_files([tmp_path])
    assert [text for f in files for _, text in sources.iter_documents(f, "text", bad.append)] == ["note", "a", "b", "c"]
    assert [b.where for b in bad] == [
        f"{tmp_path}/corpus.txt",
        f"{tmp_path}/rows.jsonl:2",
        f"{tmp_path}/rows.parquet row 2",
    ]
    assert all("a document may be" in b.reason and "split it" in b.reason for b in bad)


def test_json_lines_with_cr_line_endings_are_said_to_be(tmp_path: Path, monkeypatch):
    """A JSONL file with old-Mac line endings (CR, no LF) was one line: 'not a UTF-8 JSON line (Extra data ...)',
    past 16 MiB 'split it into documents', or, held out whole by its one key, 'the val split has no documents'."""
    from epas_lightning.data import sources

    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 100)
    records = [json.dumps({"text": t}) for t in "abc"]
    (tmp_path / "crlf.jsonl").write_bytes(("\r\n".join(records) + "\r\n").encode())  # Windows': lines as ever
    (tmp_path / "long.jsonl").write_bytes(("\r".join(records * 3) + "\r").encode())  # over MAX_DOCUMENT_BYTES
    (tmp_path / "other.jsonl").write_bytes(b'{"text": \r"x"\n')  # a CR in a bad line that ends no record
    (tmp_path / "short.jsonl").write_bytes(("\r" + "\r".join(records)).encode())
    bad = []
    files = sources.discover_files([tmp_path])
    assert [text for f in files for _, text in sources.iter_documents(f, "text", bad.append)] == ["a", "b", "c"]
    assert [(b.where, b.reason.split(" (")[0]) for b in bad] == [
        (f"{tmp_path / 'long.jsonl'}:1", "JSON Lines with CR line endings"),
        (f"{tmp_path / 'other.jsonl'}:1", "not a UTF-8 JSON line"),
        (f"{tmp_path / 'short.jsonl'}:1", "JSON Lines with CR line endings"),
    ]
    assert "convert them to LF" in bad[0].reason and "split it" not in bad[0].reason
    says = "JSON Lines with CR line endings (old Mac), no LF: its records run together into one line — "
    with pytest.raises(DataPreparationError, match=f"^{re.escape(says)}.*short.jsonl — convert them to LF "):
        prepare(tmp_path / "short.jsonl", tmp_path / "out", train_tokenizer=True, vocab_size=300, num_workers=1)


def test_a_large_file_cut_into_parts_reads_as_the_whole_file(tmp_path: Path, monkeypatch):
    """A large JSONL file is cut into parts at line starts (parquet at row groups) for several workers to read. Cut
    anywhere (with a BOM, blank lines, a line too long, bad records, no last newline), the parts give the file's
    documents in order, under the keys the split hashes, and its bad records under the same names."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from epas_lightning.data import parts, sources

    monkeypatch.setattr(sources, "MAX_DOCUMENT_BYTES", 40)
    monkeypatch.setattr(parts, "_COUNT_BYTES", 7)  # line starts found across the blocks read
    lines = [json.dumps({"text": "a"}), "", json.dumps({"text": "b" * 40}), "{not json", json.dumps({"text": None})]
    (tmp_path / "a.jsonl").write_text("\ufeff" + "\n".join([*lines, json.dumps({"text": "c"}), " ", '{"text": "d"}']))
    pq.write_table(pa.table({"text": ["e", None, "f", "g", "h"]}), tmp_path / "b.parquet", row_group_size=2)

    def read(files: list) -> tuple[list, list]:
        bad = []
        docs = [doc for f in files for doc in sources.iter_documents(f, "text", lambda b: bad.append((b.where, b.key)))]
        return docs, bad

    jsonl, parquet = sources.discover_files([tmp_path])
    assert read([jsonl]) == (
        [("a.jsonl#1", "a"), ("a.jsonl#6", "c"), ("a.jsonl#8", "d")],
        [(f"{jsonl.path}:{n}", f"a.jsonl#{n}") for n in (3, 4, 5)],
    )
    assert read([parquet]) == (
        [("b.parquet#1", "e"), ("b.parquet#3", "f"), ("b.parquet#4", "g"), ("b.parquet#5", "h")],
        [(f"{parquet.path} row 2", "b.parquet#2")],
    )
    for f, most in ((jsonl, 8), (parquet, 3)):
        counts = set()
        for part_bytes in range(1, f.n_bytes + 1, max(1, f.n_bytes // 60)):
            cut = parts.cut_into_parts([f], part_bytes)
            assert read(cut) == read([f]), part_bytes
            assert f.kind == "parquet" or sum(p.n_bytes for p in cut) == f.n_bytes
            counts.add(len(cut))
        assert min(counts) == 1 and max(counts) == most  # every line, every row group, a part of its own
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"text": "x"}\n' * 100))
    assert parts.cut_into_parts(sources.discover_files([gz]), 1) == sources.discover_files([gz])  # cannot be entered


def test_one_large_file_is_tokenized_by_every_worker(sp_model: Path, tmp_path: Path, monkeypatch, caplog):
    """A corpus in one large JSONL file was one work item, tokenized by one worker however many there were. Its parts
    are shared among them, and the dataset is the same: the same documents in the same order, the same held out,
    the same bad record named once."""
    from epas_lightning.data import writing

    rng = random.Random(6)
    records = [json.dumps({"text": make_text(rng, 20)}) for _ in range(300)]
    records[100] = '{"text": null}'
    (tmp_path / "corpus.jsonl").write_text("\n".join(records) + "\n")
    outs = {}
    for name, min_part_bytes in (("whole", 2**40), ("parts", 1)):
        monkeypatch.setattr(writing, "_MIN_PART_BYTES", min_part_bytes)
        with caplog.at_level("WARNING", logger="epas_lightning"):
            outs[name] = prepare(tmp_path / "corpus.jsonl", tmp_path / name, sp_model, val_fraction=0.1, num_workers=2)
    writers = {name: {p.name.split("-")[1] for p in (out / "train").glob("chunk-*.bin")} for name, out in outs.items()}
    assert writers == {"whole": {"0"}, "parts": {"0", "1"}}  # the chunks each worker wrote
    for split in ("train", "val"):
        assert documents_of(outs["whole"] / split, 1, 2) == documents_of(outs["parts"] / split, 1, 2)
    whole, cut = (json.loads((out / "meta.json").read_text()) for out in outs.values())
    assert (cut["splits"], cut["skipped"]) == (whole["splits"], whole["skipped"])
    assert 10 < cut["splits"]["val"]["documents"] < 60 and cut["splits"]["train"]["files"] == 1
    assert caplog.text.count(f"Skipped {tmp_path / 'corpus.jsonl'}:101: 'text' is null") == 2  # once each run


@pytest.mark.parametrize(
    ("change", "on_bad", "says"),
    [
        ("append", "skip", r"it grew from 6,000 to 6,020 bytes"),
        ("cut", "fail", r"it was cut from 6,000 to 3,030 bytes"),  # mid-line: not a bad record to fail on
        ("rewrite", "skip", r"it was written to, or replaced"),
        ("replace", "skip", r"it was written to, or replaced"),
        ("remove", "fail", r"it is gone"),  # not an unreadable file to fail on
    ],
)
def test_an_input_file_that_changes_while_it_is_prepared_fails_the_build_naming_it(
    change, on_bad, says, sp_model: Path, tmp_path: Path, monkeypatch
):
    """A large JSONL file is cut into parts by its bytes when it is found, and read once for each split: one written
    to meanwhile (a download, a job still writing it) came out with records lost, doubled or of two versions, with at
    most a bad record or two named, in a dataset called complete. Now the build fails, naming the file and how it
    changed, also where the change made a bad record that --on-bad fail stops at."""
    from epas_lightning.data import writing

    corpus = tmp_path / "corpus.jsonl"
    records = "".join(json.dumps({"text": f"{i:04d} " * 9 + "xx"}) + "\n" for i in range(100))  # 60 bytes
    corpus.write_text(records)
    cut = prepare_module.cut_into_parts

    def cut_then_change(files, part_bytes):
        parts = cut(files, part_bytes)
        assert len(parts) > 1
        time.sleep(0.02)  # the clock of file times moves on (a tick of the kernel's)
        if change == "append":
            with corpus.open("a") as f:
                f.write(json.dumps({"text": "new one"}) + "\n")
        elif change in ("cut", "rewrite"):
            corpus.write_text(records[:3030] if change == "cut" else records.replace("0001", "1000"))
        elif change == "replace":
            (tmp_path / "new.jsonl").write_text(records)
            os.replace(tmp_path / "new.jsonl", corpus)
        else:
            corpus.unlink()
        return parts

    monkeypatch.setattr(prepare_module, "cut_into_parts", cut_then_change)
    monkeypatch.setattr(writing, "_MIN_PART_BYTES", 1000)
    with pytest.raises(DataPreparationError, match=f"input file changed while it was prepared \\({says}\\)") as raised:
        prepare(corpus, tmp_path / "out", sp_model, val_fraction=0.1, on_bad=on_bad, num_workers=1)
    assert raised.value.where == str(corpus)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("end", ["SIGKILL", "exit 0", "SIGSEGV"])
def test_a_worker_ending_midway_fails_the_build_and_ends_its_helpers(end, sp_model: Path, tmp_path, monkeypatch, capfd):
    """A tokenizing worker killed outright (the OOM killer) was taken by litdata for a worker that had finished: the
    dataset came out without its share, called complete, and its helper processes waited for work for good. Now the
    build fails in one line (the output is not written) and the helpers end with it."""
    import multiprocessing

    from epas_lightning.data import writing

    rng = random.Random(3)
    (tmp_path / "in").mkdir()
    for i in range(8):
        (tmp_path / "in" / f"f{i}.txt").write_text(make_text(rng, 50))
    helpers = tmp_path / "helpers.txt"
    tokenize = writing.tokenize_work_item

    def ending(item):
        if any(f.path.endswith("f5.txt") for f in item.files):
            helpers.write_text(" ".join(str(p.pid) for p in multiprocessing.active_children()))
            if end == "SIGKILL":
                os.kill(os.getpid(), 9)
            if end == "SIGSEGV":
                import ctypes

                ctypes.string_at(0)  # a native library's crash: the worker's stack is printed
            os._exit(0)
        yield from tokenize(item)

    monkeypatch.setattr(writing, "tokenize_work_item", ending)
    said = f"was killed by {end}" if end.startswith("SIG") else "ended"
    with pytest.raises(DataPreparationError, match=f"worker process {said} before it finished its share of the train"):
        prepare(tmp_path / "in", tmp_path / "out", sp_model, val_fraction=0.001, num_workers=2)
    assert ("in ending" in capfd.readouterr().err) == (end == "SIGSEGV")
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["helpers.txt", "in"]
    pids = [int(pid) for pid in helpers.read_text().split()]
    assert pids  # litdata's helpers of the worker, forked before its first item
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in pids if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive


def test_preparation_workers_encode_without_starting_threads(sp_model: Path, tmp_path: Path, monkeypatch):
    """Workers are forked from a process that may run threads, where starting threads is unsafe; sentencepiece started
    a pool of them for each batch (a worker once aborted in CI with ``std::system_error``, cause unproven). Each worker
    encodes in its own thread, as HF ``tokenizers`` is told to by ``TOKENIZERS_PARALLELISM``."""
    import sentencepiece

    encode, parent = sentencepiece.SentencePieceProcessor.encode, os.getpid()

    def one_at_a_time(self, input, *args, **kwargs):
        assert os.getpid() == parent or not isinstance(input, list), "a batch: encoded on new threads"
        return encode(self, input, *args, **kwargs)

    monkeypatch.setattr(sentencepiece.SentencePieceProcessor, "encode", one_at_a_time)
    (tmp_path / "in").mkdir()
    for i in range(4):
        (tmp_path / "in" / f"f{i}.txt").write_text(make_text(random.Random(i), 30))
    out = prepare(tmp_path / "in", tmp_path / "out", sp_model, val_fraction=0.3, num_workers=2)
    assert json.loads((out / "meta.json").read_text())["documents"] == 4


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an orphan's end is reaped by init, or not at all in a
    container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_text_files_of_one_name_under_two_inputs_are_not_all_held_out(tmp_path: Path):
    """The split hashes a file's name under its input: two inputs' doc.txt were both held out, leaving no training."""
    from epas_lightning.data.sources import discover_files, plan_split

    for shard in ("a", "b"):
        (tmp_path / shard).mkdir()
        (tmp_path / shard / "doc.txt").write_text(shard)
    files = plan_split(discover_files([tmp_path / "a" / "doc.txt", tmp_path / "b" / "doc.txt"]), 0.01)
    assert sorted(f.split for f in files) == ["train", "val"]


def test_an_empty_text_file_is_never_the_one_held_out(tmp_path: Path):
    """A package's empty __init__.py, held out by its hash, left the val split without a document: prepare failed
    ('raise --val-fraction'). The empty text hashes lowest here."""
    from epas_lightning.data.sources import discover_files, plan_split

    for package, code in (("a", "x = 6\n"), ("b", "x = 15\n"), ("data", "x = 44\n")):  # each hashes above ""
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "m1.py").write_text(code)
    files = plan_split(discover_files([tmp_path]), 0.01)
    assert [f.n_bytes > 0 for f in files if f.split == "val"] == [True]


def test_a_file_name_that_is_not_utf8_is_split_like_any_other(tmp_path: Path):
    """A Latin-1 file name (its bytes kept as surrogates) broke the split's hash: 'surrogates not allowed — hold out a
    smaller fraction'."""
    from epas_lightning.data.sources import discover_files, plan_split

    for name in (os.fsdecode(b"caf\xe9.txt"), "b.txt"):
        (tmp_path / name).write_text(f"text of {name!r}")
    assert sorted(f.split for f in plan_split(discover_files([tmp_path]), 0.01)) == ["train", "val"]


def _sides(files: list, val_fraction: float, bad: list | None = None) -> dict[str, set[str]]:
    """The splits each text of ``files`` (planned or not) is read in, through the split's own reading."""
    from epas_lightning.data.sources import split_documents

    sides: dict[str, set[str]] = {}
    for split in ("val", "train"):
        for text in split_documents(files, split, val_fraction, "text", (bad if bad is not None else []).append):
            sides.setdefault(text, set()).add(split)
    return sides


def test_copies_of_a_record_are_held_out_together_or_not_at_all(tmp_path: Path):
    """Records were held out by the hash of ``file#line``: a text twice in a crawl, or one shard concatenated into two,
    was trained on and validated on too (an optimistic val/loss). Each is now split by its text, in JSONL and
    parquet alike; bad records are still said once over the two splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from epas_lightning.data.sources import discover_files, plan_split

    texts = [f"doc {i}" for i in range(60)]
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts * 2)] + ['{"text": null}', "{not json"]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
    pq.write_table(pa.table({"text": texts[::-1]}), tmp_path / "c.parquet")
    bad = []
    sides = _sides(plan_split(discover_files([tmp_path]), 0.3), 0.3, bad)
    assert set(sides) == set(texts) and all(len(side) == 1 for side in sides.values())
    assert 5 < sum(side == {"val"} for side in sides.values()) < 35
    assert sorted(b.where.rsplit(":", 1)[1] for b in bad) == ["121", "122"]  # once each


def test_copies_of_a_text_file_under_two_paths_are_held_out_together(tmp_path: Path):
    """Text files were held out by the hash of their path: a vendored copy of a file (or one saved with a byte order
    mark) was trained on while the other was validated on. A file, or a record that holds its text, goes with it,
    also the one held out because no other hashed below the fraction."""
    from epas_lightning.data.sources import discover_files, plan_split

    for folder in ("src", "vendor/lib"):
        (tmp_path / folder).mkdir(parents=True)
        for i in range(12):
            (tmp_path / folder / f"m{i}.py").write_text(f"x = {i}\n")
    (tmp_path / "vendor" / "bom.py").write_bytes("\ufeffx = 3\n".encode())
    files = plan_split(discover_files([tmp_path]), 0.5)
    sides = {}
    for f in files:
        sides.setdefault(Path(f.path).read_text(encoding="utf-8-sig"), set()).add(f.split)
    assert len(sides) == 12 and all(len(side) == 1 for side in sides.values())
    assert {"train", "val"} == set().union(*sides.values())
    (tmp_path / "vendor" / "copies.jsonl").write_text(
        "".join(json.dumps({"text": f"x = {i}\n"}) + "\n" for i in range(12))
    )
    files = plan_split(discover_files([tmp_path]), 0.01)  # none below it: the lowest one is held out, and its copies
    assert len({f.path for f in files if f.split == "val"}) == 2
    assert _sides(files, 0.01) == {f"x = {i}\n": {"train"} for i in range(12)} | {
        Path(next(f.path for f in files if f.split == "val")).read_text(): {"val"}
    }


def test_a_shard_given_twice_is_validated_on_apart_from_what_is_trained_on(tmp_path: Path, sp_model: Path):
    """One JSONL shard saved under two names: nearly every held-out record was trained on too. The dataset now holds
    each copy on the side of its text, and its counts are the documents written."""
    rng = random.Random(7)
    lines = "".join(json.dumps({"text": make_text(rng, 12)}) + "\n" for _ in range(120))
    for name in ("a.jsonl", "mirror/a.jsonl"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(lines)
    out = prepare(tmp_path, tmp_path.parent / f"{tmp_path.name}-out", sp_model, val_fraction=0.2, num_workers=1)
    meta = json.loads((out / "meta.json").read_text())
    val, train = (Counter(map(tuple, documents_of(out / split, 1, 2))) for split in ("val", "train"))
    assert val and not set(val) & set(train) and all(n % 2 == 0 for n in (val | train).values())
    assert (meta["splits"]["val"]["documents"], meta["documents"]) == (val.total(), 240)


def test_copies_of_val_input_documents_are_not_trained_on(tmp_path: Path, sp_model: Path, caplog, capsys):
    """--val-input held out only the files that are --input files too (a link to one as well): a shard copied as the
    validation file, or a record found in both, was trained on and validated on, and the validation loss flattered
    the model. Such copies are left out of training (and of a trained tokenizer's texts), and said to be."""
    rng = random.Random(3)
    shards = [[make_text(rng, 12) for _ in range(20)] for _ in range(3)]
    (tmp_path / "in").mkdir()
    for i, shard in enumerate(shards):
        (tmp_path / "in" / f"s{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in shard))
    (tmp_path / "val").mkdir()
    shutil.copy(tmp_path / "in" / "s0.jsonl", tmp_path / "val" / "s0.jsonl")  # a copy, not a link
    (tmp_path / "val" / "more.txt").write_text(shards[1][5])  # one record's text, as a text file
    out = tmp_path / "out"
    argv = ["prepare", "--input", str(tmp_path / "in"), "--val-input", str(tmp_path / "val"), "--output", str(out)]
    assert cli_main([*argv, "--tokenizer", str(sp_model), "--num-workers", "2", "--no-progress"]) == 0
    tokenizer = load_tokenizer(sp_model)
    train, val = ({tuple(d) for d in documents_of(out / split, 1, 2)} for split in ("train", "val"))
    assert len(val) == 21 and not train & val and len(train) == 39
    meta = load_meta(out)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["train"]["copies_of_val"]) == (39, 21)
    assert train == {tuple(tokenizer.encode(t)) for t in shards[1][:5] + shards[1][6:] + shards[2]}
    assert "Left out 21 training documents that are copies of validation documents" in caplog.text
    assert "21 copies of validation documents left out of training" in capsys.readouterr().out
    with pytest.raises(DataPreparationError, match=r"^the train split has no documents: every one it held is a copy"):
        prepare(tmp_path / "in" / "s0.jsonl", tmp_path / "out2", sp_model, val_input=tmp_path / "val" / "s0.jsonl")


def test_text_files_that_are_all_copies_of_one_document_cannot_be_split(tmp_path: Path, sp_model: Path):
    """Two copies of one file were split into one trained on and one validated on. Held out together, they leave
    nothing to train on, or to validate on: one line, as for a single file."""
    for name in ("a.txt", "b.md"):
        (tmp_path / name).write_text("the same text\n")
    says = rf"^the 2 text files are copies of one document: none can be held out .* — {tmp_path / 'a.txt'} — pass --val"
    with pytest.raises(DataPreparationError, match=says):
        prepare(tmp_path, tmp_path.parent / f"{tmp_path.name}-out", sp_model)
    (tmp_path / "b.md").unlink()
    with pytest.raises(DataPreparationError, match=rf"^only one document: .* — {tmp_path / 'a.txt'} — pass --val"):
        prepare(tmp_path, tmp_path.parent / f"{tmp_path.name}-out", sp_model)


def test_a_utf8_byte_order_mark_is_not_part_of_the_text(tmp_path: Path):
    """Windows tools start files with a BOM: JSONL refused its first line, and text files kept it as a character."""
    from epas_lightning.data.sources import discover_files, iter_documents

    (tmp_path / "notes.txt").write_bytes("\ufeffcafé\r\n".encode())
    (tmp_path / "rows.jsonl").write_bytes(
        "".join(("\ufeff" if i == 0 else "") + json.dumps({"text": t}) + "\r\n" for i, t in enumerate("ab")).encode()
    )
    (tmp_path / "spaced.jsonl").write_bytes(codecs.BOM_UTF8 + b'\r\n{"text": "c"}\n')  # then a blank line: was bad
    bad = []
    texts = [text for f in discover_files([tmp_path]) for _, text in iter_documents(f, "text", bad.append)]
    assert not bad
    assert texts == ["café\r\n", "a", "b", "c"]


def test_a_split_decodes_and_hashes_each_record_once(tmp_path: Path, monkeypatch):
    """prepare reads the record files once per split. A record's split is that of its text (copies of a text go
    together), so each pass decodes every record, but once, and hashes its text once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from epas_lightning.data import sources

    rows = [f"doc {i}" for i in range(300)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    pq.write_table(pa.table({"text": rows}), tmp_path / "b.parquet")
    files = sources.plan_split(sources.discover_files([tmp_path]), 0.05)
    decoded, loads, hashed, document_hash = [], json.loads, [], sources.document_hash
    monkeypatch.setattr(sources.json, "loads", lambda line: decoded.append(line) or loads(line))
    monkeypatch.setattr(sources, "document_hash", lambda text: hashed.append(text) or document_hash(text))
    val = list(sources.split_documents(files, "val", 0.05, "text", print))
    assert len(decoded) == len(rows) and len(hashed) == 2 * len(rows)
    train = list(sources.split_documents(files, "train", 0.05, "text", print))
    assert len(decoded) == 2 * len(rows) and len(hashed) == 4 * len(rows)
    assert 10 < len(val) < 50 and sorted(val + train) == sorted(rows * 2)


def test_empty_input_is_refused(tmp_path: Path, sp_model: Path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataPreparationError, match=rf"no input files found — --input {tmp_path / 'empty'}"):
        prepare(tmp_path / "empty", tmp_path / "out", sp_model)
    (tmp_path / "empty" / "a.txt").write_text("")
    (tmp_path / "empty" / "b.txt").write_text("")
    with pytest.raises(DataPreparationError, match="^the input files are all empty or whitespace — --input "):
        prepare(tmp_path / "empty", tmp_path / "out", sp_model)
    with pytest.raises(DataPreparationError, match="every input file is a validation file too"):
        prepare(tmp_path / "empty", tmp_path / "out", sp_model, val_input=tmp_path / "empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("blank", ["", " \n\t\r\n", "\u3000\u2028"])
def test_a_whitespace_only_document_is_dropped_as_an_empty_one_is(tmp_path: Path, sp_model: Path, blank: str):
    """A document of whitespace alone (a text file, a record) was kept: BOS, a token or two of spaces, EOS, counted
    among the documents and trained on, where an empty one is left out; a text file of it could be the one held out."""
    (tmp_path / "in").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "in" / f"{name}.txt").write_text(f"text of {name}")
    (tmp_path / "in" / "blank.txt").write_text(blank)
    records = [{"text": "one record"}, {"text": blank}, {"text": "another record"}]
    (tmp_path / "in" / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = prepare(tmp_path / "in", tmp_path / "out", sp_model, val_input=tmp_path / "in" / "a.txt", num_workers=1)
    assert json.loads((out / "meta.json").read_text())["splits"]["train"]["documents"] == 4  # b, c and two records
    for name in ("x", "y"):
        (tmp_path / "blank" / name).mkdir(parents=True)
        (tmp_path / "blank" / name / "blank.txt").write_text(blank)
    with pytest.raises(DataPreparationError, match="^the input files are all empty or whitespace — --input "):
        prepare(tmp_path / "blank", tmp_path / "out2", sp_model)


def test_non_utf8_file_is_skipped_with_a_warning_or_fails_by_flag(
    tmp_path: Path, sp_model: Path, caplog: pytest.LogCaptureFixture
):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(3)
    for i in range(5):
        (src / f"ok{i}.txt").write_text(make_text(rng, 50))
    (src / "latin1.txt").write_bytes("café crème".encode("latin-1"))
    (src / "windows.txt").write_text("saved by Notepad as Unicode", encoding="utf-16")  # said to look binary
    val = tmp_path / "val.txt"
    val.write_text(make_text(rng, 50))
    with caplog.at_level("WARNING", logger="epas_lightning"):
        out = prepare(src, tmp_path / "skip", sp_model, val_input=val, num_workers=1)
    assert f"Skipped {src / 'latin1.txt'}: not valid UTF-8" in caplog.text
    assert (
        f"Skipped {src / 'windows.txt'}: UTF-16 text, not UTF-8: convert it (iconv -f UTF-16 -t UTF-8)" in caplog.text
    )
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 6 and meta["skipped"] == {"train": 2, "val": 0}
    said = prepare_module.summary_line(out, meta)  # the last line: the warnings may have scrolled away
    assert "6 documents (5 train / 1 val), 2 bad files or records skipped (see the warnings), " in said
    one = prepare_module.summary_line(out, {**meta, "skipped": {"train": 0, "val": 1}})
    assert ", 1 bad file or record skipped (see the warnings), " in one
    (src / "windows.txt").unlink()  # which of two bad files fails first depends on the order the files are read in
    with pytest.raises(DataPreparationError, match=rf"not valid UTF-8 .* — {src / 'latin1.txt'} — pass --on-bad skip"):
        prepare(src, tmp_path / "fail", sp_model, val_input=val, on_bad="fail", num_workers=1)
    assert not (tmp_path / "fail").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["skip", "src", "val.txt"]  # no build directory left behind


def test_an_empty_split_names_the_skipped_files_it_lost(tmp_path: Path, sp_model: Path, caplog):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("text")
    (tmp_path / "in" / "latin1.txt").write_bytes(b"caf\xe9")  # the one held out, and skipped
    says = (
        r"the val split has no documents: every one it held was skipped \(said above\) — --val-input .*latin1.txt — fix"
    )
    with caplog.at_level("WARNING"), pytest.raises(DataPreparationError, match=says):  # not: raise --val-fraction
        prepare(tmp_path / "in", tmp_path / "out", sp_model, val_input=tmp_path / "in" / "latin1.txt", num_workers=1)
    assert "latin1.txt: not valid UTF-8" in caplog.text
    (empty := tmp_path / "empty.txt").write_text("")  # "— --input — raise --val-fraction or pass --val-input"
    says = rf"^the val split has no documents — --val-input {empty} — give validation files that hold text$"
    with pytest.raises(DataPreparationError, match=says):  # --val-fraction 0 goes with --val-input: not used
        prepare(tmp_path / "in" / "good.txt", tmp_path / "out", sp_model, val_input=empty, val_fraction=0)


def test_missing_text_field_names_the_file(tmp_path: Path, sp_model: Path, corpus):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataPreparationError, match=rf"no field 'text' \(found \['content'\]\) — {bad}:1"):
        prepare(bad, tmp_path / "out", sp_model)
    with pytest.raises(DataPreparationError, match=r"no column 'body' .* — .*c.parquet"):
        prepare(corpus[0] / "c.parquet", tmp_path / "out", sp_model, text_field="body")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": [1, 2], "text": ["a", "b"]}), numbers := tmp_path / "numbers.parquet")
    with pytest.raises(DataPreparationError, match=rf"^column 'id' holds int64, not text — {numbers} — name the text"):
        prepare(numbers, tmp_path / "out", sp_model, text_field="id")  # every row skipped, one warning each
    (numbered := tmp_path / "numbered.jsonl").write_text(json.dumps({"id": 1, "text": "a"}) + "\n")
    with pytest.raises(DataPreparationError, match=rf"^'id' is int, not text — {numbered}:1 — name the text field"):
        prepare(numbered, tmp_path / "out", sp_model, text_field="id")
    val = tmp_path / "val.jsonl"
    val.write_text(json.dumps({"content": "goodbye"}) + "\n")
    assert prepare(bad, tmp_path / "out", sp_model, text_field="content", val_input=val).is_dir()


def test_truncated_gzip_or_parquet_is_skipped_naming_the_file(
    tmp_path: Path, sp_model: Path, caplog: pytest.LogCaptureFixture
):
    rng = random.Random(4)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": make_text(rng, 20)}) + "\n" for _ in range(40)))
    payload = gzip.compress("".join(json.dumps({"text": make_text(rng, 20)}) + "\n" for _ in range(40)).encode())
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(payload[: len(payload) // 2])
    cut = tmp_path / "cut.parquet"  # a download cut short: no footer
    cut.write_bytes(b"PAR1" + payload[:100])
    with caplog.at_level("WARNING", logger="epas_lightning"):
        out = prepare([good, broken, cut], tmp_path / "out", sp_model, val_fraction=0.2, num_workers=1)
    assert f"Skipped {cut}: unreadable parquet" in caplog.text
    assert f"Skipped {broken}:" in caplog.text and "unreadable from this line on (EOFError" in caplog.text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] > 40 and meta["splits"]["train"]["files"] == 2  # the lines before the cut were kept


def test_records_whose_text_is_null_or_not_text_are_bad_records(tmp_path: Path, sp_model: Path, caplog):
    """The same in JSONL and parquet: skipped with a warning naming the record, or fatal with --on-bad fail. A JSON
    string with a lone surrogate (valid JSON, not Unicode) made the tokenizing worker fail and prepare hang; a line
    nested too deeply, prepare fail in a traceback; an integer of 5000 digits lost the lines after it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    records = [{"text": make_text(rng, 20)} for _ in range(30)] + [{"text": None}, {"text": 5}]
    jsonl = tmp_path / "a.jsonl"
    lines = [json.dumps(r) + "\n" for r in records]
    jsonl.write_text("".join(lines[:10]) + "{not json\n" + "".join(lines[10:]))  # the file goes on after a bad line
    with jsonl.open("a") as f:
        f.write('{"text": "a lone \\ud83d surrogate"}\n')  # valid JSON, not text: it cannot be encoded
        f.write("[" * 100_000 + "]" * 100_000 + "\n")  # nested too deeply for Python's json: a RecursionError traceback
        f.write('{"text": "an id too long for int()", "id": ' + "1" * 5000 + "}\n")  # lost the lines after it
        f.write('{"text": "the line after them"}\n')
    parquet = tmp_path / "b.parquet"
    pq.write_table(pa.table({"text": [r["text"] if r["text"] != 5 else None for r in records]}), parquet)
    with caplog.at_level("WARNING", logger="epas_lightning"):
        out = prepare([jsonl, parquet], tmp_path / "out", sp_model, val_fraction=0.5, num_workers=1)
    assert f"{jsonl}:11: not a UTF-8 JSON line" in caplog.text
    assert f"{jsonl}:32: 'text' is null, not text" in caplog.text and f"{jsonl}:33: 'text' is int" in caplog.text
    assert f"{parquet} row 31: 'text' is null, not text" in caplog.text
    assert f"{jsonl}:34: 'text' holds a lone surrogate" in caplog.text
    assert f"{jsonl}:35: a JSON line Python's json cannot read (maximum recursion depth" in caplog.text
    assert f"{jsonl}:36: a JSON line Python's json cannot read (Exceeds the limit (4300 digits)" in caplog.text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 61
    assert sum(meta["skipped"].values()) == 8 and caplog.text.count(f"{jsonl}:11:") == 1  # once, in one split
    assert meta["splits"]["train"]["files"] == meta["splits"]["val"]["files"] == 2  # each has bad records, not bad
    with pytest.raises(DataPreparationError, match=rf"not text — {jsonl}:33 — pass --on-bad skip"):
        prepare(jsonl, tmp_path / "out2", sp_model, val_fraction=0.5, num_workers=1, on_bad="fail")


def test_the_worker_count_cuts_the_same_tokens_into_other_sequences_as_help_says(
    corpus, sp_data: Path, sp_model: Path, tmp_path: Path, capsys
):
    """Each worker writes its own chunks and a sequence never spans two: another --num-workers keeps the documents
    and their order but changes the batches a fit reads, which prepare --help did not say."""
    one = prepare(corpus[0], tmp_path / "one", sp_model, val_fraction=0.1, num_workers=1)
    assert documents_of(one / "train", 1, 2) == documents_of(sp_data / "train", 1, 2)
    assert len(list((one / "train").glob("chunk-*"))) < len(list((sp_data / "train").glob("chunk-*")))
    first = [next(iter(tiny_dm(data).train_dataloader())) for data in (one, sp_data)]
    assert not torch.equal(*first)
    assert cli_main(["prepare", "--help"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "another count stores the same tokens in the same order, cut into other sequences, so fit reads" in said


def test_truncated_chunk_is_a_clear_error(sp_data: Path, tmp_path: Path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(sp_data, data)
    chunk = sorted((data / "train").glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:-10])
    with pytest.raises(DataCheckError, match=rf"corrupt or truncated chunk.* — {chunk} — prepare the data again"):
        tiny_dm(str(data))
    index_path = data / "train" / "index.json"
    index = json.loads(index_path.read_text())
    chunk.write_bytes(b"\0" * index["chunks"][0]["chunk_bytes"])  # the size right, the token count too large
    index["chunks"][0]["dim"] *= 2
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataCheckError, match=rf"holds fewer tokens than .* says .* — {chunk} — prepare the data"):
        tiny_dm(str(data))
    index["chunks"] = []  # an empty stream (litdata: an AssertionError traceback, "No chunks found")
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataCheckError, match=r"holds no tokens \(no chunks\) — .*train/index.json — prepare the data"):
        tiny_dm(str(data))
    index["config"]["data_format"] = ["pickle"]  # not a token stream (litdata's unpacking failed with a traceback)
    index_path.write_text(json.dumps(index))
    with pytest.raises(DataCheckError, match=r"not a token stream \(data format \['pickle'\]\) — .*index.json"):
        tiny_dm(str(data))
    index_path.write_text("{not json")
    with pytest.raises(DataCheckError, match=r"not a readable litdata index .* — .*train/index.json"):
        tiny_dm(str(data))
    (data / "meta.json").write_text('{"tokenizer": 5}')  # a TypeError traceback
    with pytest.raises(DataCheckError, match=r"meta.json names no tokenizer file of its folder \(tokenizer: 5\) — "):
        tiny_dm(str(data))
    (data / "meta.json").write_text("{not json")  # there but unreadable: not "missing meta.json"
    with pytest.raises(DataCheckError, match=r"unreadable meta.json .* — .*data/meta.json — prepare the data again"):
        tiny_dm(str(data))


def test_training_stream_shorter_than_one_batch_is_refused(sp_data: Path):
    """Lightning would "train" for 0 steps and exit 0."""
    with pytest.raises(DataError, match=r"training stream .* fewer than batch_size=4 sequences of 100001 tokens"):
        tiny_dm(str(sp_data), seq_len=100_000).train_dataloader()


def test_a_mixed_stream_too_short_for_a_batch_is_named(sp_data: Path, sp_model: Path, tmp_path: Path):
    """With weights, an epoch ends when a stream runs out: one shorter than a batch left not one step, and the error
    named every folder of the mixture as "the training stream"."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.jsonl").write_text("".join(json.dumps({"text": f"the model {i} ."}) + "\n" for i in range(6)))
    short = prepare(tmp_path / "in", tmp_path / "short", sp_model, val_fraction=0.3, num_workers=1)
    with pytest.raises(DataError) as refused:
        tiny_dm([str(sp_data), str(short)], weights=[1, 1], batch_size=8).train_dataloader()
    assert refused.value.where == f"data.data_dir {short}"
    assert refused.value.what.startswith("with data.weights an epoch ends when a stream runs out, and the training")
    assert refused.value.fix.endswith("(or leave the folder out of the mixture)")
    assert len(tiny_dm([str(sp_data), str(short)], batch_size=8).train_dataloader()) > 0  # read in full: it trains


def test_a_validation_interval_longer_than_the_datas_epoch_is_refused(sp_data: Path):
    """Lightning refused it once the data was read, in a ValueError traceback."""
    from types import SimpleNamespace

    dm = tiny_dm(str(sp_data))
    epoch = len(dm.train_dataloader())
    dm.trainer = SimpleNamespace(val_check_interval=epoch + 1, check_val_every_n_epoch=1, limit_val_batches=1.0)
    with pytest.raises(DataError, match=rf"epoch .* is {epoch} batches, fewer than trainer.val_check_interval"):
        dm.train_dataloader()
    dm.trainer.val_check_interval = epoch
    assert len(dm.train_dataloader()) == epoch
    dm.trainer.val_check_interval, dm.trainer.check_val_every_n_epoch = epoch + 1, None  # counted across epochs
    assert len(dm.train_dataloader()) == epoch
    dm.trainer.check_val_every_n_epoch, dm.trainer.limit_val_batches = 1, 0  # no validation: Lightning takes it
    assert len(dm.train_dataloader()) == epoch


def test_a_weighted_mixtures_epoch_that_ends_early_is_validated_at_its_end(sp_data, second_sp_data, tmp_path):
    """A weighted mixture's epoch ends when a stream runs out, which can be before the length it estimates (here, each
    loader worker's part of a stream is of another size): Lightning then saw no last batch and validated at no
    epoch's end with val_check_interval 1.0 (its default) or a fraction, without a word. It validates at the epoch's
    real end now, and at its own batch counts as before."""

    class Validated(BatchRecorder):
        def on_validation_start(self):
            self.validated_after = [*getattr(self, "validated_after", []), len(self.batches)]

        def on_train_epoch_end(self):
            self.epoch_ends = [*getattr(self, "epoch_ends", []), len(self.batches)]

        def validation_step(self, batch, batch_idx):
            pass

    def fit(interval: float | int, epochs: int = 1) -> Validated:
        data = TokenDataModule(  # at this sequence length, this data's epoch comes short
            [str(sp_data), str(second_sp_data)], seq_len=160, batch_size=4, vocab_size=512, num_workers=2,
            weights=[1, 1],
        )  # fmt: skip
        trainer = cpu_trainer(
            tmp_path, -1, max_epochs=epochs, limit_val_batches=1, val_check_interval=interval, num_sanity_val_steps=0
        )
        trainer.fit(model := Validated(), data)
        return model

    def due(end: int, every: int) -> list[int]:
        return [n for n in range(1, end + 1) if n % every == 0]

    model = fit(1.0, epochs=2)
    first_end = model.epoch_ends[0]
    assert first_end < model.trainer.num_training_batches  # what this is about: the epoch came short of its length
    assert model.validated_after == model.epoch_ends  # at each epoch's real end (the second one's too)
    half = fit(0.5)
    every = half.trainer.val_check_batch  # Lightning's own, put back
    assert every == half.trainer.num_training_batches // 2 and first_end % every
    assert half.validated_after == [*due(first_end, every), first_end]  # at its count, then at the early end
    assert fit(16).validated_after == due(first_end, 16)  # by batch counts: as Lightning counts them


def test_validate_and_test_on_a_held_out_stream_without_one_sequence_are_refused(sp_data: Path, tmp_path: Path):
    """They validated nothing and exited 0 (fit skips validation on it, with a warning). A stream shorter than one
    batch is no longer one: its sequences make one batch, padded."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    empty = write_token_stream(tmp_path / "empty", [16, 10])  # no chunk holds a sequence of 17 tokens
    dm = tiny_dm(str(sp_data), val_dir=str(empty))
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    with pytest.raises(DataError, match=rf"no sequence of 17 tokens: nothing to validate — {empty} — lower the seq"):
        dm.val_dataloader()
    with pytest.raises(DataError, match=r"nothing to test — .* — lower the sequence length"):
        dm.test_dataloader()
    dm.trainer.state.fn = TrainerFn.FITTING
    with pytest.warns(UserWarning, match=rf"validation stream {empty} holds no sequence of 17 .* will be skipped"):
        assert len(dm.val_dataloader()) == 0
    short = tiny_dm(str(sp_data), batch_size=100_000).val_dataloader()
    assert len(short) == 1 and len(real_rows(short)) == short.dataset.total > 4  # fewer than a batch: one batch


def test_a_sentencepiece_model_without_bos_asks_for_one_of_its_tokens(tmp_path: Path):
    from epas_lightning.data.tokenizer import TokenizerError, load_tokenizer

    model = train_sentencepiece(tmp_path / "nobos.model", bos_id=-1)
    with pytest.raises(TokenizerError, match="the model defines no BOS token — .* — name one of its tokens with --bos"):
        load_tokenizer(model)
    assert load_tokenizer(model, bos_token="<unk>").bos_id == 0


def test_tokenizer_larger_than_the_model_vocab_is_refused(sp_data: Path):
    with pytest.raises(
        DataError, match=rf"has {SP_VOCAB} tokens but the model's vocab_size is 100 — .*tokenizer.model"
    ):
        tiny_dm(str(sp_data), vocab_size=100)


def test_interrupted_prepare_leaves_nothing_that_looks_complete(
    corpus, sp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    real_write_split = prepare_module.write_split

    def interrupted(files, split, output_dir, **kwargs):
        if split == "train":
            raise KeyboardInterrupt
        return real_write_split(files, split, output_dir, **kwargs)

    monkeypatch.setattr(prepare_module, "write_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(corpus[0], tmp_path / "out", sp_model, num_workers=1)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match=r"already exists .* remove the empty folder \(rmdir\) or choose a new one"):
        prepare(corpus[0], tmp_path / "out", sp_model)


def test_a_worker_that_fails_unexpectedly_stops_prepare_and_leaves_no_process(
    sp_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A worker that raised left litdata's helper process of it running: a pipeline reading prepare's output hung."""
    from epas_lightning.data.tokenizer import TextTokenizer

    def broken(self, texts, threads=True):
        raise ZeroDivisionError("a bug in a worker")

    monkeypatch.setattr(TextTokenizer, "encode_batch", broken)
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "b.txt").write_text("more text")
    with pytest.raises(RuntimeError, match="failed in a worker(.|\n)*ZeroDivisionError: a bug in a worker"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", sp_model, num_workers=1)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("code", "raised"),
    [
        (
            "EIO",
            r"^cannot write (train|val) into the output folder being built \(input/output error\) — --output .*out — ",
        ),
        ("ENOSPC", "no space left on the device"),
    ],
)
def test_a_chunk_a_worker_cannot_write_stops_prepare(code, raised, sp_model: Path, tmp_path: Path, monkeypatch):
    """A worker that failed writing its last chunk could not exit (litdata left its helper process waiting): prepare
    waited for it forever. Failing mid-way, prepare stopped but that helper outlived it. A full disk there (seen on a
    50 MB tmpfs) was litdata's RuntimeError quoting the worker's traceback, exit 1: it is the one line; so is a failing
    disk, which a write names no file for."""
    import errno

    from litdata.streaming.writer import BinaryWriter

    def cannot_write(*args, **kwargs):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(BinaryWriter, "write_chunk_to_file", cannot_write)  # forked workers inherit it
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"some text of {name}")  # two copies of one text are not split
    with pytest.raises(OutputError, match=raised):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", sp_model, num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["a.txt", "it's.txt"])
def test_an_input_a_worker_cannot_read_is_not_said_as_a_write_into_the_output(
    name, sp_model: Path, tmp_path: Path, monkeypatch
):
    """litdata's RuntimeError quoting a worker's traceback became a write error into the output (exit 2, "check the
    permissions of the folder") for any permission error it quoted, one at an input file too: the file it names
    decides, and one outside the build keeps the error as it was. A name with a quote (which Python quotes with ")
    read as naming no file, so as the output's."""
    import errno

    from litdata.streaming.writer import BinaryWriter

    def cannot_read(*args, **kwargs):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / name))

    monkeypatch.setattr(BinaryWriter, "write_chunk_to_file", cannot_read)  # forked workers inherit it
    for each in (name, "b.txt"):
        (tmp_path / each).write_text(f"some text of {each}")
    with pytest.raises(RuntimeError, match=r"(?s)^Tokenizing the (train|val) split into .* failed: .*\[Errno 13\]"):
        prepare([tmp_path / name, tmp_path / "b.txt"], tmp_path / "out", sp_model, num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "b.txt"])


def test_documents_are_encoded_in_batches_of_bounded_bytes(sp_model: Path, tmp_path: Path, monkeypatch):
    """Batches were 256 documents whatever their size: a worker encoding 256 books held many times their size in
    memory (35 MB of half-megabyte records took 2.5 GB)."""
    from epas_lightning.data import writing
    from epas_lightning.data.sources import InputFile
    from epas_lightning.data.tokenizer import TextTokenizer

    (tmp_path / "books.jsonl").write_text("".join(json.dumps({"text": "word " * 20}) + "\n" for _ in range(5)))
    batches, encode_batch = [], TextTokenizer.encode_batch
    monkeypatch.setattr(
        TextTokenizer, "encode_batch", lambda self, texts, **k: batches.append(texts) or encode_batch(self, texts, **k)
    )
    monkeypatch.setattr(writing, "_BYTES_PER_BATCH", 250, raising=False)
    books = InputFile(str(tmp_path / "books.jsonl"), "books.jsonl", "jsonl", 0, "train")
    item = writing.WorkItem((books,), "train", 0.0, "text", str(sp_model), None, None, "fail", str(tmp_path))
    assert len(list(writing.tokenize_work_item(item))) == 5
    assert [len(texts) for texts in batches] == [2, 2, 1]


@pytest.mark.parametrize(
    ("signum", "says", "while_starting"),
    [(2, "Ctrl+C", False), (15, "SIGTERM", False), (2, "Ctrl+C", True), (9, None, False)],
)
def test_ctrl_c_or_sigterm_while_tokenizing_fails_and_leaves_nothing(
    signum, says, while_starting, corpus, sp_model: Path, tmp_path: Path
):
    """litdata's own Ctrl+C handler ended the process with exit status 0, the half-built folder left behind. SIGTERM
    (`kill`, a container's stop) ended the parent alone: the workers tokenized on, orphaned, into the folder left.
    A signal before litdata had recorded its workers (``while_starting``: the parent still starting them) left the
    worker going on, and the command waited for it. A worker's helper process (litdata's file remover) that was
    signalled in the instant after its fork lost the signal and waited for work for good, holding the command's
    output open (the stand-in helper here ignores SIGTERM): both hung this test now and then. A command killed
    outright (SIGKILL: ``kill -9``) left its workers tokenizing on, orphaned, for as long as their share took."""
    out, signalled = tmp_path / "out", tmp_path.parent / f"{tmp_path.name}-signalled"
    script = f"""
import faulthandler, os, signal, sys, time
faulthandler.dump_traceback_later(60, exit=True)  # a hang fails with every thread's stack, not a bare timeout
from litdata.processing.data_processor import DataWorkerProcess
from epas_lightning.data import writing
from epas_lightning.cli import main

def deaf_helper():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open({str(tmp_path / "deaf")!r}, "w").close()
    time.sleep(10)
    open({str(tmp_path / "helper-went-on")!r}, "w").close()

def interrupted(item):  # a Ctrl+C or a SIGTERM while a worker tokenizes
    import multiprocessing
    multiprocessing.Process(target=deaf_helper).start()
    while not os.path.exists({str(tmp_path / "deaf")!r}):
        time.sleep(0.01)
    os.remove({str(tmp_path / "deaf")!r})
    os.kill(os.getppid(), {signum})
    open({str(signalled)!r}, "w").close()
    time.sleep(10)
    open({str(tmp_path / "worker-went-on")!r}, "w").close()  # not stopped: the command waited for it
    yield from ()

def start_until_signalled(worker, start=DataWorkerProcess.start):
    start(worker)
    while not os.path.exists({str(signalled)!r}):
        time.sleep(0.01)

if {while_starting}:
    DataWorkerProcess.start = start_until_signalled
writing.tokenize_work_item = interrupted
raise SystemExit(main(["prepare", "--input", {str(corpus[0])!r}, "--output", {str(out)!r}, "--tokenizer",
    {str(sp_model)!r}, "--num-workers", "1"]))
"""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    if signum == 9:  # nothing runs in the command: its hidden build folder stays, for the next run to remove
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".out.tmp-")] == []
        return
    assert proc.returncode == 128 + signum and f"stopped ({says})" in proc.stderr, proc.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------------------
# Mixing, resuming, several ranks
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_sp_data(sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus2")
    write_corpus(root, seed=1)
    return prepare(root, tmp_path_factory.mktemp("prepared2") / "data", sp_model, val_fraction=0.1, num_workers=2)


def test_mixed_datasets_follow_the_weights(sp_data: Path, second_sp_data: Path):
    """Over an epoch read by two loader workers, each drawing its own mix: the streams in proportion to the weights,
    no sample read twice (the workers read disjoint parts), and the epoch ends as the first stream runs out, read
    in full (about the loader's length)."""

    def rows(stream: Path) -> Counter:
        dm = tiny_dm(str(stream.parent), batch_size=1, seq_len=48)
        return Counter(tuple(b[0].tolist()) for b in dm._dataloader([stream], shuffle=False))

    first, second = rows(sp_data / "train"), rows(second_sp_data / "train")
    dm = tiny_dm([str(sp_data), str(second_sp_data)], weights=[3.0, 1.0], num_workers=2, seq_len=48)
    loader = dm.train_dataloader()
    seen = Counter(tuple(row.tolist()) for batch in loader for row in batch)
    from_first = sum(n for s, n in seen.items() if s in first)
    assert seen <= first + second  # every sample one of the streams', none read more often than it is there
    assert 0.7 < from_first / seen.total() < 0.8
    assert from_first > 0.98 * first.total() and abs(seen.total() / 4 - len(loader)) < 0.05 * len(loader)
    assert len(dm.val_streams()) == 2


def test_mixing_datasets_with_different_tokenizers_is_refused(sp_data: Path, tmp_path: Path, corpus):
    other = prepare(corpus[0] / "notes", tmp_path / "other", train_tokenizer=True, vocab_size=260, num_workers=1)
    with pytest.raises(DataCheckError, match="tokenized differently"):
        tiny_dm([str(sp_data), str(other)])
    for val_dir in (other, other / "val"):  # validation data must speak the same tokens too
        with pytest.raises(DataCheckError, match=r"data.val_dir was tokenized differently .* same --tokenizer"):
            tiny_dm(str(sp_data), val_dir=str(val_dir))
    assert tiny_dm(str(sp_data), val_dir=str(sp_data / "val")).val_streams() == [sp_data / "val"]


def test_mixing_datasets_whose_documents_end_in_other_tokens_is_refused(sp_data, sp_model, tmp_path, corpus):
    """Two folders prepared with one tokenizer file but other --bos-token/--eos-token were mixed (and one validated on
    the other) as if they were one: half the documents began with another id than the model was told of."""
    other = prepare(corpus[0] / "notes", tmp_path / "other", sp_model, bos_token="</s>", num_workers=1)
    ids = [(meta["bos_id"], meta["eos_id"]) for meta in map(load_meta, (sp_data, other))]
    assert ids == [(1, 2), (2, 2)]
    with pytest.raises(DataCheckError, match=r"^the data directories to mix wrap .* ids \(1/2, 2/2\) — .* same --bos"):
        tiny_dm([str(sp_data), str(other)])
    for val_dir in (other, other / "val"):
        with pytest.raises(DataCheckError, match=r"^data.data_dir and data.val_dir wrap .* ids \(1/2, 2/2\)"):
            tiny_dm(str(sp_data), val_dir=str(val_dir))


class BatchRecorder(L.LightningModule):
    """A one-parameter model that records the batches it trains on."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.batches: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.batches.append(batch.clone())
        return (self.w - batch.float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def fit(data: TokenDataModule, root: Path, max_steps: int, callbacks=(), ckpt_path=None) -> BatchRecorder:
    model = BatchRecorder()
    trainer = cpu_trainer(root, max_steps, callbacks)
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("mixed", [False, True], ids=["one", "mixed"])
def test_resume_from_checkpoint_continues_with_the_same_batches(sp_data, second_sp_data, tmp_path, mixed):
    """A mixture resumes under the same weights however scaled (litdata divides them by their sum): [1, 2] and
    [0.5, 1] draw the same streams, and such a resume was refused."""
    dirs = [str(sp_data), str(second_sp_data)] if mixed else str(sp_data)
    make = lambda scale=1: TokenDataModule(  # noqa: E731
        dirs, seq_len=16, batch_size=4, vocab_size=512, weights=[scale, 2 * scale] if mixed else None
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    full = fit(make(), tmp_path, 10, [checkpoint]).batches
    resumed = fit(make(0.5), tmp_path, 10, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt").batches
    assert len(full) == 10 and len(resumed) == 6
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed, strict=True))
    # the saved position holds for these settings only: another seed (and, mixed, batch size) is refused up front
    other = TokenDataModule(dirs, seq_len=16, batch_size=2, vocab_size=512, weights=[1, 2] if mixed else None, seed=7)
    with pytest.raises(DataError, match="seed 42 -> 7") as refused:
        fit(other, tmp_path, 10, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
    assert ("batch_size 4 -> 2" in str(refused.value)) == mixed
    assert f"— --ckpt_path {tmp_path / 'ckpt' / 'epoch=0-step=4.ckpt'} —" in str(refused.value)  # which checkpoint
    # a data folder moved (here copied) to another path: the same chunks, so the position resumes there (was refused)
    moved = shutil.copytree(sp_data, tmp_path / "moved")
    data = TokenDataModule([str(moved), str(second_sp_data)] if mixed else str(moved), seq_len=16, batch_size=4,
                           vocab_size=512, weights=[1, 2] if mixed else None)  # fmt: skip
    resumed = fit(data, tmp_path, 10, ckpt_path=tmp_path / "ckpt" / "epoch=0-step=4.ckpt").batches
    assert all(torch.equal(a, b) for a, b in zip(full[4:], resumed, strict=True))


def test_a_mixture_resumed_at_an_epoch_end_reads_each_epoch_as_the_uninterrupted_run(sp_data, second_sp_data, tmp_path):
    """An epoch of a weighted mixture ends where its first stream runs out (no limit_train_batches), each loader worker
    at its own point: resumed from the save at that end (max_epochs 1, then 2), the next epoch reads the batches the
    uninterrupted run read in it. With two workers litdata restored that position with their counts mixed up (it takes
    them to deliver batches in turn): a ValueError in a loader worker, or one more batch in the ended epoch."""
    from epas_lightning.run_checkpoint import RunCheckpoint

    def run(folder: str, max_epochs: int, ckpt_path: Path | None = None) -> dict:
        read = {}

        class ReadBatches(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                read[(trainer.current_epoch, batch_idx)] = batch[:, :3].tolist()

        data = TokenDataModule(
            [str(sp_data), str(second_sp_data)],
            seq_len=256,
            batch_size=4,
            vocab_size=512,
            weights=[1, 1],
            num_workers=2,
        )
        checkpoint = RunCheckpoint(dirpath=tmp_path / folder, save_last=True, save_top_k=0)
        trainer = cpu_trainer(tmp_path, -1, [ReadBatches(), checkpoint], max_epochs=max_epochs)
        trainer.fit(BatchRecorder(), data, ckpt_path=ckpt_path)
        return read

    uninterrupted = run("whole", 2)
    run("first", 1)
    resumed = run("resumed", 2, tmp_path / "first" / "last.ckpt")
    assert min(resumed) == (1, 0) and resumed == {key: b for key, b in uninterrupted.items() if key[0] == 1}


def test_checkpoint_saves_reuse_the_stream_fingerprints_taken_at_setup(sp_data, monkeypatch):
    """Every checkpoint save hashed each train stream's index.json again: fit's setup takes them once for its saves."""
    from epas_lightning.data import datamodule

    data = tiny_dm(str(sp_data))
    saved = data.state_dict()["position_settings"]["contents"]
    monkeypatch.setattr(datamodule, "stream_fingerprint", lambda stream: pytest.fail(f"{stream} hashed at a save"))
    assert data.state_dict()["position_settings"]["contents"] == saved
    assert saved == [datamodule.hashlib.sha256((sp_data / "train" / "index.json").read_bytes()).hexdigest()[:16]]


def test_a_resume_on_other_data_starts_it_from_its_beginning_when_asked(sp_data, second_sp_data, tmp_path):
    """Going on with other data (same tokenizer) was refused, and init_from restarts steps, optimizer and schedules:
    resume_position=False resumes the run and reads the new data from its beginning."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(TokenDataModule(str(sp_data), seq_len=16, batch_size=4, vocab_size=512), tmp_path / "a", 4, [checkpoint])
    saved = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    other = lambda **kwargs: TokenDataModule(str(second_sp_data), seq_len=16, batch_size=4, vocab_size=512, **kwargs)  # noqa: E731
    with pytest.raises(DataError, match="position in the data holds only.* with --data.resume_position false$"):
        fit(other(), tmp_path / "b", 8, ckpt_path=saved)
    gone = torch.load(saved, weights_only=True)  # its data no longer exists (the built-in corpus of an older version)
    gone["TokenDataModule"]["position_settings"]["streams"] = [str(tmp_path / "gone" / "train")]
    torch.save(gone, tmp_path / "gone.ckpt")
    with pytest.raises(DataError) as refused:
        fit(other(), tmp_path / "g", 8, ckpt_path=tmp_path / "gone.ckpt")
    lost = tmp_path / "gone" / "train"
    assert refused.value.what == f"the data the checkpoint's position belongs to is gone ({lost})"
    assert refused.value.fix.startswith("go on with this data from its beginning with --data.resume_position false")
    assert refused.value.fix.endswith(
        "or give the folder that data is in now, or move it back to its path (or prepare it again there), to resume "
        "its position"
    )  # a moved folder
    again = torch.load(saved, weights_only=True)  # its folder prepared again since (--overwrite): other chunks
    again["TokenDataModule"]["position_settings"]["contents"] = ["0" * 16]
    torch.save(again, tmp_path / "again.ckpt")
    same = TokenDataModule(str(sp_data), seq_len=16, batch_size=4, vocab_size=512)
    with pytest.raises(
        DataError, match=r"holds only .*\(data.data_dir prepared again since: its chunks are others\)"
    ) as e:
        fit(same, tmp_path / "p", 8, ckpt_path=tmp_path / "again.ckpt")
    assert e.value.fix == "go on with this data from its beginning with --data.resume_position false"  # no settings
    fresh = fit(other(), tmp_path / "c", 4).batches
    resumed = fit(other(resume_position=False), tmp_path / "d", 8, ckpt_path=saved).batches
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(fresh, resumed, strict=True))
    # a checkpoint written before the data module saved its settings (litdata's loader state only): the same, where
    # litdata raised a ValueError traceback at the first batch, also with resume_position=False
    older = torch.load(saved, weights_only=True)
    del older["TokenDataModule"]
    torch.save(older, saved)
    with pytest.raises(DataError, match=f"streams \\['{sp_data.resolve() / 'train'}'\\] -> "):
        fit(other(), tmp_path / "e", 8, ckpt_path=saved)
    resumed = fit(other(resume_position=False), tmp_path / "f", 8, ckpt_path=saved).batches
    assert len(resumed) == 4 and all(torch.equal(a, b) for a, b in zip(fresh, resumed, strict=True))


def test_validate_and_test_take_any_data_whatever_position_the_checkpoint_saved(sp_data, second_sp_data, caplog):
    """The saved loader position is a fit's to resume: `validate`/`test --ckpt_path` on other data or another batch
    size score it, neither refused nor told that litdata splits the rest of an epoch."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    saved = TokenDataModule(str(sp_data), seq_len=16, batch_size=4, vocab_size=512).state_dict()
    for fn, data in ((TrainerFn.VALIDATING, second_sp_data), (TrainerFn.TESTING, sp_data)):
        other = TokenDataModule(str(data), seq_len=16, batch_size=2, vocab_size=512)
        other.trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), world_size=1, ckpt_path="x.ckpt")
        with caplog.at_level("INFO"):
            other.load_state_dict(saved)
        assert "resumed" not in caplog.text


@pytest.mark.parametrize("weights", [[1, 2], None], ids=["weights", "all"])
def test_mixed_loader_with_workers_resumes_with_the_same_batches(sp_data, second_sp_data, weights):
    """Each worker draws its own mix: every stream must resume where that worker stopped, not at an even split."""
    dirs = [str(sp_data), str(second_sp_data)]
    make = lambda: tiny_dm(dirs, weights=weights, num_workers=2).train_dataloader()  # noqa: E731
    batches = iter(loader := make())
    for _ in range(2):  # one batch per worker, each its own mix of the streams: an even split of the totals is wrong
        next(batches)
    state = loader.state_dict()
    expected = [next(batches) for _ in range(6)]
    resumed = make()
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed, strict=False))
    if weights:  # saved on an epoch's last batch, before anything asked past it (a checkpoint at that step)
        last = iter(loader := make())
        for _ in range(len(list(make()))):
            next(last)
        resumed = make()
        resumed.load_state_dict(loader.state_dict())
        assert list(resumed) == []  # the epoch is over: litdata's restore read one more batch, or failed in a worker


def test_a_mixtures_epoch_ends_on_every_rank_where_one_rank_runs_out(sp_data, second_sp_data):
    """Each rank reads its own part of every stream, and a weighted mixture's epoch can end at another batch on each:
    under several ranks the loader asks whether every rank has its next batch, and ends the epoch where one has not,
    at a position that resumes in the next epoch."""
    make = lambda: tiny_dm([str(sp_data), str(second_sp_data)], weights=[1, 1]).train_dataloader()  # noqa: E731
    loader, asked = make(), []
    loader.every_rank_has = lambda has: asked.append(has) or len(asked) <= 5  # another rank has five batches
    batches, uninterrupted = list(loader), iter(make())
    assert all(torch.equal(batch, next(uninterrupted)) for batch in batches) and len(batches) == 5 and all(asked)
    assert loader.last_batch
    resumed = make()
    resumed.load_state_dict(loader.state_dict())
    assert list(resumed) == []


@pytest.mark.parametrize("mixed", [False, True], ids=["one stream", "weighted mixture"])
def test_under_several_ranks_the_loader_is_as_long_as_the_shortest_ranks(sp_data, second_sp_data, mixed):
    """A rank's part of a stream can be shorter than another's (litdata on a parallel file system deals whole chunks to
    the loader workers): Lightning read each rank's length, and the rank with more data trained on alone (a hang)."""

    class Strategy:  # another rank's loader has five batches
        root_device = torch.device("cpu")
        reduce = staticmethod(lambda length, reduce_op: torch.minimum(length, torch.tensor(5)))
        reduce_boolean_decision = staticmethod(lambda decision: decision)

    dm = tiny_dm([str(sp_data), str(second_sp_data)] if mixed else str(sp_data), weights=[1, 1] if mixed else None)
    dm.trainer = SimpleNamespace(world_size=2, strategy=Strategy(), val_check_interval=1.0)
    loader = dm.train_dataloader()
    assert len(loader) == 5 and loader.every_rank_has == (Strategy.reduce_boolean_decision if mixed else None)


def real_rows(loader) -> list[tuple[int, ...]]:
    """The samples a held-out loader's batches hold, without their pad rows."""
    from epas_lightning.loss import PAD

    return [tuple(row.tolist()) for batch in loader for row in batch if not (row == PAD).all()]


@pytest.mark.parametrize("mixed", [False, True], ids=["one stream", "two streams"])
def test_under_several_ranks_every_rank_has_as_many_heldout_batches_and_every_sample_is_read_once(
    sp_data, second_sp_data, tmp_path, monkeypatch, mixed
):
    """Validation and test under several ranks end together with no length agreed on (training's is): a rank with one
    more batch than another would wait in a collective (FSDP2's all-gathers) that never matches. litdata dealt data
    in whole batches and dropped the rest, so validation scored other samples at each batch size and rank count. Every
    rank now has as many full batches, its last ones filled with pad rows, and the ranks' real rows are every sample
    once: here chunks of uneven sizes, loader workers (at one batch size), each rank a node of its own (ranks from
    the environment, litdata's way), in a second epoch."""
    val = write_token_stream(tmp_path / "val", [170, 35, 99])  # 17 samples in 3 chunks, for ranks of 2 workers
    dm = tiny_dm([str(sp_data), str(second_sp_data)] if mixed else str(sp_data), val_dir=None if mixed else str(val))
    whole = dm.heldout_dataloader(one_process=True)
    everything = real_rows(whole)
    assert len(everything) == (whole.dataset.total if mixed else 17) and len(set(everything)) == len(everything)
    monkeypatch.setenv("NNODES", "2")
    for world_size, batch_size, workers in [(2, 4, 0 if mixed else 2), (3, 3, 0), (2, 7, 0)]:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))  # litdata's _DistributedEnv reads them, and GLOBAL_RANK
        lengths, samples = set(), []
        for rank in range(world_size):
            monkeypatch.setenv("GLOBAL_RANK", str(rank))
            dm.batch_size, dm.num_workers = batch_size, workers
            loader = dm.val_dataloader()
            for _ in loader if not workers else []:  # the first epoch (the sanity check's or a first validation's)
                break
            assert all(batch.shape == (batch_size, 17) for batch in loader)  # one shape: a compiled model's
            lengths.add(len(loader))
            samples += real_rows(loader)
        assert len(lengths) == 1 and lengths.pop() > 0, (world_size, batch_size)
        assert samples == everything, (world_size, batch_size)  # each once, rank by rank in order


@pytest.fixture(scope="module")
def three_chunk_data(corpus, sp_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two folders of the same three chunks (one per prepare worker)."""
    first = prepare(corpus[0], tmp_path_factory.mktemp("three") / "data", sp_model, val_fraction=0.1, num_workers=3)
    return [first, Path(shutil.copytree(first, first.parent / "copy"))]


@pytest.fixture(scope="module")
def two_rank_runs(sp_data: Path, three_chunk_data: list[Path], tmp_path_factory: pytest.TempPathFactory):
    """``ddp_data_ranks.py`` on two DDP ranks started at once, its two runs one after the other in the same processes
    (two interpreters fewer): one epoch of ``sp_data``, then, on a parallel file system (forced), two epochs of the
    mixture of ``three_chunk_data``. Their output folders (one, mixture), each with a ``rank<R>.json`` per rank."""
    root = tmp_path_factory.mktemp("two_ranks")
    one, mixture = root / "one", root / "mixture"
    one.mkdir()
    mixture.mkdir()
    script = Path(__file__).parent / "scripts" / "ddp_data_ranks.py"
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])}
    runs = [str(sp_data), str(one), "--then", "LITDATA_POSIX_FAST=1", str(three_chunk_data[0]), str(mixture)]
    command = [sys.executable, str(script), *runs, str(three_chunk_data[1])]
    run_ranks_at_once(command, env, root / "logs")  # a hang without the fix; slow on 2 busy cores
    return one, mixture


@pytest.mark.slow
def test_two_ranks_of_a_weighted_mixture_end_each_epoch_at_one_batch(two_rank_runs: tuple[Path, Path]):
    """litdata on a parallel file system (forced here) deals whole chunks to the loader workers of all ranks: three
    chunks to two ranks of two workers each leave rank 1 half of each stream. Rank 1 went on to its next epoch, and
    then ended, while rank 0 trained on, its gradients' all-reduce unanswered (a hang under NCCL)."""
    mixture = two_rank_runs[1]
    ranks = [json.loads((mixture / f"rank{r}.json").read_text())["epoch_batches"] for r in range(2)]
    assert ranks[0] == ranks[1] and len(ranks[0]) == 2 and min(ranks[0]) > 0


@pytest.mark.slow
def test_two_ranks_read_disjoint_samples_covering_the_epoch(sp_data: Path, two_rank_runs: tuple[Path, Path]):
    ranks = [json.loads((two_rank_runs[0] / f"rank{r}.json").read_text()) for r in range(2)]
    seen = [Counter(map(tuple, r["samples"])) for r in ranks]
    assert all(r["world_size"] == 2 for r in ranks) and [r["rank"] for r in ranks] == [0, 1]
    dm = tiny_dm(str(sp_data), batch_size=1)
    stream = Counter(tuple(b[0].tolist()) for b in dm._dataloader([sp_data / "train"], shuffle=False))
    assert seen[0] + seen[1] <= stream  # no sample read twice (by one rank or by both)
    assert len(ranks[0]["samples"]) == len(ranks[1]["samples"]) > 0
    assert sum(len(r["samples"]) for r in ranks) >= 0.9 * stream.total()  # the epoch is covered


def test_fit_deals_the_data_to_the_trainers_ranks_whatever_the_environment_says(sp_data, tmp_path, monkeypatch):
    """A fit on one device with ``WORLD_SIZE`` (``GLOBAL_RANK``, ``NNODES``) left in the environment by a job script
    trained and validated on a quarter of its data, without a word: litdata deals data to the ranks the environment
    names over the process group's (none on one device). The loaders deal it to the trainer's ranks: all of it on one
    device, and under two ranks each rank its own half."""

    class Strategy:  # what _end_epochs_together asks of a trainer of several ranks: every rank's length is this one's
        root_device = torch.device("cpu")
        reduce = staticmethod(lambda length, reduce_op: length)

    def read(trainer) -> tuple[int, list[tuple[int, ...]]]:
        dm = tiny_dm(str(sp_data))
        dm.trainer = trainer
        return len(dm.train_dataloader()), real_rows(dm.val_dataloader())

    whole = read(cpu_trainer(tmp_path, 1))
    for name, value in {"WORLD_SIZE": "4", "GLOBAL_RANK": "3", "NNODES": "2"}.items():
        monkeypatch.setenv(name, value)  # what litdata's _DistributedEnv reads
    assert read(cpu_trainer(tmp_path, 1)) == whole and whole[0] > 4 and len(whole[1]) >= 8
    ranks = [read(SimpleNamespace(world_size=2, global_rank=r, num_nodes=1, strategy=Strategy())) for r in (0, 1)]
    (length, val), (other_length, other_val) = ranks
    assert length == other_length == whole[0] // 2
    assert len(val) - len(other_val) in (0, 1) and val + other_val == whole[1]  # half each: all of it, once


def test_a_resume_with_ranks_left_in_the_environment_goes_on_where_it_stopped(
    sp_data, second_sp_data, tmp_path, monkeypatch
):
    """litdata reads ``WORLD_SIZE`` again when a loader loads its position: with the data dealt to the trainer's one
    rank, a job script's leftover ``WORLD_SIZE=4`` read as a resume on four ranks, and a mixture's was refused in a
    ValueError traceback ("support resume only when world_size ... match")."""

    def loader():
        dm = tiny_dm([str(sp_data), str(second_sp_data)])
        dm.trainer, dm._position_settled = cpu_trainer(tmp_path, 1), True
        return dm.train_dataloader()

    stopped = loader()
    batches = iter(stopped)
    [next(batches) for _ in range(3)]
    position, following = stopped.state_dict(), next(batches)
    for name, value in {"WORLD_SIZE": "4", "GLOBAL_RANK": "3", "NNODES": "2"}.items():
        monkeypatch.setenv(name, value)
    resumed = loader()
    resumed.load_state_dict(position)
    assert torch.equal(next(iter(resumed)), following) and os.environ["GLOBAL_RANK"] == "3"  # the environment kept


def test_the_one_process_commands_read_the_whole_heldout_split_whatever_the_environment_says(sp_data, monkeypatch):
    """evaluate, bench and analyze read the held-out split in one process: a ``WORLD_SIZE`` left in the environment
    (a job script's export, torchrun) made litdata deal them one rank's part, so they scored a fraction of it."""
    from epas_lightning.data import heldout_loader

    whole = [batch.clone() for batch in heldout_loader(str(sp_data), 16, 2)]
    for name, value in {"WORLD_SIZE": "4", "GLOBAL_RANK": "3", "NNODES": "2"}.items():
        monkeypatch.setenv(name, value)  # what litdata's _DistributedEnv reads
    read = list(heldout_loader(str(sp_data), 16, 2))
    assert len(read) == len(whole) > 4 and all(torch.equal(a, b) for a, b in zip(read, whole, strict=True))


@pytest.mark.parametrize(("total", "says"), [(1, "1 shard in"), (2, "2 shards in")])
def test_the_tokenized_line_counts_one_shard_in_the_singular(tmp_path, capsys, total, says):
    """The line a log file gets per split (no terminal, no bar) said "Tokenized val: 1 shards"."""
    from epas_lightning.data.writing import progress_bar

    with progress_bar(tmp_path, total, "val", enabled=True):
        pass
    assert capsys.readouterr().err.startswith(f"Tokenized val: {says} ")
