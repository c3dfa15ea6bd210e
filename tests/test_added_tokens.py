"""A sentencepiece ``tokenizer.model`` whose folder adds tokens (``added_tokens.json``, ``tokenizer_config.json``'s
``added_tokens_decoder``), as LLaMA-2, Mistral and Phi-3 fine-tunes without a ``tokenizer.json`` ship their chat
tokens: read as transformers reads the folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import train_tiny_sentencepiece

from epas_lightning.data.tokenizer import TextTokenizer, copy_tokenizer, load_tokenizer
from epas_lightning.serve.chat import chat_prompt_ids, control_token_encoder

PIECES = 300
"""The tiny sentencepiece model's pieces: the added tokens take the ids from here on."""
ADDED = {"<|im_end|>": PIECES, "<|im_start|>": PIECES + 1, "<|plain|>": PIECES + 2}
SPECIAL = ("<|im_end|>", "<|im_start|>")
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("sp") / "tokenizer.model")


def added_folder(folder: Path, model: Path, where: str, **config) -> Path:
    """A folder holding ``model`` and :data:`ADDED` named in ``where`` (``added_tokens.json``, with the special ones
    named in ``special_tokens_map.json``, or ``tokenizer_config.json``'s ``added_tokens_decoder``), and ``config`` in
    its ``tokenizer_config.json``."""
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    if where == "added_tokens.json":
        (folder / "added_tokens.json").write_text(json.dumps(ADDED))
        (folder / "special_tokens_map.json").write_text(json.dumps({"additional_special_tokens": list(SPECIAL)}))
    else:
        decoder = {str(i): {"content": text, "special": text in SPECIAL} for text, i in ADDED.items()}
        config["added_tokens_decoder"] = decoder
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", **config}))
    return folder


@pytest.mark.parametrize("where", ["added_tokens.json", "tokenizer_config.json"])
def test_a_sentencepiece_folder_s_added_tokens_are_ids_of_the_tokenizer(model, tmp_path, where):
    """The folder's added tokens counted only the model's pieces: an end token at 32000+ was no stop id and could
    never be emitted (generation cuts logits at vocab_size), and a template's '<|im_end|>' was read as text pieces.
    They are ids now: in vocab_size, the named EOS a stop id, each one id in a chat (a non-special one in any text),
    decoded to its text (a special one to nothing, as a tokenizer.json's)."""
    folder = added_folder(tmp_path / "tok", model, where, eos_token="<|im_end|>")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.vocab_size == PIECES + len(ADDED)
    assert tokenizer.eos_id == model_eos(model) and ADDED["<|im_end|>"] in tokenizer.stop_ids
    assert load_tokenizer(folder, eos_token="<|im_end|>").eos_id == ADDED["<|im_end|>"]
    encode = control_token_encoder(tokenizer)
    assert encode("<|im_start|>") == [ADDED["<|im_start|>"]] and encode("<|im_end|>") == [ADDED["<|im_end|>"]]
    ids = tokenizer.encode("ka<|plain|> lo<|im_end|>")
    assert ids.count(ADDED["<|plain|>"]) == 1 and ADDED["<|im_end|>"] not in ids  # special text is text
    assert tokenizer.decode(ids) == "ka<|plain|> lo<|im_end|>"
    assert (
        tokenizer.decode([*tokenizer.encode("ka lo"), ADDED["<|im_end|>"], *tokenizer.encode("mine")]) == "ka lo mine"
    )
    prompt = chat_prompt_ids(CHATML, [{"role": "user", "content": "ka lo"}], tokenizer)
    assert prompt.count(ADDED["<|im_start|>"]) == 2 and prompt.count(ADDED["<|im_end|>"]) == 1


@pytest.mark.parametrize(("piece", "text"), [("<s>", "mine ka"), ("</s>", "mine ka"), ("\u2581", "mine  ka")])
def test_the_spaces_of_a_word_after_a_special_added_token_are_kept(model, tmp_path, piece, text):
    """A run of pieces after an added token got back one space at most, of its first piece: after a control piece
    (which decodes to nothing) none ('mine<|im_end|></s> ka' decoded to 'mineka'), and a lone space piece before the
    word was lost ('mine<|im_end|>\u2581 ka': 'mine ka'), where transformers' decode of the same ids (a chat reply's
    text) keeps every space. Before any other text, the run's leading spaces are dropped as before."""
    transformers = pytest.importorskip("transformers")
    folder = added_folder(tmp_path / "tok", model, "tokenizer_config.json")
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    word = tokenizer.encode("mine")
    ids = [*word, ADDED["<|im_end|>"], tokenizer.token_id(piece), *tokenizer.encode(" ka")]
    assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text
    run = ids[len(word) + 1 :]
    assert tokenizer.decode([ADDED["<|im_end|>"], *run]) == tokenizer.backend.decode(run) == "ka"  # nothing before it


def test_a_sentencepiece_folder_reads_as_transformers_reads_it(model, tmp_path):
    """Vocabulary size, EOS and the chat template's text as transformers' tokenizer of the same folder gives them: the
    template gets the folder's other special tokens too (unk, pad and the additional ones rendered empty before)."""
    transformers = pytest.importorskip("transformers")
    template = CHATML + "[{{ unk_token }}|{{ pad_token }}]"
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": "</s>"}
    folder = added_folder(tmp_path / "tok", model, "tokenizer_config.json", **config, chat_template=template)
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.vocab_size == len(hf) and hf.eos_token_id in tokenizer.stop_ids
    messages = [{"role": "user", "content": "ka lo"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("[<unk>|</s>]")
    assert chat_prompt_ids(template, messages, tokenizer) == control_token_encoder(tokenizer)(text)


def test_a_regular_token_chosen_as_bos_is_its_id_in_a_chat(model, tmp_path):
    """A BOS that is a regular token (--bos-token, a word-inner piece) was written by the template as its text and
    read back as other pieces (with the dummy prefix): the chat started without the BOS every training document
    started with."""
    folder = added_folder(tmp_path / "tok", model, "tokenizer_config.json")
    piece = "nel"  # of "anel": never word-initial
    tokenizer = load_tokenizer(folder, bos_token=piece)
    encode = control_token_encoder(tokenizer)
    assert encode(piece) != [tokenizer.bos_id]
    for content in ("lo", piece, "\ue000bos_token0\ue001"):  # a message holding its text or its mark: text
        ids = chat_prompt_ids(CHATML, [{"role": "user", "content": content}], tokenizer)
        assert ids == [tokenizer.bos_id, *encode(f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n")]


def test_a_copied_sentencepiece_tokenizer_keeps_its_added_tokens(model, tmp_path):
    """prepare and consolidate copy the tokenizer file with what its folder says of its tokens: the copy has the same
    ids, stop ids and special tokens (and the chat template, in the same tokenizer_config.json)."""
    from epas_lightning.data.chat_template import chat_template_beside

    config = {"eos_token": "<|im_end|>", "pad_token": "</s>", "chat_template": CHATML}
    folder = added_folder(tmp_path / "tok", model, "tokenizer_config.json", **config)
    (tmp_path / "copy").mkdir()
    copy_tokenizer(load_tokenizer(folder), tmp_path / "copy")
    original, copied = load_tokenizer(folder), load_tokenizer(tmp_path / "copy")
    assert (copied.vocab_size, copied.stop_ids) == (original.vocab_size, original.stop_ids)
    assert (copied.added, copied.named) == (original.added, original.named)
    assert chat_template_beside(copied.path) == {"chat_template": CHATML}  # kept beside them


def test_a_tokenizer_json_beside_added_tokens_wins(model, tmp_path):
    """A folder's tokenizer.json holds its added tokens itself: an added_tokens.json beside it adds none; the EOS its
    tokenizer_config.json names is a stop id all the same."""
    from epas_lightning.hf.sentencepiece_json import sentencepiece_tokenizer

    folder = added_folder(tmp_path / "tok", model, "added_tokens.json", eos_token="<unk>")
    sentencepiece_tokenizer(model).save(str(folder / "tokenizer.json"))
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.kind, tokenizer.vocab_size, tokenizer.added) == ("hf", PIECES, {})
    assert tokenizer.stop_ids == (tokenizer.eos_id, 0)


def model_eos(model: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model)).eos_id()


def test_an_exported_sentencepiece_tokenizer_keeps_its_added_tokens(model, tmp_path):
    """export shipped the pieces only: transformers' tokenizer of the export had 300 ids, read '<|im_end|>' as text in
    the chat template it ships, and had no EOS when the model trained with --eos-token '<|im_end|>'."""
    transformers = pytest.importorskip("transformers")
    from epas_lightning.hf.export import export_tokenizer

    folder = added_folder(tmp_path / "tok", model, "tokenizer_config.json", chat_template=CHATML)
    (tmp_path / "hf").mkdir()
    tokenizer = load_tokenizer(folder, eos_token="<|im_end|>")
    export_tokenizer(folder, tmp_path / "hf", 64, tokenizer.bos_id, tokenizer.eos_id)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (len(hf), hf.eos_token_id) == (tokenizer.vocab_size, ADDED["<|im_end|>"])
    messages = [{"role": "user", "content": "ka lo"}]
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == chat_prompt_ids(CHATML, messages, tokenizer)
    assert hf.decode(hf.encode("su<|plain|>tari", add_special_tokens=False)) == tokenizer.decode(
        tokenizer.encode("su<|plain|>tari")
    )


def test_an_added_bos_is_named_for_lm_eval_requests(model, tmp_path):
    """lm-eval's requests look for the BOS's text: an added BOS (--bos-token '<|im_start|>') raised in sentencepiece,
    which knows only its pieces."""
    from epas_lightning.evaluation.multiple_choice import bos_text

    folder = added_folder(tmp_path / "tok", model, "tokenizer_config.json")
    assert bos_text(load_tokenizer(folder, bos_token="<|im_start|>")) == "<|im_start|>"


def test_an_added_token_that_strips_takes_the_whitespace_beside_it(model, tmp_path):
    """An added token with rstrip (Phi-3's '<|end|>') or lstrip takes the whitespace after or before it, as
    transformers reads it: its chat template's '<|end|>\\n' is '<|end|>' alone. The whitespace was read as pieces."""
    transformers = pytest.importorskip("transformers")
    from epas_lightning.hf.export import export_tokenizer

    spaced = train_tiny_sentencepiece(tmp_path / "spaced.model", remove_extra_whitespaces=False)
    folder = added_folder(tmp_path / "tok", spaced, "tokenizer_config.json", chat_template=CHATML)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["300"]["rstrip"] = config["added_tokens_decoder"]["301"]["lstrip"] = True
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(folder)
    encode = control_token_encoder(tokenizer)
    assert encode("ka<|im_end|>\n  lo") == encode("ka<|im_end|>lo")
    assert encode("ka \n<|im_start|>lo") == encode("ka<|im_start|>lo")
    (tmp_path / "hf").mkdir()
    export_tokenizer(folder, tmp_path / "hf", 64, None, None)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ("ka<|im_end|>\n  lo", "ka \n<|im_start|>lo <|im_end|> \n"):
        assert encode(text) == hf.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("edit", ["rename", "special", "rstrip", "remove added_tokens.json", "add added_tokens.json"])
def test_editing_the_added_tokens_beside_a_tokenizer_is_a_changed_tokenizer(model, tmp_path, edit):
    """The recorded hash and same_token_ids covered the tokenizer.model alone: added tokens edited beside it after
    prepare (or an added_tokens.json put there or removed) went unnoticed, and fit/generate read the data with other
    ids."""
    from epas_lightning.data.tokenizer import RecordedTokenizer, same_token_ids, tokenizer_sha256

    folder = added_folder(tmp_path / "tok", model, "added_tokens.json")
    if edit == "add added_tokens.json":
        (folder / "added_tokens.json").unlink()
    before = load_tokenizer(folder)
    recorded = RecordedTokenizer(before.path, before.sha256)
    (tmp_path / "kept").mkdir()
    copy_tokenizer(before, tmp_path / "kept")
    assert not recorded.changed() and before.sha256 == tokenizer_sha256(tmp_path / "kept" / "tokenizer.model")
    added = dict(ADDED)
    if edit == "rename":
        added["<|plain2|>"] = added.pop("<|plain|>")
    elif edit in ("special", "rstrip"):
        decoder = {str(i): {"content": text, "special": text in SPECIAL} for text, i in added.items()}
        decoder[str(added["<|plain|>"])] |= {"special": True} if edit == "special" else {"rstrip": True}
        (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder}))
    if edit == "remove added_tokens.json":
        (folder / "added_tokens.json").unlink()
    else:
        (folder / "added_tokens.json").write_text(json.dumps(added))
    assert recorded.changed() and load_tokenizer(folder).sha256 != before.sha256
    assert not same_token_ids(tmp_path / "kept", folder)


def test_a_folder_without_added_tokens_keeps_the_hash_it_was_recorded_with(model, tmp_path):
    """Checkpoints and prepared folders recorded the tokenizer file's own hash: a folder that adds no tokens past the
    pieces (LLaMA-2's tokenizer_config.json names <unk>, <s>, </s>, ids 0-2, as added tokens) keeps it, and so does a
    tokenizer.json's folder (its added tokens are in the file)."""
    import hashlib

    from epas_lightning.data.tokenizer import RecordedTokenizer, tokenizer_sha256
    from epas_lightning.hf.sentencepiece_json import sentencepiece_tokenizer

    folder = tmp_path / "llama2"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    decoder = {str(i): {"content": text, "special": True} for i, text in enumerate(("<unk>", "<s>", "</s>"))}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": decoder, "eos_token": "</s>"}))
    json_folder = added_folder(tmp_path / "json", model, "tokenizer_config.json")
    sentencepiece_tokenizer(model).save(str(json_folder / "tokenizer.json"))
    for file in (folder / "tokenizer.model", model, json_folder / "tokenizer.json"):
        old = hashlib.sha256(file.read_bytes()).hexdigest()
        assert load_tokenizer(file).sha256 == tokenizer_sha256(file) == old
        assert not RecordedTokenizer(file, old).changed()


def test_a_prepared_folder_whose_added_tokens_are_edited_is_refused(model, tmp_path):
    """fit read a prepared folder whose added tokens were edited since prepare with the new ids: '<|plain|>' in its
    documents stood for another token than the edited tokenizer reads. The folder's record notices it now; a folder
    prepared without added tokens records its file's own hash, as before."""
    import hashlib

    from epas_lightning.data.layout import DataCheckError, check_recorded_tokenizer, load_meta
    from epas_lightning.data.prepare import prepare_dataset

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("ka lo<|plain|> mine\n" * 20)
    (tmp_path / "in" / "b.txt").write_text("su tari<|im_end|> po\n" * 20)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "tokenizer.model").write_bytes(model.read_bytes())
    data = prepare_dataset(tmp_path / "in", tmp_path / "plain_data", plain, val_fraction=0.5, num_workers=1)
    assert load_meta(data)["tokenizer_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    folder = added_folder(tmp_path / "tok", model, "added_tokens.json")
    data = prepare_dataset(tmp_path / "in", tmp_path / "data", folder, val_fraction=0.5, num_workers=1)
    check_recorded_tokenizer(data, "data")
    (data / "added_tokens.json").write_text(json.dumps({"<|new|>": PIECES + 3}))
    with pytest.raises(DataCheckError, match="or the added tokens named beside it"):
        check_recorded_tokenizer(data, "data")


@pytest.mark.parametrize(
    ("template", "contents"),
    [
        ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}", ["\ue000bos_tok", "en0\ue001"]),
        ("{{ bos_token }}{% for m in messages %}{{ m['content'] | lower }}{% endfor %}", ["\ue000BOS_TOKEN0\ue001"]),
    ],
)
def test_no_message_text_makes_the_mark_of_a_regular_bos(model, tmp_path, template, contents):
    """A regular-token BOS is rendered as a mark no message holds, but two messages joined by the template (or a
    message changed by a filter) could write that mark: it was read as the BOS id, in the middle of the user's text."""
    folder = added_folder(tmp_path / "tok", model, "tokenizer_config.json")
    tokenizer = load_tokenizer(folder, bos_token="nel")
    ids = chat_prompt_ids(template, [{"role": "user", "content": text} for text in contents], tokenizer)
    assert ids.count(tokenizer.bos_id) == 1 and ids[0] == tokenizer.bos_id


def test_special_added_tokens_past_the_model_s_rows_are_dropped_not_refused(model, tmp_path, caplog):
    """A folder adding a special token past the model's embedding rows (LLaMA-2 fine-tunes' '<pad>' = 32000 on a
    32000-row model) loads in transformers, which never emits it: check_fits refused the model since such tokens
    count in vocab_size (it fitted before they did). A special token is never read from text, so it is dropped with a
    warning; a non-special one (text reads as it) is still refused, naming it and what to do."""
    from epas_lightning.errors import DataError

    folder = tmp_path / "pad"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.read_bytes())
    (folder / "added_tokens.json").write_text(json.dumps({"<pad>": PIECES}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    tokenizer = load_tokenizer(folder)
    tokenizer.check_fits(PIECES)
    assert (tokenizer.vocab_size, tokenizer.added) == (PIECES, {}) and "<pad>" in caplog.text
    assert PIECES not in control_token_encoder(tokenizer)("ka<pad>")
    plain = added_folder(tmp_path / "plain", model, "tokenizer_config.json")
    with pytest.raises(DataError, match=r"'<\|plain\|>'.*past the model's 302 rows") as refused:
        load_tokenizer(plain).check_fits(PIECES + 2)
    assert "\n" not in str(refused.value)


def bpe_folder(folder: Path, special: tuple[str, ...] = (), plain: tuple[str, ...] = ()) -> Path:
    """A folder holding a tiny byte-level BPE ``tokenizer.json`` of :data:`PIECES` ids and the ``special`` and
    ``plain`` added tokens after them, in that order (as a fine-tune's ``tokenizer.json`` adds its ``<pad>``)."""
    from epas_lightning.data.tokenizer import train_byte_level_bpe

    pipeline = train_byte_level_bpe([f"ka{i} lo{i * 7} mine{i * 13}" for i in range(400)], PIECES)
    assert pipeline.get_vocab_size() == PIECES
    pipeline.add_special_tokens(list(special))
    pipeline.add_tokens(list(plain))
    folder.mkdir()
    pipeline.save(str(folder / "tokenizer.json"))
    return folder


def test_a_tokenizer_json_s_special_added_tokens_past_the_model_s_rows_are_dropped_not_refused(tmp_path, caplog):
    """The same fine-tune shipped as a tokenizer.json ('<pad>' = 300 in its added_tokens, special, on a 300-row model)
    was refused by check_fits with advice to pass the tokenizer the model trained with: the one passed. It is dropped
    as a sentencepiece folder's is (one warning; not a stop id, nor an id of a chat template's '<pad>' text, nor an id
    generation may emit); a non-special one, and a BOS past the rows, are still refused."""
    from epas_lightning.errors import DataError

    folder = bpe_folder(tmp_path / "pad", special=("<pad>",))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, PIECES]}))
    tokenizer = load_tokenizer(folder)
    assert (tokenizer.vocab_size, tokenizer.stop_ids) == (PIECES + 1, (1, PIECES))
    tokenizer.check_fits(PIECES)
    assert (tokenizer.vocab_size, tokenizer.stop_ids) == (PIECES, (1,)) and "'<pad>'" in caplog.text
    assert PIECES not in control_token_encoder(tokenizer)("ka<pad>") and PIECES not in tokenizer.encode("ka<pad>")
    assert tokenizer.decode(tokenizer.encode("ka lo<pad>")) == "ka lo<pad>"
    plain = bpe_folder(tmp_path / "plain", special=("<pad>",), plain=("<|plain|>",))
    with pytest.raises(DataError, match=r"'<\|plain\|>'.*past the model's 300 rows") as refused:
        load_tokenizer(plain).check_fits(PIECES)
    assert "\n" not in str(refused.value)
    with pytest.raises(DataError, match="301 tokens but the model's vocab_size is 300"):
        load_tokenizer(folder, bos_token="<pad>").check_fits(PIECES)


def test_serve_s_tokenizer_drops_the_special_added_tokens_past_the_model_s_rows(tmp_path, monkeypatch):
    """serve checked the tokenizer at startup, but its HTTP process and inference worker loaded it again unchecked:
    '<pad>' past the model's 300 rows was back (301 ids: the worker's engine refused the model at startup, and a
    prompt of token ids could hold 300). They get the checked tokenizer."""
    from epas_lightning import Llama, LlamaConfig
    from epas_lightning.region import TrainedRegion
    from epas_lightning.serve.engine import Engine
    from epas_lightning.serve.model_card import ServedModel

    folder = bpe_folder(tmp_path / "pad", special=("<pad>",))
    config = LlamaConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=PIECES, block_size=16)
    region = TrainedRegion(2)
    served = ServedModel("m", config, region, 0, folder / "tokenizer.json", 0, 1, 8, 1, 2**20, 0)
    fitted = []
    check_fits = TextTokenizer.check_fits
    monkeypatch.setattr(
        TextTokenizer, "check_fits", lambda self, *a, **k: fitted.append(1) or check_fits(self, *a, **k)
    )
    tokenizer = served.tokenizer()
    assert (tokenizer.vocab_size, tokenizer.stop_ids) == (PIECES, (1,))
    assert served.tokenizer() is tokenizer and len(fitted) == 1  # once per process, not at every request
    assert Engine.for_tokenizer(Llama(config).eval(), region, tokenizer).vocab_size == PIECES


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_an_export_ships_no_special_added_token_past_the_model_s_rows(model, tmp_path, kind, caplog):
    """check_fits dropped '<pad>' (special, past the model's 301 rows) but export shipped the folder's tokenizer with
    it: transformers' tokenizer of the export read a chat's '<pad>' text as id 301, which the model has no row for.
    The exported files hold the tokens our loader kept (the same ids), and the source folder is left as it was."""
    transformers = pytest.importorskip("transformers")
    from model_dirs import save_consolidated

    from epas_lightning import Llama, LlamaConfig
    from epas_lightning.hf.export import export

    rows = PIECES + 1
    config = LlamaConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=rows, block_size=16)
    tokens = {"chat_template": CHATML, "pad_token": "<pad>"}
    if kind == "sentencepiece":
        source = save_consolidated(Llama(config), tmp_path / "ckpt", model, 1, 2)
        (source / "added_tokens.json").write_text(json.dumps({"<|im_end|>": PIECES, "<pad>": PIECES + 1}))
        decoder = {str(PIECES + i): {"content": t, "special": True} for i, t in enumerate(("<|im_end|>", "<pad>"))}
        tokens["added_tokens_decoder"] = decoder
    else:
        bpe = bpe_folder(tmp_path / "bpe", special=("<|im_end|>", "<pad>"))
        source = save_consolidated(Llama(config), tmp_path / "ckpt", bpe / "tokenizer.json", 0, 1)
    (source / "tokenizer_config.json").write_text(json.dumps(tokens))
    before = {path.name: path.read_bytes() for path in source.iterdir()}
    ours = load_tokenizer(source)
    ours.check_fits(rows)
    assert ours.vocab_size == rows and ours.token_id("<|im_end|>") == PIECES  # '<pad>' dropped, '<|im_end|>' kept

    export(source, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert {path.name: path.read_bytes() for path in source.iterdir()} == before
    assert max(hf.encode("<|im_start|>ka<pad> lo<|im_end|><pad>", add_special_tokens=False)) < rows
    assert len(hf) == rows and hf.convert_ids_to_tokens(list(range(rows))) == [ours.id_to_token(i) for i in range(rows)]
    assert hf.encode("ka<|im_end|>", add_special_tokens=False)[-1] == PIECES


def test_serve_warns_of_a_dropped_token_once_across_its_processes(tmp_path, monkeypatch, caplog):
    """serve said '<pad> ... dropped' at startup, again in its HTTP process and again in its inference worker (spawned:
    it gets the served model pickled): three times for one tokenizer. It is said once per tokenizer now, by the first
    fit in the process tree; another tokenizer's drop is still said."""
    import pickle

    from model_dirs import save_consolidated

    from epas_lightning import Llama, LlamaConfig
    from epas_lightning.checkpoint import describe_checkpoint
    from epas_lightning.data import tokenizer as tokenizer_module
    from epas_lightning.inference.generate_cli import resolve_tokenizer
    from epas_lightning.serve.model_card import ServedModel

    monkeypatch.setattr(tokenizer_module, "_DROPS_WARNED", set(), raising=False)
    monkeypatch.setattr(tokenizer_module, "_LOADED", {})
    config = LlamaConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=PIECES, block_size=16)
    folder = bpe_folder(tmp_path / "pad", special=("<pad>",))
    recorded = describe_checkpoint(save_consolidated(Llama(config), tmp_path / "ckpt", folder / "tokenizer.json"))
    served = ServedModel.build(recorded, resolve_tokenizer(recorded, None), "m", None, None, 1)  # startup
    assert served.tokenizer().vocab_size == PIECES  # the HTTP process (forked: what startup said is said)
    worker = pickle.loads(pickle.dumps(served))
    monkeypatch.setattr(tokenizer_module, "_DROPS_WARNED", set(), raising=False)  # spawned: a fresh process
    monkeypatch.setattr(tokenizer_module, "_LOADED", {})
    assert worker.tokenizer().vocab_size == PIECES
    assert len([r for r in caplog.records if "'<pad>'" in r.getMessage()]) == 1
    other = bpe_folder(tmp_path / "other", special=("<pad>",))
    load_tokenizer(other).check_fits(PIECES)
    assert len([r for r in caplog.records if "'<pad>'" in r.getMessage()]) == 2


def test_a_dropped_token_is_warned_of_once_whichever_path_reaches_its_tokenizer(tmp_path, monkeypatch, caplog):
    """The drop warning was keyed by the path as given: the same tokenizer reached by a relative and an absolute path,
    or through a symlink, warned twice. It is keyed by the resolved path."""
    from epas_lightning.data import tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module, "_DROPS_WARNED", set())
    folder = bpe_folder(tmp_path / "pad", special=("<pad>",))
    (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for path in (folder / "tokenizer.json", Path("pad/tokenizer.json"), Path("link"), Path("link/../pad")):
        load_tokenizer(path).check_fits(PIECES)
    assert len([r for r in caplog.records if "'<pad>'" in r.getMessage()]) == 1


NAMING = "[{{ pad_token }}|{{ unk_token }}|{{ mask_token }}]"
"""A template line writing the named special tokens besides BOS and EOS."""


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_an_export_names_the_special_tokens_its_source_folder_names(model, tmp_path, kind):
    """export named BOS and EOS only: the source's pad_token, unk_token and additional_special_tokens were None in
    transformers' tokenizer of the export, and a template writing them rendered '[|...]' where ours rendered
    '[<|im_end|>|...]'. They are named as our loader kept them; '<pad>', dropped past the model's rows, is not."""
    transformers = pytest.importorskip("transformers")
    from epas_lightning.hf.export import export_tokenizer

    named = {"pad_token": "<|im_end|>", "mask_token": "<pad>", "additional_special_tokens": ["<|im_start|>", "<pad>"]}
    if kind == "sentencepiece":
        source = added_folder(tmp_path / "tok", model, "tokenizer_config.json", unk_token="<unk>", **named)
        config = json.loads((source / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"][str(PIECES + 3)] = {"content": "<pad>", "special": True}
        rows = PIECES + 3
    else:
        source = bpe_folder(tmp_path / "tok", special=("<|im_end|>", "<|im_start|>", "<pad>"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<|im_start|>", **named}
        rows = PIECES + 2
    template = NAMING + CHATML
    (source / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    ours = load_tokenizer(source)
    ours.check_fits(rows)
    (tmp_path / "hf").mkdir()
    export_tokenizer(source, tmp_path / "hf", 64, ours.bos_id, ours.eos_id, rows)

    hf, theirs = (transformers.AutoTokenizer.from_pretrained(folder) for folder in (tmp_path / "hf", source))
    assert (hf.pad_token, hf.unk_token) == (theirs.pad_token, theirs.unk_token) != (None, None)
    assert hf.mask_token is None and max(hf.convert_tokens_to_ids(hf.all_special_tokens)) < rows
    assert "<|im_start|>" in hf.all_special_tokens and "<pad>" not in hf.all_special_tokens
    messages = [{"role": "user", "content": "ka lo"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(f"[<|im_end|>|{theirs.unk_token}|]")
    ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids == chat_prompt_ids(template, messages, ours)
