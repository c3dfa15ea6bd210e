"""lm-eval-harness on our checkpoints: the same metrics as lm-eval's `hf` model on the export, at any region; the
`lm-eval` command; the multiple-choice fallback of `evaluate` equal to lm-eval. Tiny models, local tasks, offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import strict_json
from model_dirs import save_consolidated

from epas_lightning import Llama, LlamaConfig
from epas_lightning.checkpoint import load_model
from epas_lightning.cli import main as cli_main
from epas_lightning.data import load_tokenizer
from epas_lightning.errors import ConfigError, DataError
from epas_lightning.evaluation.harness import metric_columns
from epas_lightning.evaluation.lm_eval_documents import check_documents

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[1]
WORDS = ["def", "return", "import", "class", "self", "value", "list", "dict", "None", "True", "False", "for", "in"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


def words(i: int, n: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(n))


def task_yaml(name: str, data: Path, cache: Path, body: str) -> str:
    return (
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {cache}\n"
        f"test_split: test\n{body}"
    )


MULTIPLE_CHOICE = """output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:  # as the README's task YAML
  - {metric: acc, aggregation: mean, higher_is_better: true}
  - {metric: acc_norm, aggregation: mean, higher_is_better: true}
"""
ROLLING = """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
GENERATE = """output_type: generate_until
doc_to_text: context
doc_to_target: answer
generation_kwargs: {until: ["\\n", " if"], max_gen_toks: 8, do_sample: false}
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Local tasks: multiple choice (trailing spaces, a newline, a context longer than the model's 32 tokens),
    rolling log-likelihood over documents of several windows, and greedy generation."""
    root = tmp_path_factory.mktemp("tasks")
    questions = [
        {"context": words(i, 2 + i % 5), "choices": [" " + words(i + k, 1 + k % 3) for k in range(3)], "label": i % 3}
        for i in range(10)
    ]
    questions += [
        {"context": "def f(x): ", "choices": ["return x", "pass", "import os"], "label": 0},
        {"context": "class A:\n", "choices": ["    pass", "    def", "x"], "label": 0},
        {"context": words(3, 40), "choices": [" else", " import os"], "label": 1},
    ]
    documents = [{"text": words(i, 5 + 17 * i)} for i in range(5)]
    prompts = [{"context": words(i, 1 + i), "answer": " x"} for i in range(5)]
    for name, rows, body in (
        ("tiny_mc", questions, MULTIPLE_CHOICE),
        ("tiny_ppl", documents, ROLLING),
        ("tiny_gen", prompts, GENERATE),
    ):
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        (root / f"{name}.yaml").write_text(task_yaml(name, data, root / "cache", body))
    return root


@pytest.fixture(scope="module")
def checkpoint(tiny_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer model trained (here: set) with the deepest 2 layers sharing; vocabulary 512 padded to 576 rows."""
    torch.manual_seed(0)
    config = LlamaConfig(
        n_layer=4, n_embd=64, n_head=4, n_kv_head=2, vocab_size=512, padded_vocab_size=576, block_size=32, init_std=0.1
    )
    model = Llama(config).eval()
    model.set_shared_layers([2, 3])
    tokenizer = load_tokenizer(tiny_corpus / "tokenizer.json")
    path = tmp_path_factory.mktemp("ckpt") / "model"
    return save_consolidated(model, path, tiny_corpus / "tokenizer.json", tokenizer.bos_id, tokenizer.eos_id)


@pytest.fixture(scope="module")
def exports(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """``export`` at region 0 (stock LLaMA) and at the trained region 2 (trust_remote_code)."""
    from epas_lightning.hf.export import export

    root = tmp_path_factory.mktemp("exports")
    return {n: export(checkpoint, root / f"hf{n}", sharing_layers=n) for n in (0, 2)}


def evaluate(
    model: str, model_args: dict, tasks: Path, names: list[str], limit: int | None = None, **options: Any
) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=names, task_manager=manager, batch_size=4, bootstrap_iters=0,
        limit=limit, **options,
    )  # fmt: skip


def generations(result: dict) -> list:
    return [sample["resps"] for sample in result["samples"]["tiny_gen"]]


@pytest.mark.parametrize("n", [0, 2])
def test_lm_eval_scores_our_checkpoint_as_hf_scores_its_export(checkpoint, exports, tasks, n: int) -> None:
    import epas_lightning.evaluation.lm_eval_adapter  # noqa: F401 - registers "epas"

    names = ["tiny_mc", "tiny_ppl", "tiny_gen"]
    ours = evaluate("epas", {"checkpoint": str(checkpoint), "sharing_layers": n, "device": "cpu"}, tasks, names)
    theirs = evaluate("hf", {"pretrained": str(exports[n]), "device": "cpu", "trust_remote_code": True}, tasks, names)
    assert (exports[n] / "modeling_epas_llama.py").is_file() == (n > 0)  # region 0: a stock LlamaForCausalLM
    assert ours["config"]["shared_layers"] == [3, 2][:n]
    metrics, expected = metric_columns(ours["results"]), metric_columns(theirs["results"])
    assert metrics == pytest.approx(expected, rel=1e-6) and len(metrics) == 6
    for exact in ("tiny_mc/acc", "tiny_mc/acc_norm"):
        assert metrics[exact] == expected[exact]
    assert generations(ours) == generations(theirs) and any(text for [[text]] in generations(ours))
    assert ours["n-samples"] == theirs["n-samples"] and ours["n-samples"]["tiny_mc"]["effective"] == 13
    assert 1 < metrics["tiny_ppl/byte_perplexity"] < 512


def test_regions_change_the_scores_and_the_tokenizer_is_the_exports(checkpoint, exports) -> None:
    import transformers
    from lm_eval.api.instance import Instance

    from epas_lightning.evaluation.lm_eval_adapter import EPASLM
    from epas_lightning.evaluation.multiple_choice import encode_pair, score_continuations

    lm = EPASLM(str(checkpoint), sharing_layers=0, device="cpu", batch_size=3)
    exported = transformers.AutoTokenizer.from_pretrained(exports[0])
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    for text in ("def f(x):", " leading", "two  spaces\nand a line"):
        assert lm.tok_encode(text) == exported.encode(text)
        assert exported.encode(text)[0] == tokenizer.bos_id  # the export starts every text with BOS, as trained
    text = "x <|eos|> y"  # special-token text is text, as training read it (the export sets split_special_tokens)
    assert lm.tok_encode(text) == [tokenizer.bos_id, *tokenizer.encode(text)]
    pairs = [("def f(x): ", "return x"), ("", "import os"), ("class A:\n", "    pass"), (words(1, 40), " else")]
    pairs += [("<|bos|>def f(x): ", "return x")]  # lm-eval adds no BOS to a text that starts with its text
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    dense = lm.loglikelihood(requests)
    # the fallback scorer of `evaluate --tasks` builds and scores the same requests
    fallback = score_continuations(lm.loaded.model, [encode_pair(tokenizer, *pair) for pair in pairs], batch_size=2)
    assert [s for s, _ in fallback] == pytest.approx([s for s, _ in dense], abs=1e-4)
    assert [g for _, g in fallback] == [g for _, g in dense]
    lm.set_sharing_layers(2)
    assert lm.loaded.model.sharing.shared_layers == [2, 3]
    assert all(abs(a[0] - b[0]) > 1e-6 for a, b in zip(lm.loglikelihood(requests), dense, strict=True))
    with pytest.raises(ConfigError, match="trained with at most 2 sharing layers"):
        lm.set_sharing_layers(3)
    short = EPASLM(str(checkpoint), sharing_layers=2, device="cpu", max_length=16)  # was a TypeError: given twice
    assert short.max_length == 16 and lm.max_length == 32
    with pytest.raises(ConfigError, match="from 1 to the model's context length \\(32\\), got 33 — max_length — "):
        EPASLM(str(checkpoint), device="cpu", max_length=33)
    for n in ("all", 1.7):  # a ValueError traceback from int(), and a silent region of 1
        with pytest.raises(
            ConfigError, match=f"a region length is a number of sharing layers, got {n!r} — sharing_lay"
        ):
            EPASLM(str(checkpoint), sharing_layers=n, device="cpu")


def test_the_fallback_reads_control_tokens_as_lm_eval_does_for_a_chat_model(checkpoint, tmp_path, monkeypatch) -> None:
    """A chat template beside the tokenizer makes the export read special-token text as the control token (a context
    rendered with the template: ``<|bos|>user: hi<|eos|>``), so lm-eval does; `evaluate --tasks` read it as text and
    gave other log-likelihoods than `lm-eval` on the same questions."""
    import shutil

    from lm_eval.api.instance import Instance

    from epas_lightning.evaluation import multiple_choice
    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    chat = shutil.copytree(checkpoint, tmp_path / "chat")
    (chat / "chat_template.jinja").write_text("{% for m in messages %}<|bos|>{{ m['content'] }}<|eos|>{% endfor %}")
    lm = EPASLM(str(chat), device="cpu")
    tokenizer = load_tokenizer(chat / "tokenizer.json")
    pairs = [("<|bos|>user: hi<|eos|><|bos|>assistant:", " def"), ("x <|eos|> y", " import"), ("plain", " text")]
    expected = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    requests = [multiple_choice.encode_pair(tokenizer, *pair) for pair in pairs]
    assert requests[1][0] == [tokenizer.bos_id, *tokenizer.encode("x "), tokenizer.eos_id, *tokenizer.encode(" y")]
    scores = multiple_choice.score_continuations(lm.loaded.model, requests)
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in expected], abs=1e-4)
    built, score = [], multiple_choice.score_continuations  # evaluate_task builds the same requests
    monkeypatch.setattr(multiple_choice, "score_continuations", lambda m, r, b: built.extend(r) or score(m, r, b))
    questions = [multiple_choice.Question(context, [choice, " other"], 0) for context, choice in pairs]
    multiple_choice.evaluate_task(lm.loaded.model, tokenizer, questions)
    assert built[::2] == requests
    plain = load_tokenizer(checkpoint / "tokenizer.json")  # without a template: that text is text, as trained
    assert multiple_choice.encode_pair(plain, *pairs[1])[0] == [plain.bos_id, *plain.encode("x <|eos|> y")]


def test_each_request_kind_equals_hf_on_the_export_at_any_batch_size_and_order(checkpoint, exports) -> None:
    """Request by request, at the trained region: empty contexts (BOS), trailing spaces, continuations of several
    tokens, contexts past the 32-token window (cut from the left), is_greedy, documents of several rolling windows,
    and generation from prompts of different lengths; batch size 1, or 5 in reverse order, changes no number."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    pairs = [("", " import os"), ("def f(x): ", "return x"), ("x  ", " None"), (words(2, 30), " for in list dict")]
    pairs += [(words(4, 3), words(5, 6)), ("\n", "def")]
    documents = [words(6, 4), words(7, 45)]  # the second repeats: windows of the same tokens (the cache misread)
    until = ["\n", " in"]
    prompts = [(words(i, 2 + 9 * i), {"until": until, "max_gen_toks": 4 + i, "do_sample": False}) for i in range(3)]

    def scores(lm, batch_size: int, order: list[int]) -> list:  # noqa: ANN001
        lm.batch_size_per_gpu = batch_size
        run = [
            (lm.loglikelihood, [("loglikelihood", pair) for pair in pairs]),
            (lm.loglikelihood_rolling, [("loglikelihood_rolling", (doc,)) for doc in documents]),
            (lm.generate_until, [("generate_until", prompt) for prompt in prompts]),
        ]
        results = []
        for method, requests in run:
            picked = [i for i in order if i < len(requests)]
            out = method([Instance(requests[i][0], {}, requests[i][1], i) for i in picked], disable_tqdm=True)
            results.append(dict(zip(picked, out, strict=True)))
        return results

    hf = HFLM(pretrained=str(exports[2]), device="cpu", trust_remote_code=True)
    ours = EPASLM(str(checkpoint), sharing_layers=2, device="cpu")
    order = list(range(len(pairs)))
    expected = scores(hf, 1, order)
    for batch_size, requests in ((1, order), (5, order[::-1])):
        loglikelihoods, rolling, generated = scores(ours, batch_size, requests)
        for i, (score, greedy) in expected[0].items():
            assert loglikelihoods[i] == (pytest.approx(score, rel=1e-5), greedy)
        assert rolling == pytest.approx(expected[1], rel=1e-5)
        assert generated == expected[2]


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    """Another model's larger tokenizer scored with ids past the vocabulary: an IndexError deep inside lm-eval."""
    from epas_lightning.data.tokenizer import train_byte_level_bpe
    from epas_lightning.errors import DataError
    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    other = tmp_path / "tokenizer.json"
    train_byte_level_bpe([f"w{i} v{i * 7} z{i * 13}" for i in range(3000)], 700).save(str(other))
    with pytest.raises(DataError, match=f"tokens but the model's vocab_size is 512 — {other} — "):
        EPASLM(str(checkpoint), tokenizer=str(other), device="cpu")


def test_errors_from_python_name_the_model_arguments(checkpoint: Path, tasks: Path, tmp_path: Path) -> None:
    """From Python (EPASLM(...), model_args "checkpoint=...") the checkpoint's errors named the command's flags
    (--checkpoint PATH, --device, --tokenizer); the command's own errors keep them (test_lm_eval_command_errors)."""
    import shutil

    from epas_lightning.errors import CheckpointError
    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    missing = tmp_path / "missing"
    with pytest.raises(CheckpointError, match=f"^checkpoint does not exist — checkpoint={missing} — check the path$"):
        evaluate("epas", f"checkpoint={missing},device=cpu", tasks, ["tiny_mc"])
    with pytest.raises(ConfigError, match=" — device=cuda:7 — use "):
        EPASLM(str(checkpoint), device="cuda:7")
    untokenized = shutil.copytree(checkpoint, tmp_path / "m")
    (untokenized / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=f"is gone .* — checkpoint={untokenized} — pass tokenizer=PATH \\(the "):
        EPASLM(str(untokenized), device="cpu")


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        ({"do_sample": True, "temperature": 0.7}, {"temperature": 0.7, "top_k": 50, "top_p": None}),
        ({"do_sample": True, "temperature": 1.0, "top_k": 0}, {"temperature": 1.0, "top_k": None, "top_p": None}),
        # null is no cut: transformers' generate(top_k=None) replaces its default 50 (5.24: no top-k warper)
        ({"do_sample": True, "temperature": 1.0, "top_k": None}, {"temperature": 1.0, "top_k": None, "top_p": None}),
        (
            {"do_sample": True, "temperature": 1.0, "top_k": 5, "top_p": 0.9},
            {"temperature": 1.0, "top_k": 5, "top_p": 0.9},
        ),
        ({"do_sample": False, "top_k": 5}, {"temperature": 0.0, "top_k": None, "top_p": None}),
        ({"do_sample": False, "num_beams": 1, "use_cache": False}, {"temperature": 0.0, "top_k": None, "top_p": None}),
        # transformers' nucleus cut keeps the most likely token at top_p 0 (greedy), and cuts nothing at 1 or more
        ({"do_sample": True, "temperature": 0.7, "top_p": 0}, {"temperature": 0.0, "top_k": None, "top_p": None}),
        ({"do_sample": True, "temperature": 0.7, "top_p": 1.5}, {"temperature": 0.7, "top_k": 50, "top_p": None}),
    ],
)
def test_generation_samples_as_transformers_samples_the_export(checkpoint: Path, monkeypatch, task, expected) -> None:
    """A task's `top_k: 0` (transformers: no top-k cut) was refused, and sampling without `top_k` drew from every token
    where transformers' `generate` keeps its default 50 for the export (its generation_config.json sets none); `top_p`
    0 and above 1 (transformers: greedy, no cut) were refused."""
    from epas_lightning.evaluation import lm_eval_adapter

    asked, generate = [], lm_eval_adapter.generate

    def recording(model, rows, max_new_tokens, **kwargs):  # noqa: ANN001, ANN003
        asked.append({key: kwargs[key] for key in expected})
        return generate(model, rows, max_new_tokens, **kwargs)

    lm = lm_eval_adapter.EPASLM(str(checkpoint), device="cpu")
    monkeypatch.setattr(lm_eval_adapter, "generate", recording)
    out = lm._model_generate(torch.tensor([[1, 5, 9]]), 6, [], **task)
    assert asked == [expected] and out.shape == (1, 6)


@pytest.mark.parametrize(
    ("task", "refused"),
    [
        ({"do_sample": True}, "samples \\(do_sample: true\\) at temperature 0, which transformers'"),
        ({"do_sample": True, "temperature": 0.0, "top_p": 0}, "samples \\(do_sample: true\\) at temperature 0"),
        # a stock task (code_x_glue code-text) searches 10 beams: it was decoded greedily without a word
        ({"do_sample": False, "num_beams": 10}, "asks for num_beams: 10, which this model's decoding does not do"),
        ({"do_sample": False, "repetition_penalty": 1.2}, "asks for repetition_penalty: 1.2, which"),
    ],
)
def test_decoding_that_transformers_would_not_do_alike_is_refused(checkpoint: Path, task: dict, refused: str) -> None:
    """A task that samples at temperature 0 (or none: HFLM passes 0) was decoded greedily, its output scored as samples,
    where transformers' generate raises for the export; beam search and other settings were ignored."""
    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    lm = EPASLM(str(checkpoint), device="cpu")
    with pytest.raises(ConfigError, match=refused):
        lm._model_generate(torch.tensor([[1, 5, 9]]), 6, [], **task)


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(list(argv))
    out = capsys.readouterr()
    if rc == 2:
        assert out.err.startswith("error: ") and out.err.count("\n") == 1, out.err  # one line, no traceback
    return rc, out.out, out.err


def test_lm_eval_command_sweeps_regions_and_equals_the_fallback(checkpoint, tasks, tmp_path, capsys) -> None:
    base = ["--checkpoint", str(checkpoint), "--sharing-layers", "all", "--json"]
    rc, out, _ = run_cli(
        capsys, "lm-eval", *base, "--tasks", str(tasks / "tiny_mc.yaml"), "--include-path", str(tasks),
        "--tasks", "tiny_p*", "--bootstrap-iters", "0", "--batch-size", "4", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert rc == 0
    rows = json.loads(out.strip().splitlines()[-1])
    assert [row["shared_layers"] for row in rows] == [[], [3], [3, 2]]  # in growth order
    assert {"tiny_mc/acc", "tiny_mc/acc_norm", "tiny_ppl/word_perplexity", "tiny_ppl/bits_per_byte"} <= set(rows[0])
    assert "| sharing_layers |" in out
    written = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert written["rows"] == rows and written["runs"]["2"]["results"]["tiny_mc"]["acc,none"] == rows[2]["tiny_mc/acc"]
    assert (tmp_path / "out" / "lm_eval.csv").read_text().splitlines()[0].startswith("sharing_layers,shared_layers,")
    # evaluate's own multiple-choice scorer (no lm-eval needed) gives lm-eval's numbers on the same questions
    rc, out, _ = run_cli(capsys, "evaluate", *base, "--tasks", str(tasks / "tiny_mc.jsonl"), "--device", "cpu")
    assert rc == 0
    fallback = json.loads(out.strip().splitlines()[-1])
    assert [(r["tiny_mc/acc"], r["tiny_mc/acc_norm"]) for r in fallback] == [
        (r["tiny_mc/acc"], r["tiny_mc/acc_norm"]) for r in rows
    ]
    # the output exists now: refused before any scoring
    rc, _, err = run_cli(capsys, "lm-eval", *base, "--tasks", "tiny_mc", "--output", str(tmp_path / "out"))
    assert rc == 2 and "already exists" in err


def test_lm_eval_json_writes_a_non_finite_metric_as_null(tmp_path: Path) -> None:
    """lm_eval.json held lm-eval's NaN (a standard error of one document) as NaN, which jq and JavaScript refuse."""
    from epas_lightning.evaluation.harness import SUMMARY_FILE, write_outputs

    nan, inf = float("nan"), float("inf")
    rows = [{"sharing_layers": 0, "shared_layers": [], "t/acc": 1.0, "t/acc_stderr": nan}]
    runs = {"0": {"results": {"t": {"acc_stderr,none": nan, "ppl,none": inf}}}}
    write_outputs({"rows": rows, "runs": runs}, tmp_path)
    written = strict_json((tmp_path / SUMMARY_FILE).read_text())
    assert written["rows"][0]["t/acc_stderr"] is None
    assert written["runs"]["0"]["results"]["t"] == {"acc_stderr,none": None, "ppl,none": None}


def test_lm_eval_command_errors(checkpoint, tasks, tmp_path, capsys, monkeypatch) -> None:
    argv = ["lm-eval", "--checkpoint", str(checkpoint)]
    rc, _, err = run_cli(
        capsys, "lm-eval", "--checkpoint", str(tmp_path / "no"), "--tasks", str(tasks / "tiny_mc.yaml")
    )
    assert rc == 2 and f"checkpoint does not exist — --checkpoint {tmp_path / 'no'} — " in err, err
    rc, _, err = run_cli(capsys, *argv, "--tasks", str(tmp_path / "missing.yaml"))
    assert rc == 2 and "task file does not exist" in err
    rc, _, err = run_cli(capsys, *argv, "--tasks", "tiny_mc", "--include-path", str(tmp_path / "nowhere"))
    assert rc == 2 and "task folder does not exist" in err
    yaml = tasks / "tiny_mc.yaml"  # a file was said to be a folder that does not exist
    rc, _, err = run_cli(capsys, *argv, "--tasks", "tiny_mc", "--include-path", str(yaml))
    assert rc == 2 and f"error: a file, not a folder of task YAMLs — --include-path {yaml} — pass the" in err, err
    rc, _, err = run_cli(capsys, *argv, "--tasks", str(tasks / "tiny_mc.yaml"), "--sharing-layers", "3")
    assert rc == 2 and "trained with at most 2 sharing layers" in err
    for flag, value in [("--limit", "0"), ("--limit", "-2"), ("--num-fewshot", "-1"), ("--bootstrap-iters", "-5")]:
        rc, _, err = run_cli(capsys, *argv, "--tasks", str(tasks / "tiny_mc.yaml"), flag, value)
        assert rc == 2 and f"— {flag} — " in err, err  # --limit 0 and -2 were lm-eval's ValueError tracebacks
    for name, text in [("broken", "task: [unclosed\n"), ("nameless", "foo: 1\n"), ("list", "- a\n")]:
        (tmp_path / f"{name}.yaml").write_text(text)  # each was a traceback from lm-eval's task loading
        rc, _, err = run_cli(capsys, *argv, "--tasks", str(tmp_path / f"{name}.yaml"))
        assert rc == 2 and "not an lm-eval task file" in err and f"— --tasks {tmp_path / name}.yaml — " in err, err
    gone = tmp_path / "gone.yaml"  # its data file does not exist: a FileNotFoundError traceback from datasets
    gone.write_text(task_yaml("gone", tmp_path / "gone.jsonl", tmp_path / "cache", MULTIPLE_CHOICE))
    rc, _, err = run_cli(capsys, *argv, "--tasks", str(gone))
    assert rc == 2 and "lm-eval could not load the tasks' data (" in err and "gone.jsonl" in err, err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the eval extra were not installed
    monkeypatch.setitem(sys.modules, "accelerate", None)
    rc, _, err = run_cli(capsys, *argv, "--tasks", "tiny_mc")
    assert rc == 2 and "(lm_eval, accelerate missing) — lm-eval — pip install 'epas_lightning[eval]'" in err


def test_more_few_shot_examples_than_a_task_holds_or_a_limit_past_an_index_is_one_line(checkpoint, tasks, capsys):
    """lm-eval's sampler raised "Sample larger than population" (a traceback) for --num-fewshot 50 on 13 questions;
    --limit 1e20 was islice's ValueError."""
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--tasks", str(tasks / "tiny_mc.yaml"), "--device", "cpu"]
    assert cli_main([*argv, "--limit", "1", "--num-fewshot", "50"]) == 2
    err = capsys.readouterr().err  # after the progress bars of lm-eval's data loading
    assert "Traceback" not in err and err.endswith(
        "\nerror: a task has fewer than 50 examples to draw the few-shot ones from — --num-fewshot 50 — lower "
        "--num-fewshot, or leave it out for each task's own\n"
    ), err
    rc, _, err = run_cli(capsys, *argv, "--limit", "1e20")
    assert rc == 2 and err == f"error: must be at most {sys.maxsize}, got 1e+20 — --limit — give a smaller number\n"


def test_a_task_whose_first_document_has_an_empty_choice_is_one_line(checkpoint, tmp_path, capsys) -> None:
    """lm-eval sets a task up from its first document's choices (``choice[0]``): an IndexError traceback."""
    data = tmp_path / "blank.jsonl"
    rows = [
        {"context": "x =", "choices": ["", " 1"], "label": 1},
        {"context": "y =", "choices": [" 2", " 3"], "label": 0},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "blank.yaml").write_text(task_yaml("blank", data, tmp_path / "cache", MULTIPLE_CHOICE))
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--tasks", str(tmp_path / "blank.yaml"), "--device", "cpu"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err  # after the progress bar of lm-eval's data loading
    assert "Traceback" not in err and err.endswith(
        "\nerror: lm-eval cannot set up task blank: its first document has an empty choice — --tasks — give every "
        "choice its text (the separating space included), or leave that document out\n"
    ), err


ANSWERED = {"context": "x =", "choices": [" 2", " 3"], "label": 0}
LABEL_FIX = "give the index of the right choice, 0 to 1, or leave that document out"


@pytest.mark.parametrize(
    ("rows", "said"),
    [
        ([ANSWERED, {**ANSWERED, "choices": [" 1", ""]}], "document 1 (lm-eval's doc_id) has an empty choice, which "
         "lm-eval scores as certain (log-likelihood 0) — --tasks — give every choice its text (the separating space "
         "included), or leave that document out"),
        ([ANSWERED, {**ANSWERED, "label": 2}], f"document 1 (lm-eval's doc_id) has label 2, not one of its 2 choices "
         f"— --tasks — {LABEL_FIX}"),
        ([{**ANSWERED, "label": 5}, ANSWERED], f"document 0 (lm-eval's doc_id) has label 5, not one of its 2 choices "
         f"— --tasks — {LABEL_FIX}"),
    ],
    ids=["an empty choice after the first document", "a label past a later document's choices", "past the first's"],
)  # fmt: skip
def test_a_multiple_choice_document_lm_eval_would_misscore_is_refused_before_scoring(
    checkpoint, tmp_path, capsys, rows, said
) -> None:
    """An empty choice after the first document was scored as certain (log-likelihood 0: it won every question it was
    in, silently); a label past a later document's choices was a warning in lm-eval's log, and the question counted
    wrong; past the first document's, lm-eval's IndexError traceback as it set the task up."""
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "bad.yaml").write_text(task_yaml("bad", data, tmp_path / "cache", MULTIPLE_CHOICE))
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--tasks", str(tmp_path / "bad.yaml"), "--device", "cpu"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err  # after the progress bar of lm-eval's data loading
    assert "Traceback" not in err and err.endswith(f"\nerror: task bad: {said}\n"), err


def test_a_numpy_integer_label_is_an_index_as_lm_eval_scores_it() -> None:
    """lm-eval scores a label a task's ``doc_to_target`` function gives as a NumPy integer as the index it is; the check
    refused it as not one of the choices, and one past the choices was a TypeError traceback from its message."""
    import numpy as np

    config = SimpleNamespace(doc_to_choice="choices", target_delimiter="")
    task = SimpleNamespace(
        OUTPUT_TYPE="multiple_choice",
        config=config,
        doc_to_choice=lambda d: d["choices"],
        doc_to_target=lambda d: d["label"],
    )
    check_documents("numpy", task, [(0, {**ANSWERED, "label": np.int64(1)}), (1, {**ANSWERED, "label": [np.int32(0)]})])
    with pytest.raises(DataError, match=r"task numpy: document 2 \(lm-eval's doc_id\) has label 5, not one of its 2 c"):
        check_documents("numpy", task, [(2, {**ANSWERED, "label": np.int64(5)})])


def test_lm_eval_refuses_logits_that_overflow_float16(checkpoint, tasks, tmp_path, capsys) -> None:
    """float16 activations past 65504 gave NaN log-likelihoods, scored as if they were numbers."""
    loaded = load_model(checkpoint)
    loaded.model.norm.weight.data.fill_(3e4)  # finite weights, activations past 65504
    tokenizer = load_tokenizer(checkpoint / "tokenizer.json")
    overflowing = save_consolidated(loaded.model, tmp_path / "m", checkpoint / "tokenizer.json", tokenizer.bos_id)
    argv = ["lm-eval", "--checkpoint", str(overflowing), "--tasks", str(tasks / "tiny_mc.yaml"), "--dtype", "float16"]
    assert cli_main([*argv, "--device", "cpu"]) == 2
    err = capsys.readouterr().err  # after lm-eval's progress bars
    assert "error: the logits came out NaN or inf: the activations overflow float16" in err and "Traceback" not in err


def test_readme_shell_command_runs_in_a_fresh_process(checkpoint, tasks, tmp_path) -> None:
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "epas_lightning", "lm-eval", "--checkpoint", str(checkpoint), "--tasks",
               "tiny_mc", "--tasks", "tiny_ppl", "--include-path", str(tasks), "--sharing-layers", "2", "--limit", "4",
               "--json"]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # no git here
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fatal:" not in done.stderr, done.stderr  # git's, as lm-eval asked it for the working folder's commit
    (row,) = json.loads(done.stdout.strip().splitlines()[-1])
    assert row["shared_layers"] == [3, 2]  # in growth order
    import epas_lightning.evaluation.lm_eval_adapter  # noqa: F401 - registers "epas"

    # the same scores as lm-eval in this process; the perplexities tell the regions apart where accuracy does not
    args = {"checkpoint": str(checkpoint), "sharing_layers": 2, "device": "cpu"}
    expected = metric_columns(evaluate("epas", args, tasks, ["tiny_mc", "tiny_ppl"], limit=4)["results"])
    assert len(expected) == 5 and {key: row[key] for key in expected} == pytest.approx(expected, rel=1e-9)
    assert (row["tiny_mc/acc"], row["tiny_mc/acc_norm"]) == (expected["tiny_mc/acc"], expected["tiny_mc/acc_norm"])


def lm_eval_into(capsys, checkpoint: Path, tasks: Path, output: Path, *flags: str) -> tuple[dict, dict[str, list]]:
    """`lm-eval` on the local tasks into ``output``: lm_eval.json and the samples files by name."""
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--include-path", str(tasks), "--device", "cpu"]
    rc, _, err = run_cli(capsys, *argv, "--bootstrap-iters", "0", "--output", str(output), *flags)
    assert rc == 0, err
    samples = {
        path.name: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for path in sorted(output.glob("samples_*.jsonl"))
    }
    return json.loads((output / "lm_eval.json").read_text()), samples


def test_log_samples_writes_each_task_and_region_into_the_output(checkpoint, tasks, tmp_path, capsys) -> None:
    """lm-eval's --log_samples was missing: the per-document prompts, responses and scores, beside the results."""
    flags = ["--tasks", "tiny_mc", "--tasks", "tiny_gen", "--sharing-layers", "all", "--limit", "3", "--log-samples"]
    summary, samples = lm_eval_into(capsys, checkpoint, tasks, tmp_path / "out", *flags)
    assert sorted(samples) == sorted(f"samples_{t}_sharing{n}.jsonl" for t in ("tiny_mc", "tiny_gen") for n in range(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # built in a hidden folder, renamed into place
    assert "samples" not in summary
    for n, row in enumerate(summary["rows"]):
        mc = samples[f"samples_tiny_mc_sharing{n}.jsonl"]
        assert [s["doc_id"] for s in mc] == [0, 1, 2] and row["tiny_mc/acc"] == sum(s["acc"] for s in mc) / 3
        assert mc[0]["arguments"]["gen_args_0"]["arg_1"] in mc[0]["doc"]["choices"]  # lm-eval's sanitized form
        assert isinstance(mc[0]["target"], str) and len(mc[0]["resps"]) == 3  # one per choice
        generated = samples[f"samples_tiny_gen_sharing{n}.jsonl"]
        assert row["tiny_gen/exact_match"] == sum(s["exact_match"] for s in generated) / 3
    rc, _, err = run_cli(capsys, "lm-eval", "--checkpoint", str(checkpoint), "--tasks", "tiny_mc", "--log-samples")
    assert rc == 2 and "error: the samples are written into the --output folder, and none was given — --log-sa" in err


def test_a_seed_reproduces_sampled_generations_and_few_shot_draws(checkpoint, tasks, tmp_path, capsys) -> None:
    """lm-eval's --seed was missing (every run took lm-eval's default seeds); --gen-kwargs turns the greedy task into
    a sampling one, so the seed decides the generations, and the few-shot examples drawn."""
    flags = ["--tasks", "tiny_gen", "--tasks", "tiny_mc", "--num-fewshot", "2", "--limit", "4", "--log-samples"]
    flags += ["--sharing-layers", "2"]
    flags += ["--gen-kwargs", '{"do_sample": true}', "--gen-kwargs", 'temperature=1,until=["]"]']
    runs = {
        name: lm_eval_into(capsys, checkpoint, tasks, tmp_path / name, *flags, "--seed", seed)
        for name, seed in (("a", "7"), ("b", "7"), ("c", "8"))
    }
    (first, first_samples), (again, again_samples), (other, other_samples) = runs.values()
    assert first["rows"] == again["rows"] and first_samples == again_samples

    def seen(samples: dict, task: str, key: str) -> list:
        return [s[key] if key == "resps" else s["arguments"] for s in samples[f"samples_{task}_sharing2.jsonl"]]

    assert seen(first_samples, "tiny_gen", "resps") != seen(other_samples, "tiny_gen", "resps")
    assert seen(first_samples, "tiny_mc", "prompt") != seen(other_samples, "tiny_mc", "prompt")  # other examples drawn
    config = first["runs"]["2"]["config"]
    assert [config[k] for k in ("random_seed", "numpy_seed", "torch_seed", "fewshot_seed")] == [7, 7, 7, 7]
    assert config["gen_kwargs"] == {"do_sample": True, "temperature": 1, "until": ["]"]}  # as typed
    assert first_samples["samples_tiny_gen_sharing2.jsonl"][0]["arguments"]["gen_args_0"]["arg_1"]["do_sample"]


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (None, [None, None, None, None]),  # lm-eval's `seed: null`: unseeded
        ("42", [42, 42, 42, 42]),
        ("0,None,8,52", [0, None, 8, 52]),
        ("5,6,7", [5, 6, 7, 1234]),  # lm-eval fills in the fourth
    ],
)
def test_seed_reads_as_lm_eval_reads_it(seed, expected) -> None:
    from lm_eval._cli.run import Run

    from epas_lightning.evaluation.lm_eval_options import SEED_NAMES, parse_seed

    assert parse_seed(seed) == dict(zip(SEED_NAMES, expected, strict=True))
    if seed is not None:  # lm_eval run --seed's own reading
        import argparse

        parser = argparse.ArgumentParser().add_subparsers()
        assert Run(parser)._parser.parse_args(["--seed", seed]).seed == expected


def test_gen_kwargs_read_as_lm_eval_reads_them() -> None:
    import argparse

    from lm_eval._cli.utils import MergeDictAction

    from epas_lightning.evaluation.lm_eval_options import parse_gen_kwargs

    values = ['until=["\\n", "a,b"],max_gen_toks=3', "temperature=0.5,top_k=5", '{"do_sample": true, "top_p": 0.9}']
    values += ["temperature=0.7"]  # a later value replaces an earlier one
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen_kwargs", nargs="+", action=MergeDictAction, default=None)
    expected = parser.parse_args([token for value in values for token in ("--gen_kwargs", value)]).gen_kwargs
    assert parse_gen_kwargs(values) == expected
    assert expected == {"until": ["\n", "a,b"], "max_gen_toks": 3, "temperature": 0.7, "top_k": 5, "do_sample": True,
                        "top_p": 0.9}  # fmt: skip
    assert parse_gen_kwargs(None) is None and parse_gen_kwargs([]) is None


@pytest.fixture
def no_weights_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading the model's weights fails the test: a refusal must come before it."""
    from epas_lightning.inference import generate_cli

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the weights loaded")

    monkeypatch.setattr(generate_cli, "load_for_inference", refuse)


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--gen-kwargs", "temperature"], "error: expected `key=value`, got 'temperature' — --gen-kwargs temperatu"),
        (["--gen-kwargs", '{"do_sample": tru}'], 'error: Invalid JSON: {"do_sample": tru}. Hint: Use double quo'),
        (["--gen-kwargs", "num_beams=4"], "error: --gen-kwargs asks for num_beams: 4, which this model's decoding d"),
        # a JSON object and brackets reach lm-eval's parsing as typed
        (
            ["--gen-kwargs", '{"do_sample": true}', "--gen-kwargs", 'until=["\\n", "]"],num_beams=2'],
            "error: --gen-kwargs asks for num_beams: 2, which",
        ),
        # each was a ValueError, TypeError or AssertionError traceback from lm-eval once the model had loaded
        (["--gen-kwargs", "do_sample=True,temperature=abc"], "error: temperature takes a number from 0, got 'abc' — "),
        (["--gen-kwargs", "until=5"], "error: until takes text or a list of texts, got 5 — --gen-kwargs — give un"),
        (["--gen-kwargs", "top_k=-3"], "error: top_k takes a whole number from 0, or None, got -3.0 — --gen-kwargs — "),
        (["--gen-kwargs", "max_gen_toks=32"], "error: max_gen_toks 32 leaves no room for a prompt in the model's cont"),
        # transformers' generate refuses it for the export; it was refused once the model had loaded
        (["--gen-kwargs", "do_sample=True,temperature=0"], "error: --gen-kwargs samples (do_sample=True) at temperat"),
        (["--batch-size", "auto:0"], "error: must be a whole number, auto or auto:N, got 'auto:0' — --batch-size — "),
        (["--batch-size", "big"], "error: must be a whole number, auto or auto:N, got 'big' — --batch-size — "),
        (["--seed", "1,2"], "error: Argument requires 4 integers or None, separated by ',' (got '1,2') — --seed — "),
        (["--seed", "x"], "error: x is not an integer or None (got 'x') — --seed — give one whole number from 0 to "),
        (["--seed", "-1"], "error: NumPy's seed (the second) must be from 0 to 4294967295, got -1 — --seed — "),
        (["--seed", "1,4294967296,3,4"], "error: NumPy's seed (the second) must be from 0 to 4294967295, got 4294967"),
        (["--seed", "1,2,18446744073709551616"], "error: torch's seed (the third) must be from -9223372036854775808 "),
        (["--apply-chat-template"], "error: this model has no chat template (none beside "),
        (["--fewshot-as-multiturn"], "error: few-shot examples as turns of a chat need the chat template — --fe"),
    ],
)
def test_lm_eval_options_refused_before_the_weights_load(checkpoint, tasks, capsys, no_weights_load, flags, said):
    """A bad --gen-kwargs or --seed, --apply-chat-template with a tokenizer that has no chat template, and
    --fewshot-as-multiturn without it (lm-eval refuses it): one line, before the model loads."""
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--tasks", str(tasks / "tiny_gen.yaml"), "--device", "cpu"]
    rc, _, err = run_cli(capsys, *argv, *flags)
    assert rc == 2 and err.startswith(said), err
    if flags == ["--apply-chat-template"]:
        assert "— --apply-chat-template — pass --tokenizer <a folder holding this tokenizer and its chat_te" in err


def test_apply_chat_template_renders_the_prompts_and_the_few_shot_turns(checkpoint, tasks, tmp_path, capsys) -> None:
    """lm-eval's --apply_chat_template and --fewshot_as_multiturn were missing."""
    import shutil

    chat = shutil.copytree(checkpoint, tmp_path / "chat")
    (chat / "chat_template.jinja").write_text(
        "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
        "{% if add_generation_prompt %}<|bos|>assistant:{% endif %}"
    )
    flags = ["--tasks", "tiny_gen", "--num-fewshot", "2", "--limit", "2", "--log-samples", "--apply-chat-template"]
    turns, turns_samples = lm_eval_into(capsys, chat, tasks, tmp_path / "turns", *flags)
    one, one_samples = lm_eval_into(capsys, chat, tasks, tmp_path / "one", *flags, "--no-fewshot-as-multiturn")
    name = f"samples_tiny_gen_sharing{turns['rows'][0]['sharing_layers']}.jsonl"
    [context, _] = turns_samples[name][0]["arguments"]["gen_args_0"].values()
    assert context.startswith("<|bos|>user: ") and context.endswith("<|bos|>assistant:")
    assert context.count("<|bos|>user: ") == 3 and context.count("<|bos|>assistant: ") == 2  # two examples as turns
    [context, _] = one_samples[name][0]["arguments"]["gen_args_0"].values()
    assert context.count("<|bos|>user: ") == 1 and context.endswith("<|bos|>assistant:")  # one turn holds them
    recorded = (turns["apply_chat_template"], turns["fewshot_as_multiturn"], one["fewshot_as_multiturn"])
    assert recorded == (True, True, False)


def test_a_config_files_seed_is_a_number_as_in_lm_evals_yaml(checkpoint, tasks, tmp_path, capsys, no_weights_load):
    """`seed: 42` in a --config file (as lm-eval's YAML config takes it) was refused as not text."""
    config = tmp_path / "eval.yaml"
    config.write_text("seed: 4294967296\n")
    rc, _, err = run_cli(capsys, "lm-eval", "--config", str(config), "--checkpoint", str(checkpoint), "--tasks", "x")
    assert rc == 2 and err.startswith("error: NumPy's seed (the second) must be from 0 to 4294967295, got 42949"), err


def test_batch_size_auto_finds_one_as_lm_eval_does(checkpoint, tasks, tmp_path, capsys) -> None:
    """lm-eval's --batch_size auto (the largest batch that fits, up to 64) was refused as not a whole number."""
    flags = ["--tasks", "tiny_mc", "--tasks", "tiny_ppl", "--sharing-layers", "2"]
    auto, _ = lm_eval_into(capsys, checkpoint, tasks, tmp_path / "auto", *flags, "--batch-size", "auto")
    four, _ = lm_eval_into(capsys, checkpoint, tasks, tmp_path / "four", *flags, "--batch-size", "4")
    assert auto["runs"]["2"]["config"]["batch_sizes"] == [64] and four["runs"]["2"]["config"]["batch_sizes"] == []
    metrics = [{key: value for key, value in run["rows"][0].items() if "/" in key} for run in (auto, four)]
    assert len(metrics[0]) == 5 and metrics[0] == pytest.approx(metrics[1], rel=1e-5)


def test_samples_of_a_task_whose_name_is_no_file_name(checkpoint, tasks, tmp_path, capsys) -> None:
    """A task named ``my/mc`` (any name a task YAML gives): its samples file was ``samples_my/mc_…``, a folder that is
    not there, so the whole output was lost after the scoring, with a traceback. Its characters that a file name
    does not take are ``_``, the name's hash kept apart from a task really named ``my_mc``."""
    from epas_lightning.evaluation.lm_eval_options import samples_file

    data = tasks / "tiny_mc.jsonl"
    for name, file in (("my/mc", "slash.yaml"), ("my_mc", "plain.yaml")):
        (tmp_path / file).write_text(task_yaml(name, data, tmp_path / "cache", MULTIPLE_CHOICE))
    flags = ["--tasks", str(tmp_path / "slash.yaml"), "--tasks", str(tmp_path / "plain.yaml"), "--limit", "2"]
    _, samples = lm_eval_into(capsys, checkpoint, tasks, tmp_path / "out", *flags, "--log-samples")
    assert sorted(samples) == sorted([samples_file("my/mc", 2), "samples_my_mc_sharing2.jsonl"])
    assert samples_file("my/mc", 2).startswith("samples_my_mc-") and len(samples[samples_file("my/mc", 2)]) == 2
    assert len(samples_file("x" * 300, 2).encode()) < 255 and samples_file("é" * 200, 2) != samples_file("é" * 201, 2)


def argument_run_with(monkeypatch, config: Path, text: str, checkpoint: Path, index: int) -> object:  # noqa: ANN001
    """The ``index``-th argument ``lm-eval --config config`` (``config`` holding ``text``) runs lm-eval with."""
    from epas_lightning.evaluation import harness

    class Ran(Exception):
        pass

    def capture(*args: object) -> None:
        raise Ran(args[index])

    monkeypatch.setattr(harness, "run_lm_eval", capture)
    config.write_text(text)
    with pytest.raises(Ran) as ran:
        cli_main(["lm-eval", "--config", str(config), "--checkpoint", str(checkpoint), "--tasks", "x"])
    return ran.value.args[0]


@pytest.mark.parametrize("seed", ["[1, null, 3, 4]", "[5]", "[5, 6, 7]", "42", "null", "~", None])
def test_a_config_files_seed_list_as_in_lm_evals_yaml(checkpoint, tmp_path, capsys, monkeypatch, seed) -> None:
    """`seed: [1, null, 3, 4]` in a --config file, as lm-eval's YAML config takes it (its own default is such a
    list), was refused as "takes a whole number or text"; each form gives lm-eval's seeds. `seed: null` leaves all four
    unseeded, as in lm-eval's YAML config (it gave lm-eval's default seeds); no `seed:` gives those defaults."""
    import yaml
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from epas_lightning.evaluation.lm_eval_options import SEED_NAMES

    config = tmp_path / "eval.yaml"
    seeds = argument_run_with(monkeypatch, config, "limit: 1\n" if seed is None else f"seed: {seed}\n", checkpoint, 12)
    read = EvaluatorConfig() if seed is None else EvaluatorConfig(seed=yaml.safe_load(seed))  # lm-eval's YAML reading
    expected = read._normalize_seed().seed or [None] * 4  # lm_eval run: `cfg.seed[0] if cfg.seed else None`, ...
    assert seeds == dict(zip(SEED_NAMES, expected, strict=True))
    config.write_text("seed: [1, 2]\n")
    rc, _, err = run_cli(capsys, "lm-eval", "--config", str(config), "--checkpoint", str(checkpoint), "--tasks", "x")
    assert rc == 2 and err.startswith("error: Argument requires 4 integers or None, separated by ',' (got [1, 2]) — ")
    config.write_text("seed: 1.5\n")
    rc, _, err = run_cli(capsys, "lm-eval", "--config", str(config), "--checkpoint", str(checkpoint), "--tasks", "x")
    assert rc == 2 and "--seed takes a whole number or text or a list, each item a whole number ([A, B]), not" in err


def test_lm_eval_json_records_the_batch_size_and_device_of_each_run(checkpoint, tasks, tmp_path, capsys) -> None:
    """``runs.<N>.config`` is lm-eval's record of a run, whose ``batch_size`` and ``device`` were null: lm-eval records
    the ones it is given, and the command gave them to the model only."""
    flags = ["--tasks", "tiny_mc", "--limit", "2", "--batch-size", "3"]
    summary, _ = lm_eval_into(capsys, checkpoint, tasks, tmp_path / "out", *flags)
    config = summary["runs"]["2"]["config"]
    assert (config["batch_size"], config["device"]) == (3, "cpu")


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ("{temperature: 0.5, do_sample: true}", {"temperature": 0.5, "do_sample": True}),  # lm-eval's YAML mapping
        ("temperature=0.5,top_k=3", {"temperature": 0.5, "top_k": 3}),  # lm-eval's YAML text
        ('["temperature=0.5", "top_k=3"]', {"temperature": 0.5, "top_k": 3}),  # the repeated flag's list
    ],
)
def test_a_config_files_gen_kwargs_as_in_lm_evals_yaml(checkpoint, tmp_path, capsys, monkeypatch, written, expected):
    """`gen_kwargs: {temperature: 0.5}` or `gen_kwargs: temperature=0.5` in a --config file, as lm-eval's YAML config
    takes them, were refused as not a list of texts."""
    config = tmp_path / "eval.yaml"
    assert argument_run_with(monkeypatch, config, f"gen_kwargs: {written}\n", checkpoint, 13) == expected
    config.write_text("gen_kwargs: {num_beams: 4}\n")  # checked as the flag's
    rc, _, err = run_cli(capsys, "lm-eval", "--config", str(config), "--checkpoint", str(checkpoint), "--tasks", "x")
    assert rc == 2 and err.startswith("error: --gen-kwargs asks for num_beams: 4, which this model"), err


def test_batch_size_auto_n_above_the_requests(checkpoint, tasks, tmp_path, capsys) -> None:
    """``--batch-size auto:8`` on fewer than 8 requests (a small task, a small --limit): lm-eval's schedule divided by
    zero (a ZeroDivisionError traceback, as with its hf model); the search runs once per request instead."""
    flags = ["--tasks", "tiny_mc", "--limit", "1"]
    auto, _ = lm_eval_into(capsys, checkpoint, tasks, tmp_path / "auto", *flags, "--batch-size", "auto:8")
    one, _ = lm_eval_into(capsys, checkpoint, tasks, tmp_path / "one", *flags, "--batch-size", "1")
    assert auto["runs"]["2"]["config"]["batch_sizes"] == [64] * 3  # tiny_mc's 3 choices
    assert auto["rows"] == one["rows"]


def test_samples_files_are_the_ones_lm_evals_writer_writes(checkpoint, tasks, tmp_path) -> None:
    """Each samples file holds what lm-eval's own ``EvaluationTracker`` writes for the same samples, byte for byte:
    the sanitized arguments and responses, the hashes, and a document's values that JSON has no type for."""
    import copy
    import datetime

    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from epas_lightning.evaluation.lm_eval_adapter import EPASLM
    from epas_lightning.evaluation.lm_eval_options import samples_file, write_samples

    lm = EPASLM(checkpoint, device="cpu", batch_size=2)
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    names = ["tiny_mc", "tiny_gen", "tiny_ppl"]
    result = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=2, bootstrap_iters=0, log_samples=True
    )  # fmt: skip
    result["samples"]["tiny_mc"][0]["doc"] |= {"day": datetime.date(2020, 1, 2), "raw": b"\x00\x01"}
    write_samples({2: copy.deepcopy(result["samples"])}, tmp_path)
    tracker = EvaluationTracker(output_path=str(tmp_path / "lm_eval"))
    tracker.general_config_tracker.model_name_sanitized, tracker.date_id = "model", "date"
    for task in result["configs"]:
        tracker.save_results_samples(task_name=task, samples=result["samples"][task])
    for task in names:
        theirs = (tmp_path / "lm_eval" / "model" / f"samples_{task}_date.jsonl").read_text(encoding="utf-8")
        assert (tmp_path / samples_file(task, 2)).read_text(encoding="utf-8") == theirs and theirs.count("\n") == 2


@pytest.mark.parametrize(
    ("kwargs", "refused"),
    [
        ({"max_gen_toks": 8, "max_new_tokens": 100}, False),  # lm-eval generates max_gen_toks, the first it reads
        ({"max_tokens": 8, "max_completion_tokens": 40}, False),
        ({"max_new_tokens": 100, "max_tokens": 8}, True),
    ],
)
def test_generation_length_checks_the_tokens_lm_eval_generates(kwargs, refused) -> None:
    """Of several names for the tokens to generate, lm-eval reads the first of max_gen_toks, max_new_tokens, max_tokens,
    max_completion_tokens; one it ignores past the context length was refused."""
    from lm_eval.models.utils import normalize_gen_kwargs

    from epas_lightning.evaluation.lm_eval_options import check_generation_length

    generated = normalize_gen_kwargs(kwargs)["max_gen_toks"]
    if refused:
        with pytest.raises(ConfigError, match=f"{generated} leaves no room for a prompt"):
            check_generation_length(kwargs, 32)
    else:
        check_generation_length(kwargs, 32)


def test_seeds_that_only_numpy_or_torch_refuse() -> None:
    """NumPy takes seeds from 0 to 2**32 - 1 and torch from -2**63 to 2**64 - 1; Python's random and the few-shot
    sampler take any whole number. Every seed was refused outside NumPy's range (``--seed 5000000000,0,0,5000000000``
    and ``--seed -1,0,-1,-1``, which lm-eval runs)."""
    from epas_lightning.evaluation.lm_eval_options import parse_seed

    assert list(parse_seed("5000000000,0,0,5000000000").values()) == [5000000000, 0, 0, 5000000000]
    assert list(parse_seed("-1,0,-1,-1").values()) == [-1, 0, -1, -1]


@pytest.mark.parametrize("value", ["max_length=20", "max_length=32", "do_sample=1,temperature=0.5", "do_sample=0"])
def test_gen_kwargs_lm_evals_hf_model_takes(value) -> None:
    """``max_length`` (the prompt and the generated tokens together, which ``HFLM`` hands to ``generate``) and
    ``do_sample`` 1 or 0 (lm-eval reads ``do_sample=1`` as the int 1, which transformers' ``generate`` samples with)
    were refused, though lm-eval's hf model takes them; each is taken as lm-eval reads it."""
    from lm_eval._cli.utils import key_val_to_dict

    from epas_lightning.evaluation.lm_eval_adapter import sampling_settings
    from epas_lightning.evaluation.lm_eval_options import check_generation_length, parse_gen_kwargs

    kwargs = parse_gen_kwargs([value])
    assert kwargs == key_val_to_dict(value)
    check_generation_length(kwargs, 32)
    if "do_sample" in kwargs:  # sampling as with True, greedy as with False
        as_bool = {**kwargs, "do_sample": bool(kwargs["do_sample"])}
        assert sampling_settings(kwargs) == sampling_settings(as_bool)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("max_length=33", "max_length 33 is past the model's context length of 32 (the prompt and the generated tok"),
        ("max_length=0", "max_length takes a whole number from 1, got 0"),
        ("do_sample=2", "do_sample takes True or False (or 1 or 0), got 2"),
        ("do_sample=yes", "do_sample takes True or False (or 1 or 0), got 'yes'"),
        ("do_sample=1,temperature=0", "--gen-kwargs samples (do_sample=1) at temperature 0, which transformers' "),
    ],
)
def test_gen_kwargs_max_length_and_do_sample_refused_before_the_weights_load(value, said) -> None:
    from epas_lightning.evaluation.lm_eval_options import check_generation_length, parse_gen_kwargs

    with pytest.raises(ConfigError) as refused:
        check_generation_length(parse_gen_kwargs([value]), 32)
    assert str(refused.value).startswith(said), str(refused.value)


def test_gen_kwargs_max_length_generates_as_hf_generates_the_export(checkpoint, exports, tasks) -> None:
    """``max_length`` in the generation kwargs is the prompt (padded) and the generated tokens together, as ``HFLM``
    hands it to transformers' ``generate``: the same texts as ``hf`` on the export, shorter than without it."""
    import epas_lightning.evaluation.lm_eval_adapter  # noqa: F401 - registers "epas"

    ours_args = {"checkpoint": str(checkpoint), "sharing_layers": 0, "device": "cpu"}
    hf_args = {"pretrained": str(exports[0]), "device": "cpu"}
    gen_kwargs = {"max_length": 12, "until": ["@@"]}  # no stop string: the length decides
    ours = evaluate("epas", ours_args, tasks, ["tiny_gen"], limit=3, gen_kwargs=gen_kwargs)
    theirs = evaluate("hf", hf_args, tasks, ["tiny_gen"], limit=3, gen_kwargs=gen_kwargs)
    longer = evaluate("epas", ours_args, tasks, ["tiny_gen"], limit=3, gen_kwargs={"until": ["@@"]})
    assert generations(ours) == generations(theirs)
    assert generations(ours) != generations(longer)


def test_gen_kwargs_max_length_within_the_prompt_names_max_length(checkpoint, tasks) -> None:
    """A ``max_length`` no longer than a prompt leaves nothing to generate (transformers' ``generate`` raises for it
    on the export): the error named our decoding's ``max_new_tokens`` the user never gave."""
    import epas_lightning.evaluation.lm_eval_adapter  # noqa: F401 - registers "epas"

    args = {"checkpoint": str(checkpoint), "sharing_layers": 0, "device": "cpu"}
    with pytest.raises(ConfigError, match=r"^max_length 2 leaves no token to generate after a prompt of \d+ tokens"):
        evaluate("epas", args, tasks, ["tiny_gen"], limit=1, gen_kwargs={"max_length": 2})


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("[tiny_mc, tiny_gen]", "give --tasks tiny_mc,tiny_gen"),
        ('["tiny_mc", "nope"]', "give --tasks tiny_mc,nope"),
        ("tiny_mc tiny_gen", "give --tasks tiny_mc,tiny_gen"),
    ],
)
def test_tasks_written_as_a_list_say_how_tasks_are_given(checkpoint, tasks, capsys, value, fix) -> None:
    """``--tasks '[a, b]'`` read as the unknown task "[a, b]" (its parts "[a" and "b]"): the line said to list lm-eval's
    tasks, not that tasks are given separated by commas or by repeating --tasks."""
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--include-path", str(tasks), "--device", "cpu"]
    rc, _, err = run_cli(capsys, *argv, "--tasks", value)
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --tasks takes task names separated by commas, not a list or spaces: "), err
    assert f" — --tasks {value} — {fix} (names separated by commas), or repeat --tasks for each" in err, err


def test_log_samples_writes_each_region_into_the_build_as_it_ends(checkpoint, tasks, tmp_path, capsys, monkeypatch):
    """--log-samples kept every region's samples in memory until the output was written (with --sharing-layers all, a
    copy of every sample per region): each region's files are now in the hidden build folder once that region has
    run, byte for byte what writing all of them at the end gives."""
    from epas_lightning.evaluation.harness import run_lm_eval
    from epas_lightning.evaluation.lm_eval_options import write_samples

    evaluate_region, built = lm_eval.simple_evaluate, []

    def recording(*args: Any, **kwargs: Any) -> dict:  # the files built when each region starts
        built.append(sorted(p.name for p in tmp_path.glob(".out.tmp-*/samples_*.jsonl")))
        return evaluate_region(*args, **kwargs)

    monkeypatch.setattr(lm_eval, "simple_evaluate", recording)
    flags = ["--tasks", "tiny_mc,tiny_gen", "--sharing-layers", "all", "--limit", "2", "--log-samples"]
    lm_eval_into(capsys, checkpoint, tasks, tmp_path / "out", *flags)
    written = [
        sorted(f"samples_{t}_sharing{n}.jsonl" for t in ("tiny_gen", "tiny_mc") for n in range(k)) for k in (0, 1, 2)
    ]
    assert built == written
    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate_region)
    kept = run_lm_eval(checkpoint, ["tiny_mc,tiny_gen"], [tasks], "all", limit=2, bootstrap_iters=0, device="cpu",
                       log_samples=True)  # fmt: skip
    (tmp_path / "kept").mkdir()
    names = write_samples(kept["samples"], tmp_path / "kept")
    assert sorted(names) == sorted(p.name for p in (tmp_path / "out").glob("samples_*.jsonl")) and len(names) == 6
    for name in names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "kept" / name).read_bytes()


def test_an_interrupted_log_samples_run_leaves_no_output(checkpoint, tasks, tmp_path, capsys, monkeypatch) -> None:
    """Ctrl+C in the second region, after the first wrote its samples into the build: no output folder, no hidden
    one, and a previous output (--overwrite) as it was."""
    evaluate_region, calls = lm_eval.simple_evaluate, []

    def interrupted(*args: Any, **kwargs: Any) -> dict:
        calls.append(sorted(p.name for p in tmp_path.glob(".out.tmp-*/samples_*.jsonl")))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate_region(*args, **kwargs)

    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--include-path", str(tasks), "--device", "cpu"]
    argv += ["--tasks", "tiny_mc", "--limit", "2", "--bootstrap-iters", "0", "--output", str(tmp_path / "out")]
    monkeypatch.setattr(lm_eval, "simple_evaluate", interrupted)
    rc, _, _ = run_cli(capsys, *argv, "--sharing-layers", "all", "--log-samples")
    assert rc == 130 and calls[1] == ["samples_tiny_mc_sharing0.jsonl"] and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(lm_eval, "simple_evaluate", evaluate_region)
    assert run_cli(capsys, *argv)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    monkeypatch.setattr(lm_eval, "simple_evaluate", interrupted)
    calls.clear()
    rc, _, _ = run_cli(capsys, *argv, "--sharing-layers", "all", "--log-samples", "--overwrite")
    assert rc == 130 and calls[1] == ["samples_tiny_mc_sharing0.jsonl"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_lm_eval_json_of_a_stock_export_records_the_region_its_weights_trained(
    exports, tasks, tmp_path, capsys
) -> None:
    """A stock export runs dense (trained_region empty) while its weights trained a region, which a forced sweep
    shares: bench's and evaluate's JSON record it as weights_trained_region, lm_eval.json did not."""
    argv = ["lm-eval", "--checkpoint", str(exports[0]), "--tasks", "tiny_mc", "--include-path", str(tasks),
            "--bootstrap-iters", "0", "--limit", "2", "--device", "cpu"]  # fmt: skip
    rc, _, err = run_cli(capsys, *argv, "--sharing-layers", "2", "--force", "--output", str(tmp_path / "out"))
    assert rc == 0, err
    written = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert written["trained_region"]["layers"] == [] and written["rows"][0]["shared_layers"] == [3, 2]
    assert written["weights_trained_region"] == {"layers": [3, 2], "order": "deep_first"}


def test_lm_eval_output_inside_an_include_path_is_refused_before_the_weights(
    checkpoint, tasks, tmp_path, capsys, no_weights_load
) -> None:
    """lm-eval --output refused an output inside the checkpoint only: one inside an --include-path folder (or a
    --tokenizer folder) it reads was built there, beside the task YAMLs lm-eval indexes."""
    include = shutil.copytree(tasks, tmp_path / "tasks")
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--tasks", "tiny_mc", "--include-path", str(include)]
    rc, _, err = run_cli(capsys, *argv, "--device", "cpu", "--output", str(include / "out"))
    assert rc == 2 and f"the output lies inside the input {include.resolve()}" in err, err
    assert not (include / "out").exists()


@pytest.mark.parametrize(
    ("value", "unknown"), [("{file},nope", "nope"), ("nope,{file}", "nope"), ("tiny_[xy]*,{file}", "tiny_[xy]*")]
)
def test_an_unknown_task_beside_a_task_file_with_spaces_in_its_path_is_named(
    checkpoint, tasks, tmp_path, capsys, value, unknown
) -> None:
    """A task YAML in a folder whose name has a space, given with an unknown task in one --tasks value, read as a list
    written with spaces (the advice split the file's path into task names); the unknown task is what the line names,
    a glob's brackets too."""
    folder = tmp_path / "my tasks"
    folder.mkdir()
    file = folder / "tiny_mc.yaml"
    file.write_text((tasks / "tiny_mc.yaml").read_text())
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--tasks", value.format(file=file)]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and err.startswith(f"error: unknown lm-eval task {unknown} — --tasks — `lm_eval ls tasks` "), err


def generate_task_refusal(checkpoint: Path, tasks: Path, tmp_path: Path, setting: str, instead: str) -> ConfigError:
    """The one-line error of scoring a document of the generate task whose YAML has ``setting`` written ``instead``."""
    import epas_lightning.evaluation.lm_eval_adapter  # noqa: F401 - registers "epas"

    body = GENERATE.replace(setting, instead)
    (tmp_path / "edited_gen.yaml").write_text(
        task_yaml("edited_gen", tasks / "tiny_gen.jsonl", tmp_path / "cache", body)
    )
    args = {"checkpoint": str(checkpoint), "sharing_layers": 0, "device": "cpu"}
    with pytest.raises(ConfigError) as raised:
        evaluate("epas", args, tmp_path, ["edited_gen"], limit=1)
    return raised.value


def test_a_task_max_length_past_the_context_length_names_max_length(checkpoint, tasks, tmp_path) -> None:
    """A task YAML's ``max_length`` (the prompt and the generated tokens together) past the model's 32 positions,
    which --gen-kwargs' check never sees: the error named our decoding's ``max_new_tokens`` and the prompts."""
    said = generate_task_refusal(checkpoint, tasks, tmp_path, "max_gen_toks: 8", "max_gen_toks: 8, max_length: 40")
    past = "max_length 40 is past the model's context length of 32 (the prompt and the generated tokens together)"
    assert said.what == past, said.what
    assert said.where == "--gen-kwargs, or the task's generation_kwargs", said.where
    assert said.fix == "give max_length 32 or less, or max_gen_toks for the tokens to generate", said.fix


@pytest.mark.parametrize("output", [False, True])
@pytest.mark.parametrize("stage", ["loading", "scoring"])
def test_a_full_disk_while_scoring_is_not_blamed_on_the_output(
    checkpoint, tasks, tmp_path, capsys, monkeypatch, output, stage
) -> None:
    """lm-eval filling its disk while it scores (the datasets cache), or the model's loading its temporary folder:
    with --output (opened before both since the samples are written as each region ends) the line said the output's
    disk was full and to choose another --output; it names the file being written, as without --output, and leaves no
    output."""
    import errno

    from epas_lightning.evaluation import lm_eval_adapter

    def full(*args: Any, **kwargs: Any) -> dict:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "data.arrow"))

    monkeypatch.setattr(*(lm_eval, "simple_evaluate") if stage == "scoring" else (lm_eval_adapter, "EPASLM"), full)
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--include-path", str(tasks), "--device", "cpu"]
    argv += ["--tasks", "tiny_mc", "--limit", "1"] + (["--output", str(tmp_path / "out")] if output else [])
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and list(tmp_path.iterdir()) == [], err
    said = "error: no space left on the device (or quota) while lm-eval ran — " + str(tmp_path / "cache" / "data.arrow")
    assert err == f"{said} — free space\n", err


def test_a_full_disk_writing_the_samples_is_the_outputs(checkpoint, tasks, tmp_path, capsys, monkeypatch) -> None:
    """A region's samples written into the build on a full disk stay the output's to say, scoring apart from it."""
    import errno

    from epas_lightning.evaluation import harness

    def full(*args: Any, **kwargs: Any) -> list[str]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(harness, "write_samples", full)
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--include-path", str(tasks), "--device", "cpu"]
    argv += ["--tasks", "tiny_mc", "--limit", "1", "--log-samples", "--output", str(tmp_path / "out")]
    rc, err = cli_main(argv), capsys.readouterr().err  # after lm-eval's progress bars
    assert rc == 2 and list(tmp_path.iterdir()) == [], err
    line = err.splitlines()[-1]
    assert line.startswith("error: no space left on the device (or quota) while writing; nothing was left behind"), err


def test_a_task_given_alone_and_in_its_group_is_one_line(checkpoint, tasks, tmp_path, capsys) -> None:
    """A task given on its own and in a group that holds it (lm-eval runs each task once, so each region writes one
    samples file per task): lm-eval's ValueError "Duplicate task" was a traceback; one line, and no output."""
    import shutil

    folder = tmp_path / "tasks"
    shutil.copytree(tasks, folder, ignore=shutil.ignore_patterns("cache"))
    (folder / "group.yaml").write_text("group: tiny_group\ntask: [tiny_mc, tiny_gen]\n")
    argv = ["lm-eval", "--checkpoint", str(checkpoint), "--include-path", str(folder), "--device", "cpu"]
    argv += ["--tasks", "tiny_group,tiny_mc", "--limit", "1", "--log-samples", "--output", str(tmp_path / "out")]
    rc, err = cli_main(argv), capsys.readouterr().err  # after the datasets' progress bars
    assert rc == 2 and not (tmp_path / "out").exists(), err
    assert err.splitlines()[-1] == (
        "error: lm-eval runs each task once: Duplicate task 'tiny_mc': found in both 'tiny_group' and 'tiny_mc' — "
        "--tasks — give each task once: leave out the one given on its own, or one of the groups holding it"
    ), err


def test_a_task_without_max_gen_toks_past_a_short_context_is_one_line(checkpoint, tasks, tmp_path) -> None:
    """A generate_until task that sets no max_gen_toks generates up to lm-eval's default 256 tokens, past this model's
    32 positions: ``HFLM``'s AssertionError "Invalid configuration" was a traceback."""
    said = generate_task_refusal(checkpoint, tasks, tmp_path, ", max_gen_toks: 8", "")
    assert said.what == (
        "a task generates up to 256 tokens (max_gen_toks; 256 where the task sets none), which leaves no room for a "
        "prompt in the model's context length of 32"
    ), said.what
    assert (said.where, said.fix) == ("the task's generation_kwargs", "give --gen-kwargs max_gen_toks=N, N below 32")


def test_sampling_without_a_temperature_names_gen_kwargs_too(checkpoint) -> None:
    """``--gen-kwargs do_sample=1`` (taken since lm-eval reads it as the int 1) on a task that sets no temperature
    samples at lm-eval's 0: the line named only the task's generation_kwargs, where --gen-kwargs asked for it."""
    from epas_lightning.evaluation.lm_eval_adapter import EPASLM

    lm = EPASLM(str(checkpoint), device="cpu")
    with pytest.raises(ConfigError) as raised:
        lm._model_generate(torch.tensor([[1, 5, 9]]), 6, [], do_sample=1)
    assert raised.value.where == "--gen-kwargs, or the task's generation_kwargs", raised.value.where
    assert raised.value.fix.startswith("give a temperature above 0 (1 samples from the model's distribution)")
