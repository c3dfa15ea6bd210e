"""The built-in stdlib corpus and the litdata TokenDataModule (fast: a 1.5 MB corpus with 512 tokens)."""

import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from epas_lightning.data import TokenDataModule, builtin, prepare_builtin_corpus
from epas_lightning.data.builtin import (
    SourceFile,
    builtin_entry_name,
    collect_source_files,
    default_cache_dir,
    list_source_files,
    split_train_val,
    stdlib_root,
)
from epas_lightning.data.layout import load_meta
from epas_lightning.data.sources import InputFile
from epas_lightning.data.writing import WorkItem, tokenize_work_item
from epas_lightning.errors import ConfigError, DataError
from epas_lightning.loss import PAD

TINY_CORPUS_MAX_BYTES = 1_500_000  # as prepared by the `tiny_corpus` fixture (conftest.py)
TINY_CORPUS_VOCAB_SIZE = 512


def tiny_datamodule(data_dir: Path, **kwargs) -> TokenDataModule:
    kwargs = {"seq_len": 32, "batch_size": 4, "vocab_size": TINY_CORPUS_VOCAB_SIZE} | kwargs
    dm = TokenDataModule(data_dir=str(data_dir), **kwargs)
    dm.setup("fit")
    return dm


def read_stream(stream_dir: Path) -> torch.Tensor:
    """All tokens of a (small) litdata token stream, in order."""
    from litdata import StreamingDataset
    from litdata.streaming.item_loader import TokensLoader

    dataset = StreamingDataset(str(stream_dir), item_loader=TokensLoader(block_size=1))
    return torch.cat([dataset[i] for i in range(len(dataset))])


def fail_if_built(*args, **kwargs):
    raise AssertionError("the cache entry was rebuilt")


# ---------------------------------------------------------------------------------------------------------------------
# Corpus: files, split, tokens
# ---------------------------------------------------------------------------------------------------------------------


def test_source_files_are_sorted_python_files_without_installed_packages():
    rel_paths = list_source_files(stdlib_root())
    assert rel_paths == sorted(rel_paths)
    assert "os.py" in rel_paths
    assert all(p.endswith(".py") for p in rel_paths)
    assert not any("site-packages" in p or "dist-packages" in p for p in rel_paths)


def test_max_bytes_limits_the_corpus():
    files, _ = collect_source_files(stdlib_root(), max_bytes=200_000)
    assert 0 < sum(f.n_bytes for f in files) <= 200_000
    assert [f.rel_path for f in files] == list_source_files(stdlib_root())[: len(files)]  # a prefix, in order


def test_split_is_deterministic_disjoint_and_holds_out_about_val_fraction():
    files, _ = collect_source_files(stdlib_root())
    train, val = split_train_val(files, val_fraction=0.02)
    assert {f.rel_path for f in train}.isdisjoint(f.rel_path for f in val)
    assert len(train) + len(val) == len(files)
    assert 0.005 < len(val) / len(files) < 0.05
    assert split_train_val(files, val_fraction=0.02) == (train, val)
    shuffled_train, shuffled_val = split_train_val(random.Random(0).sample(files, len(files)), val_fraction=0.02)
    assert {f.rel_path for f in shuffled_val} == {f.rel_path for f in val}  # decided per file, not by position


def test_copies_of_a_file_are_held_out_together_and_an_empty_one_never(tmp_path: Path):
    """The built-in corpus was split by path: a standard library file copied under another name (test data, vendored
    modules) was trained on and validated on. It is split by text, as ``prepare`` does."""
    files = []
    for i in range(40):
        for copy in ("a", "b"):
            (tmp_path / f"{copy}{i}.py").write_text(f"x = {i}\n")
            files.append(SourceFile(f"{copy}{i}.py", str(tmp_path / f"{copy}{i}.py"), len(f"x = {i}\n")))
    (tmp_path / "__init__.py").write_text("")
    files.append(SourceFile("__init__.py", str(tmp_path / "__init__.py"), 0))
    for fraction in (0.2, 1e-12):
        train, val = split_train_val(files, val_fraction=fraction)
        held = {Path(f.path).read_text() for f in val}
        assert val and held.isdisjoint(Path(f.path).read_text() for f in train) and "" not in held


def test_split_always_holds_out_one_file():
    files = [SourceFile(f"f{i}.py", f"f{i}.py", 1) for i in range(5)]
    train, val = split_train_val(files, val_fraction=1e-12)
    assert len(val) == 1 and len(train) == 4


def test_prepared_split_matches_the_manifest(tiny_corpus: Path):
    manifest = json.loads((tiny_corpus / "files.json").read_text())
    assert manifest["val"] and set(manifest["train"]).isdisjoint(manifest["val"])
    files, _ = collect_source_files(stdlib_root(), TINY_CORPUS_MAX_BYTES)
    train, val = split_train_val(files, val_fraction=0.02)
    assert manifest == {"train": [f.rel_path for f in train], "val": [f.rel_path for f in val]}


def test_meta_describes_the_entry(tiny_corpus: Path):
    meta = load_meta(tiny_corpus)
    assert (meta["vocab_size"], meta["max_bytes"]) == (TINY_CORPUS_VOCAB_SIZE, TINY_CORPUS_MAX_BYTES)
    assert (tiny_corpus / meta["tokenizer"]).is_file()
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] <= TINY_CORPUS_MAX_BYTES
    assert meta["splits"]["val"]["files"] >= 1
    assert meta["splits"]["train"]["tokens"] > 100 * meta["splits"]["val"]["files"]


def test_each_file_is_one_bos_eos_document_that_decodes_back(tiny_corpus: Path, tmp_path: Path):
    meta = load_meta(tiny_corpus)
    file = collect_source_files(stdlib_root(), max_bytes=50_000)[0][-1]
    item = WorkItem(
        files=(InputFile(file.path, file.rel_path, "text", file.n_bytes, "train"),),
        split="train",
        val_fraction=0.02,
        text_field="text",
        tokenizer_path=str(tiny_corpus / "tokenizer.json"),
        bos_token=None,
        eos_token=None,
        on_bad="fail",
        stats_dir=str(tmp_path),
    )
    (tokens,) = tokenize_work_item(item)
    assert tokens[0] == meta["bos_id"] and tokens[-1] == meta["eos_id"]
    dm = tiny_datamodule(tiny_corpus)
    assert dm.tokenizer.decode(tokens[1:-1].tolist()) == Path(file.path).read_text(encoding="utf-8")


def test_val_stream_holds_whole_documents(tiny_corpus: Path):
    meta = load_meta(tiny_corpus)
    tokens = read_stream(tiny_corpus / "val")
    assert len(tokens) == meta["splits"]["val"]["tokens"]
    assert tokens[0] == meta["bos_id"] and tokens[-1] == meta["eos_id"]
    n_docs = meta["splits"]["val"]["files"]
    assert (tokens == meta["bos_id"]).sum() == n_docs == (tokens == meta["eos_id"]).sum()


def test_byte_level_tokenizer_has_no_unknown_tokens(tiny_corpus: Path):
    tokenizer = tiny_datamodule(tiny_corpus).tokenizer
    text = "déjà vu → ✓ 中文 🐍\tx = 1\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_bpe_training_cuts_very_long_runs_and_still_encodes_them_exactly():
    """A minified file or a data blob is one enormous pre-token: the trainer's time grows with its length times the
    merges, so training sees it in pieces of LONGEST_TRAINING_RUN; no learned token is longer, encoding is exact."""
    from epas_lightning.data.tokenizer import train_byte_level_bpe

    blob = "q" * 5000 + "7" * 3000
    tokenizer = train_byte_level_bpe(["def f(x):\n    return x\n", blob], vocab_size=300)
    assert max(len(token) for token in tokenizer.get_vocab()) <= 256 + 1  # a piece and the space before it
    assert tokenizer.decode(tokenizer.encode(blob).ids) == blob


# ---------------------------------------------------------------------------------------------------------------------
# Cache entries
# ---------------------------------------------------------------------------------------------------------------------


def test_entry_name_encodes_its_inputs():
    name = builtin_entry_name(4096)
    assert name.startswith("stdlib-py3.") and "-v4096-all-" in name
    assert len({name, builtin_entry_name(4096, max_bytes=10), builtin_entry_name(4096, val_fraction=0.1)}) == 3


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("EPAS_CACHE_DIR", str(tmp_path / "env"))
    assert default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("EPAS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "epas_lightning"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "epas_lightning"


def test_complete_entry_is_reused_without_rebuilding(
    tiny_corpus: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setattr(builtin, "build_entry", fail_if_built)
    with caplog.at_level(logging.INFO, logger="epas_lightning"):
        dm = TokenDataModule(vocab_size=TINY_CORPUS_VOCAB_SIZE, max_bytes=TINY_CORPUS_MAX_BYTES)  # EPAS_CACHE_DIR
        dm.prepare_data()
    assert dm.data_dir == tiny_corpus
    assert "Reusing prepared corpus" in caplog.text


def test_a_lost_worker_of_the_builtin_corpus_says_what_fit_can_do(tmp_path: Path, monkeypatch):
    """A tokenizing worker that died while the built-in corpus was prepared (fit's first use) said to prepare again
    with fewer workers, naming ``--num-workers``, a flag of ``prepare`` that fit does not take; nothing is kept."""
    from epas_lightning.data import writing
    from epas_lightning.data.sources import DataPreparationError

    def lost(*args, **kwargs):
        raise writing.worker_lost(writing.WorkerEnded(-9), "train", 2)

    monkeypatch.setattr(builtin, "build_dataset", lost)
    with pytest.raises(DataPreparationError) as raised:
        prepare_builtin_corpus(300, cache_dir=tmp_path, max_bytes=200_000, num_workers=2)
    said = str(raised.value)
    assert "--num-workers" not in said and "built-in corpus" in said and "run it again" in said, said
    assert [p.name for p in tmp_path.iterdir()] == [".locks"]


def test_incomplete_entry_is_rebuilt_and_process_state_is_kept(tmp_path: Path):
    """An entry without its meta.json is built again, what it held kept in a hidden sibling: builds are renamed into
    place whole, so it is none of ours (it was deleted)."""
    entry = tmp_path / builtin_entry_name(300, max_bytes=200_000)
    (entry / "train").mkdir(parents=True)  # no meta.json
    (entry / "train" / "junk.bin").write_bytes(b"x")
    stale = tmp_path / f".{entry.name}.tmp-crashed"
    stale.mkdir()
    random.seed(123)
    expected_random = random.random()
    random.seed(123)
    torch_state = torch.random.get_rng_state()

    assert prepare_builtin_corpus(300, cache_dir=tmp_path, max_bytes=200_000, num_workers=1) == entry

    assert random.random() == expected_random  # litdata's reseeding is undone
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert load_meta(entry)["vocab_size"] == 300
    assert not (entry / "train" / "junk.bin").exists() and not stale.exists()
    [kept] = tmp_path.glob(f".{entry.name}.incomplete-*")
    assert (kept / "train" / "junk.bin").read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", kept.name, entry.name]


def test_concurrent_callers_build_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    builds = []

    def fake_build(build_dir: Path, *args) -> dict:
        builds.append(build_dir)
        threading.Event().wait(0.3)
        (build_dir / "meta.json").write_text("{}")
        return {
            "seconds": 0.3,
            "seconds_by_step": {},
            "splits": {"train": {"tokens": 1}, "val": {"tokens": 1}},
            "vocab_size": 512,
        }

    monkeypatch.setattr(builtin, "build_entry", fake_build)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare_builtin_corpus(512, cache_dir=tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(set(results)) == 1 and len(results) == 3


# ---------------------------------------------------------------------------------------------------------------------
# TokenDataModule
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "val"])
def test_batches_are_blocks_of_seq_len_plus_one_tokens(tiny_corpus: Path, split: str):
    dm = tiny_datamodule(tiny_corpus, seq_len=32, batch_size=4)
    batch = next(iter(dm.train_dataloader() if split == "train" else dm.val_dataloader()))
    assert batch.shape == (4, 33)
    assert batch.dtype == torch.int32
    assert batch.min() >= 0 and batch.max() < TINY_CORPUS_VOCAB_SIZE
    assert dm.on_after_batch_transfer(batch, 0).dtype == torch.int64


def test_validation_order_is_fixed_and_training_order_is_shuffled(tiny_corpus: Path):
    dm = tiny_datamodule(tiny_corpus)
    val_a, val_b = (next(iter(dm.val_dataloader())) for _ in range(2))
    assert torch.equal(val_a, val_b)
    first_val_block = read_stream(tiny_corpus / "val")[:33]
    assert torch.equal(val_a[0], first_val_block)
    other_seed = tiny_datamodule(tiny_corpus, seed=1)
    assert not torch.equal(next(iter(dm.train_dataloader())), next(iter(other_seed.train_dataloader())))


def test_vocab_size_check_names_both_sizes(tiny_corpus: Path):
    with pytest.raises(DataError, match=r"has 512 tokens but the model's vocab_size is 300"):
        tiny_datamodule(tiny_corpus, vocab_size=300)
    assert tiny_datamodule(tiny_corpus, vocab_size=1024).tokenizer.get_vocab_size() == 512


def test_a_built_in_corpus_that_cannot_be_built_names_the_setting(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"at least 258 .* not 100 — model.config.vocab_size"):
        TokenDataModule(vocab_size=100, cache_dir=str(tmp_path)).prepare_data()
    with pytest.raises(ConfigError, match=r"got 0 — data.max_bytes — raise it"):  # no file fits in 100 bytes
        TokenDataModule(vocab_size=512, max_bytes=100, cache_dir=str(tmp_path)).prepare_data()


def test_a_cache_folder_that_cannot_be_written_names_its_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A file (or a read-only or full disk) as the cache: a NotADirectoryError traceback from making its lock folder."""
    a_file = tmp_path / "cache"
    a_file.write_text("mine")
    with pytest.raises(ConfigError, match=rf"^cannot write the built-in corpus cache .* — data.cache_dir {a_file} — "):
        TokenDataModule(vocab_size=512, cache_dir=str(a_file)).prepare_data()
    monkeypatch.setenv("EPAS_CACHE_DIR", str(a_file / "sub"))
    with pytest.raises(ConfigError, match=rf"\(Not a directory: .*\) — EPAS_CACHE_DIR {a_file}/sub — set"):
        TokenDataModule(vocab_size=512).prepare_data()
    assert a_file.read_text() == "mine"


def test_a_corrupt_built_in_corpus_entry_says_to_delete_it(tiny_corpus: Path, tmp_path: Path):
    """It said "prepare the data again", which cannot be done to the built-in corpus."""
    import shutil

    entry = tmp_path / tiny_corpus.name
    shutil.copytree(tiny_corpus, entry)
    chunk = sorted((entry / "train").glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:100])
    make = lambda: TokenDataModule(seq_len=32, vocab_size=512, max_bytes=1_500_000, cache_dir=str(tmp_path))  # noqa: E731
    with pytest.raises(DataError, match=rf"truncated chunk.* — {chunk} — delete the cache entry {entry}: the next run"):
        make().setup("fit")
    (entry / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match=rf"^unreadable meta.json .* — delete the cache entry {entry}: the next run"):
        make().setup("fit")


def test_a_built_in_corpus_entry_whose_tokenizer_was_replaced_is_built_again(
    tiny_corpus: Path, tmp_path: Path, monkeypatch
):
    """The built-in corpus's cache entry was not checked for a replaced tokenizer.json, as prepared folders are: its
    ids were read as another vocabulary's. An entry we built is built again, the altered one set aside (never
    deleted: the file in it is not ours); one meta.json does not say we built is refused in one line, left as it is."""
    entry = tmp_path / tiny_corpus.name
    shutil.copytree(tiny_corpus, entry)
    tokenizer = json.loads((entry / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # another vocabulary of the same size
    altered = json.dumps(tokenizer)
    (entry / "tokenizer.json").write_text(altered)
    built = []

    def build_entry(build_dir: Path, *args) -> dict:  # as prepare_builtin_corpus would, without the wait
        built.append(build_dir)
        shutil.copytree(tiny_corpus, build_dir, dirs_exist_ok=True)
        return load_meta(build_dir)

    monkeypatch.setattr(builtin, "build_entry", build_entry)
    make = lambda: TokenDataModule(seq_len=32, vocab_size=512, max_bytes=1_500_000, cache_dir=str(tmp_path))  # noqa: E731
    make().setup("fit")
    assert len(built) == 1
    assert (entry / "tokenizer.json").read_bytes() == (tiny_corpus / "tokenizer.json").read_bytes()
    [kept] = [p for p in tmp_path.glob(f".{entry.name}.*") if p.is_dir()]
    assert (kept / "tokenizer.json").read_text() == altered
    (entry / "tokenizer.json").write_text(altered)
    (entry / "meta.json").write_text(json.dumps({**load_meta(entry), "source": "my-own-data"}))
    with pytest.raises(DataError, match=r"^the tokenizer file tokenizer.json changed since .* — move it out of"):
        make().setup("fit")
    assert len(built) == 1 and (entry / "tokenizer.json").read_text() == altered
    (entry / "tokenizer.json").write_bytes((tiny_corpus / "tokenizer.json").read_bytes())  # put back, as it is
    checked = iter([False, False])  # seen altered before and under the lock; put back before the entry is moved
    monkeypatch.setattr(builtin, "reusable", lambda entry: next(checked, True))
    assert prepare_builtin_corpus(512, cache_dir=tmp_path, max_bytes=1_500_000) == entry  # a build failed its rename
    assert len(built) == 1


def test_a_built_in_corpus_built_again_does_not_say_first_use(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """An entry built again (its tokenizer file replaced since) said "Preparing the built-in corpus (first use only)"
    right after the line saying it builds it again: it is prepared once per entry, which later runs reuse."""
    entry = prepare_builtin_corpus(512, cache_dir=tmp_path, max_bytes=100_000, num_workers=1, progress=False)
    tokenizer = json.loads((entry / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"]["replaced"] = len(tokenizer["model"]["vocab"])
    (entry / "tokenizer.json").write_text(json.dumps(tokenizer))
    with caplog.at_level(logging.INFO, logger="epas_lightning"):
        prepare_builtin_corpus(512, cache_dir=tmp_path, max_bytes=100_000, num_workers=1, progress=False)
    assert "building it again" in caplog.text and "Preparing the built-in corpus" in caplog.text
    assert "first use" not in caplog.text


def test_numpy_numbers_in_the_settings_build_and_batch(tiny_corpus: Path):
    """A sweep's ``np.int64`` settings: ``vocab_size`` failed building the corpus's cache key ("Object of type int64 is
    not JSON serializable"), ``batch_size`` in torch's sampler ("should be a positive integer value")."""
    import numpy as np

    dm = TokenDataModule(
        seq_len=np.int64(32), batch_size=np.int64(4), vocab_size=np.int64(512), max_bytes=np.int64(1_500_000)
    )
    dm.prepare_data()
    assert dm.data_dir == tiny_corpus
    dm.setup("fit")
    assert next(iter(dm.train_dataloader())).shape == (4, 33)


def test_a_negative_worker_count_is_refused_when_configured():
    """It passed, and `fit` died at its first batch in a ValueError traceback from torch's DataLoader."""
    with pytest.raises(ConfigError, match=r"num_workers must be 0 or more, got -1 — data.num_workers"):
        TokenDataModule(num_workers=-1)


def test_a_seed_the_shuffle_cannot_take_is_refused_when_configured():
    """It passed, and `fit` died building its first loader in numpy's ValueError traceback ("Seed must be between 0
    and 2**32 - 1"); a string, in a TypeError one."""
    for seed in (-1, 2**32):
        says = rf"^seed must lie in 0\.\.2\*\*32-1, got {seed} — data.seed — give a seed in that range$"
        with pytest.raises(ConfigError, match=says):
            TokenDataModule(seed=seed)
    says = r"^seed must be a whole number, got '7' — data.seed — give it without quotes or a decimal point$"
    with pytest.raises(ConfigError, match=says):
        TokenDataModule(seed="7")


ONE_WEIGHT_EACH = r"give one weight per data_dir, e.g. \[1, 1\]$"


@pytest.mark.parametrize(
    ("data_dir", "weights", "message"),
    [
        (
            ["a", "b"],
            [float("nan"), 1.0],
            r"^weights must be 2 finite non-negative .*got \[nan, 1.0\] — data.weights — " + ONE_WEIGHT_EACH,
        ),
        (["a", "b"], [float("inf"), 1.0], r"^weights must be 2 finite"),
        (["a", "b"], [0.0, 0.0], r"^weights must be 2 finite non-negative numbers, not all zero"),
        (None, [1.0], r"^weights mix several data_dir, but none is set .* — data.weights — set data.data_dir"),
        (
            ["a", "b"],
            ["0.5", 1.0],
            r"^weights must be 2 finite non-negative .*got \['0.5', 1.0\] — data.weights — " + ONE_WEIGHT_EACH,
        ),
        (["a", "b"], 1.0, r"^weights must be 2 finite non-negative .*got 1.0 — data.weights — " + ONE_WEIGHT_EACH),
    ],
    ids=["nan", "inf", "all-zero", "built-in", "string", "one-number"],
)
def test_mixing_weights_that_cannot_mix_are_refused(data_dir, weights, message):
    """NaN and infinite weights passed, and the loader failed in a traceback ("cannot convert float NaN to integer");
    weights without data_dir said "weights must be 0 non-negative numbers"; a string or a lone number (from Python)
    failed in a TypeError traceback."""
    with pytest.raises(ConfigError, match=message):
        TokenDataModule(data_dir, weights=weights)


def test_a_folder_listed_twice_is_refused(tiny_corpus: Path, tmp_path: Path):
    """The same folder twice in data_dir (also by a link or another spelling) was mixed as two streams: each of its
    samples came twice an epoch, in the same shuffled order."""
    (link := tmp_path / "link").symlink_to(tiny_corpus)
    for twice in ([tiny_corpus, tiny_corpus], [tiny_corpus, link], [tiny_corpus, f"{tiny_corpus}/"]):
        data = TokenDataModule([str(d) for d in twice], seq_len=16, batch_size=4, vocab_size=512)
        with pytest.raises(ConfigError) as refused:
            data.setup("fit")
        assert str(refused.value).startswith(f"one folder is listed twice ({tiny_corpus}, {Path(twice[1])})")
        assert refused.value.where == "data.data_dir"


def test_a_batch_size_of_zero_is_named_as_such():
    """It read 'seq_len and batch_size must be positive, got 32 and 0 — data': which one, and where, was a guess."""
    with pytest.raises(ConfigError, match=r"^batch_size must be at least 1, got 0 — data.batch_size — "):
        TokenDataModule(seq_len=32, batch_size=0)
    with pytest.raises(ConfigError, match=r"^seq_len must be at least 1, got 0 — data.seq_len"):
        TokenDataModule(seq_len=0, batch_size=4)
    whole = " — give it without quotes or a decimal point$"
    with pytest.raises(ConfigError, match=r"^batch_size must be a whole number, got '8' — data.batch_size" + whole):
        TokenDataModule(seq_len=32, batch_size="8")  # a TypeError comparing str and int
    with pytest.raises(ConfigError, match=r"^seq_len must be a whole number, got 32.0 — data.seq_len" + whole):
        TokenDataModule(seq_len=32.0, batch_size=4)  # accepted
    with pytest.raises(ConfigError, match=r"^vocab_size must be a whole number, got '512' — data.vocab_size" + whole):
        TokenDataModule(seq_len=32, vocab_size="512")  # a TypeError comparing int and str, in setup
    with pytest.raises(ConfigError, match=r"^vocab_size must be at least 1, got 0 — data.vocab_size — leave it unset"):
        TokenDataModule(seq_len=32, vocab_size=0)  # in setup: "the tokenizer has 512 tokens but the vocab_size is 0"


def test_missing_data_dir_is_a_clear_error(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=rf"does not exist — data.data_dir {missing} — create it with .*prepare"):
        tiny_datamodule(missing)
    (tmp_path / ".nowhere.tmp-1234abcd").mkdir()  # a killed `prepare --output nowhere` left its build
    with pytest.raises(DataError, match=r"^data directory does not exist \(an interrupted prepare left \.nowhere"):
        tiny_datamodule(missing)
    (corpus := tmp_path / "corpus.jsonl").write_text('{"text": "a raw corpus, not prepared"}\n')
    with pytest.raises(DataError, match=rf"^data directory is a file, not a folder — data.data_dir {corpus} — create"):
        tiny_datamodule(corpus)  # it "does not exist"


def test_incomplete_data_dir_lists_what_is_missing(tiny_corpus: Path, tmp_path: Path):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_corpus, data_dir)
    (data_dir / "meta.json").unlink()
    shutil.rmtree(data_dir / "val")
    with pytest.raises(DataError, match=r"incomplete data directory: missing val/index.json, meta.json.*prepare"):
        tiny_datamodule(data_dir)


def test_load_tokenizer_of_no_path_says_the_checkpoint_records_none():
    """``load_tokenizer(loaded.tokenizer_path)`` (the README's example) of a checkpoint that records no tokenizer, or
    whose tokenizer is gone, was a TypeError from pathlib."""
    from epas_lightning.data import load_tokenizer
    from epas_lightning.data.tokenizer import TokenizerError

    with pytest.raises(TokenizerError, match=r"^no tokenizer path given \(None: the checkpoint records no tokenizer"):
        load_tokenizer(None)


def test_a_tokenizer_file_replaced_in_a_prepared_folder_is_refused(tiny_corpus: Path, tmp_path: Path):
    """meta.json records the hash of the tokenizer the ids were made with, and nothing compared it: a folder whose
    tokenizer file was replaced trained and was scored on ids the new file reads as other tokens, and checkpoints
    and exports shipped the new file."""
    from epas_lightning.data.token_data import check_data_flag

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name in ("train", "val"):
        (data_dir / name).symlink_to(tiny_corpus / name)
    shutil.copy(tiny_corpus / "meta.json", data_dir / "meta.json")
    tokenizer = json.loads((tiny_corpus / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # another vocabulary of the same size
    (data_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    says = "the tokenizer file tokenizer.json changed since the data was prepared (meta.json records another hash)"
    with pytest.raises(DataError, match=rf"^{re.escape(says)}.* — data.data_dir {data_dir} — prepare the data again"):
        tiny_datamodule(data_dir)
    with pytest.raises(DataError, match=rf"^{re.escape(says)}.* — --data {data_dir} — prepare the data again"):
        check_data_flag(data_dir)  # evaluate, bench, analyze
    with pytest.raises(DataError, match=rf"^{re.escape(says)}.* — data.val_dir {data_dir} — prepare the data again"):
        tiny_datamodule(tiny_corpus, val_dir=str(data_dir))


def test_a_tokenizer_file_is_hashed_once_while_it_stays_as_it_was(tiny_corpus: Path, tmp_path: Path, monkeypatch):
    """check_data_flag, setup's check of the data folder and of a val_dir, their comparison and the tokenizer's load
    each read and hashed the tokenizer file (a Llama 3 tokenizer.json is 9 MB): it is read once while its path, inode,
    size and times stay; again once changed in place or replaced; at every call while it changed in the last
    RACY_NS (a second write in that clock tick could leave them all as they were)."""
    from epas_lightning.data import tokenizer
    from epas_lightning.data.token_data import check_data_flag

    reads, hash_of = [], tokenizer.sha256_of
    monkeypatch.setattr(tokenizer, "sha256_of", lambda path: reads.append(path.name) or hash_of(path))
    monkeypatch.setattr(tokenizer, "HASHED", {})
    monkeypatch.setattr(tokenizer, "RACY_NS", -1)  # the fixture's file may be younger than RACY_NS
    check_data_flag(tiny_corpus)
    tiny_datamodule(tiny_corpus, val_dir=str(tiny_corpus))
    assert reads == ["tokenizer.json"]
    file, replacement = tmp_path / "tokenizer.json", tmp_path / "new.json"
    file.write_text("a")
    first = tokenizer.file_sha256(file)
    file.write_text("b")  # in place, same size: only its times (and, below, the inode) tell
    os.utime(file, ns=(1, 1))
    assert tokenizer.file_sha256(file) == tokenizer.file_sha256(file) == hash_of(file) != first
    replacement.write_text("a")
    os.utime(replacement, ns=(1, 1))
    os.replace(replacement, file)
    assert tokenizer.file_sha256(file) == first and reads.count("tokenizer.json") == 4
    monkeypatch.setattr(tokenizer, "RACY_NS", 10**18)  # every file changed just now, as far as it can tell
    replacement.write_text("c")
    assert tokenizer.file_sha256(replacement) == tokenizer.file_sha256(replacement) and reads.count("new.json") == 2


@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_state_dict_resumes_with_the_same_batches(tiny_corpus: Path, num_workers: int):
    loader = tiny_datamodule(tiny_corpus, num_workers=num_workers).train_dataloader()
    batches = iter(loader)
    for _ in range(3):
        next(batches)
    state = loader.state_dict()
    expected = [next(batches) for _ in range(3)]

    resumed = tiny_datamodule(tiny_corpus, num_workers=num_workers).train_dataloader()
    resumed.load_state_dict(state)
    batches = iter(resumed)
    for want in expected:
        assert torch.equal(next(batches), want)


@pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_data_workers_leave_a_stop_signal_to_the_main_process(tiny_corpus: Path, stop: str):
    """Slurm's time limit signals every process of the job (Ctrl+C, the terminal's process group): a worker died of it,
    and ``fit`` ended in torch's traceback with no checkpoint instead of stopping after the step with one."""
    before = set(multiprocessing.active_children())  # an earlier test's in this process: not the worker
    batches = iter(tiny_datamodule(tiny_corpus, num_workers=1).train_dataloader())
    next(batches)  # the worker has started
    (worker,) = set(multiprocessing.active_children()) - before
    os.kill(worker.pid, getattr(signal, stop))
    worker.join(timeout=0.5)
    assert worker.is_alive()
    next(batches)


@pytest.mark.skipif(not Path("/proc/self/comm").exists(), reason="torch names its workers on Linux")
def test_data_workers_still_running_at_exit_end_with_the_process(tiny_corpus: Path, monkeypatch):
    """A script whose top level raised with a loader's iterator in a global hung at exit for good: multiprocessing's
    exit handler ends its daemonic processes with SIGTERM, which data workers ignore, then waits for them."""
    from epas_lightning.data import token_data

    registered = []
    monkeypatch.setattr(token_data, "_data_workers_end_at_exit", False)
    monkeypatch.setattr(token_data.atexit, "register", registered.append)
    before = set(multiprocessing.active_children())
    batches = iter(tiny_datamodule(tiny_corpus, num_workers=1).train_dataloader())
    next(batches)
    (worker,) = set(multiprocessing.active_children()) - before
    torch_sigchld = signal.getsignal(signal.SIGCHLD)
    try:
        assert registered == [token_data.end_data_workers]
        token_data.end_data_workers()  # at exit, before multiprocessing's handler:
        worker.terminate()
        worker.join(timeout=5)
        assert not worker.is_alive()
        assert signal.getsignal(signal.SIGCHLD) == signal.SIG_DFL  # torch's raised "worker killed" in a later handler
    finally:
        signal.signal(signal.SIGCHLD, torch_sigchld)


def test_a_resume_with_another_batch_size_says_its_position_is_not_exact(tiny_corpus: Path, caplog):
    """One stream resumes under another batch size or worker count (litdata splits the rest of the epoch anew and
    rounds the position down to a whole batch: 7 batches of 4 resumed at 8 read 4 samples twice): said in one line."""
    saved = tiny_datamodule(tiny_corpus).state_dict()
    with caplog.at_level("INFO"):
        tiny_datamodule(tiny_corpus, batch_size=8, num_workers=1).load_state_dict(saved)
    assert "data: resumed with batch_size 4 -> 8, num_workers 0 -> 1: litdata splits the rest" in caplog.text


def test_a_resumed_positions_note_no_lightning_module_took_is_said_at_the_first_training_batch(tiny_corpus, caplog):
    """In a fit the note waits for the LightningModule (``EPASModule`` says it in its global-batch line); one that
    does not take it (a module of one's own) has it said once, at the first training batch, not at a validation's."""
    from lightning.pytorch.trainer.states import TrainerFn

    saved = tiny_datamodule(tiny_corpus).state_dict()
    data = tiny_datamodule(tiny_corpus, batch_size=8)
    fitting = SimpleNamespace(fn=TrainerFn.FITTING)
    trainer = SimpleNamespace(state=fitting, training=False, ckpt_path="last.ckpt", world_size=1, sanity_checking=False)
    data.trainer = trainer
    batch = torch.zeros(2, 33, dtype=torch.int32)
    with caplog.at_level("INFO"):
        data.load_state_dict(saved)
        data.on_before_batch_transfer(batch, 0)  # fit's sanity validation
        assert "litdata splits" not in caplog.text
        trainer.training = True
        data.on_before_batch_transfer(batch, 0)
        data.on_before_batch_transfer(batch, 0)
    assert caplog.text.count("data: resumed with batch_size 4 -> 8: litdata splits the rest") == 1


def test_token_ids_outside_the_vocabulary_are_refused_before_a_batch_reaches_the_device(tmp_path):
    """A chunk corrupted in place (sizes and index still agreeing) passed every check: evaluate died with an
    IndexError traceback on the CPU, and on a GPU the embedding would end a training run with a device-side assert."""
    from epas_lightning.errors import DataError

    data = TokenDataModule(data_dir=str(tmp_path), seq_len=3, batch_size=2, vocab_size=512)
    good = torch.tensor([[0, 5, 511, 7], [1, 2, 3, 4]], dtype=torch.int32)
    assert data.on_before_batch_transfer(good, 0) is good
    for bad, ids in ((511 + 1, "0..512"), (-3, "-3..511")):
        batch = good.clone()
        batch[1, 2] = bad
        says = rf"token ids must lie in 0\.\.511 \(the model's vocab_size\), got {ids} — {tmp_path} — the token stream"
        with pytest.raises(DataError, match=says):
            data.on_before_batch_transfer(batch, 0)
    held_out = TokenDataModule(str(tmp_path), seq_len=3, batch_size=2, vocab_size=512, val_dir=str(tmp_path / "val"))
    held_out.trainer = SimpleNamespace(training=False)  # validating: the data folder was named, not the val_dir
    with pytest.raises(DataError, match=rf"got 0\.\.512 — {tmp_path / 'val'} — the token stream"):
        held_out.on_before_batch_transfer(torch.tensor([[0, 512]], dtype=torch.int32), 0)
    # pad rows (whole rows of PAD) end held-out batches only: a training batch's, or a PAD within a row, is refused
    padded = torch.cat([good, torch.full((1, 4), PAD, dtype=torch.int32)])
    assert held_out.on_before_batch_transfer(padded, 0) is padded
    with pytest.raises(DataError, match=rf"got {PAD}\.\.511 — {tmp_path / 'val'} — the token stream"):
        held_out.on_before_batch_transfer(torch.where(padded == 7, PAD, padded), 0)
    with pytest.raises(DataError, match=rf"got {PAD}\.\.511 — {tmp_path} — the token stream"):
        data.on_before_batch_transfer(padded, 0)


class _CrashingStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        import ctypes

        yield ctypes.string_at(0)  # a segmentation fault, as a native library's bug gives


def test_a_data_worker_that_crashes_prints_where(capfd):
    """A data worker killed by a segmentation fault (seen once in CI, in a litdata mixture's worker) printed only
    torch's "Unexpected segmentation fault encountered in worker": nothing said where. Its Python stack is printed."""
    from epas_lightning.data.token_data import start_data_worker

    loader = torch.utils.data.DataLoader(_CrashingStream(), num_workers=1, worker_init_fn=start_data_worker)
    with pytest.raises(RuntimeError, match="DataLoader worker .* (killed by signal: Segmentation fault|exited)"):
        next(iter(loader))
    err = capfd.readouterr().err
    assert "Fatal Python error: Segmentation fault" in err and "in __iter__" in err, err


def test_a_forked_worker_never_collects_what_it_inherited(tmp_path):
    """A tokenizing worker aborted in CI while collecting garbage (``std::system_error``): a torch.distributed
    process group an earlier in-process run left in a reference cycle was destroyed in the child, where the threads it
    joins do not exist (a 1-rank gloo group so destroyed hung the child). Workers we fork freeze what they inherit."""
    import gc

    from epas_lightning.worker_processes import never_collect_inherited_objects

    destroyed = tmp_path / "destroyed"

    class Native:  # stands for an object whose destructor touches state only the parent has
        def __del__(self):
            destroyed.write_text(str(os.getpid()))

    never_collect_inherited_objects()
    enabled = gc.isenabled()
    gc.disable()  # the cycle stays uncollected until the fork, as garbage between two collections does
    try:
        cycle = Native()
        cycle.self = cycle
        del cycle
        pid = os.fork()
        if pid == 0:
            gc.collect()
            os._exit(0)
        os.waitpid(pid, 0)
        assert not destroyed.exists(), "the child destroyed an object it inherited"
        gc.collect()
        assert destroyed.read_text() == str(os.getpid())  # the parent's own garbage, collected by the parent
    finally:
        if enabled:
            gc.enable()


def test_validation_loaders_whose_distributed_sampler_repeats_samples_are_named_during_fit(recwarn):
    """Which validation loaders' DistributedSampler scores samples twice (the two-rank fit is in test_distributed):
    only one evening out a length the ranks do not divide, without drop_last, its own or its batch sampler's; during
    fit alone (Lightning warns in validate and test)."""
    from types import SimpleNamespace

    import torch
    from lightning.pytorch.trainer.states import TrainerFn
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    from epas_lightning.repeated_samples import repeated_samples, warn_repeated_validation_samples

    def loader(n: int, ranks: int = 2, drop_last: bool = False, batched: bool = False) -> DataLoader:
        data = torch.zeros(n, 9, dtype=torch.long)
        sampler = DistributedSampler(data, num_replicas=ranks, rank=0, shuffle=False, drop_last=drop_last)
        if batched:
            return DataLoader(data, batch_sampler=BatchSampler(sampler, 2, drop_last=False))
        return DataLoader(data, sampler=sampler)

    assert repeated_samples(loader(13)) == (1, 13, 2)
    assert repeated_samples(loader(13, batched=True)) == (1, 13, 2)
    assert repeated_samples(loader(2, ranks=4)) == (2, 2, 4)
    assert repeated_samples(loader(12)) is None and repeated_samples(loader(13, ranks=1)) is None
    assert repeated_samples(loader(13, drop_last=True)) is None
    assert repeated_samples(DataLoader(torch.zeros(13, 9))) is None  # one process: no DistributedSampler

    def said(fn: TrainerFn, loaders, scored: list[int] | None = None) -> list[str]:  # noqa: ANN001
        """What fit says of ``loaders``, of which validation scores ``scored`` batches each (all by default)."""
        listed = list(loaders.values()) if isinstance(loaders, dict) else [loaders] if loaders else []
        scored = [len(one) for one in listed] if scored is None else scored
        recwarn.clear()
        trainer = SimpleNamespace(state=SimpleNamespace(fn=fn), val_dataloaders=loaders, num_val_batches=scored)
        warn_repeated_validation_samples(trainer)
        return [str(w.message) for w in recwarn]

    (line,) = said(TrainerFn.FITTING, loader(13))
    assert line.startswith("val/loss during fit counts 1 repeated sample beside the 13 held-out ones of the validation")
    assert "give each of the 2 ranks 7; use TokenDataModule" in line and "(it leaves 1 out)" in line
    (line,) = said(TrainerFn.FITTING, {"a": loader(12), "b": loader(3, ranks=4)})
    assert "counts 1 repeated sample beside the 3 held-out ones of validation dataloader 1" in line
    assert said(TrainerFn.FITTING, [loader(12)]) == said(TrainerFn.FITTING, None) == []
    assert said(TrainerFn.VALIDATING, loader(13)) == []
    # limit_val_batches stops before the last batch, the only one holding a repeat: none is scored, nothing to say
    assert said(TrainerFn.FITTING, loader(15, batched=True), scored=[3]) == []
    assert len(said(TrainerFn.FITTING, loader(15, batched=True), scored=[4])) == 1  # 8 samples a rank, 2 a batch
