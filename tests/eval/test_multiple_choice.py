"""Multiple-choice tasks: choice log-likelihoods against a plain token-by-token reference,
accuracy and acc_norm on hand-checked cases, lm-eval's context/choice split, truncation,
the `lmlab eval --task` command and bad task files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.eval.multiple_choice import (
    Example,
    choice_loglikelihoods,
    encode_pair,
    read_task,
    score_task,
)
from lmlab.runs.load import LoadedModel, load_model
from lmlab.train.loop import train


@pytest.fixture(scope="module")
def run(flowroll_data: Path, tmp_path_factory) -> Path:
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path_factory.mktemp('runs')}",
            "model.context_length=32",
            "train.micro_batch_size=8",
            "train.max_steps=60",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=lambda *a, **k: None).run_dir


EXAMPLES = [
    Example("[3 1 2] | sort =>", [" [1 2 3]", " [3 2 1]", " [2]"], 0),
    Example("[5 5] | sum => ", ["10", "55", "0"], 0, id="spaces"),
    Example("", ["[1] | rev => [1]", "[1 2]"], 1),
    Example("[9 8 7 6 5 4 3 2 1 0 1 2 3 4 5 6 7 8 9] | map +1 | rev | sort", [" => []", " x"], 0),
]


def reference_loglikelihood(loaded: LoadedModel, context: str, choice: str) -> float:
    """Plain: the whole sequence through the model, one log-probability per choice token."""
    context_ids, choice_ids = encode_pair(context, choice, loaded)
    ids = (context_ids + choice_ids)[-(loaded.model.config.context_length + 1) :]
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([ids[:-1]]))
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    n = min(len(choice_ids), len(ids) - 1)
    return sum(float(logprobs[len(ids) - 1 - n + i, ids[len(ids) - n + i]]) for i in range(n))


def test_loglikelihoods_equal_a_plain_reference_in_any_batch_size(run):
    loaded = load_model(run)
    one, truncated = choice_loglikelihoods(loaded, EXAMPLES, batch_size=1)
    many, _ = choice_loglikelihoods(loaded, EXAMPLES, batch_size=5)
    assert truncated == 2  # the last example's context+choice is longer than 32 + 1 tokens
    for example, row_one, row_many in zip(EXAMPLES, one, many, strict=True):
        for choice, a, b in zip(example.choices, row_one, row_many, strict=True):
            expected = reference_loglikelihood(loaded, example.context, choice)
            assert a == pytest.approx(expected, abs=1e-4)
            assert b == pytest.approx(expected, abs=1e-4)
    assert len({round(v, 3) for row in one for v in row}) > 5  # varied numbers


def test_context_whitespace_moves_to_the_choice_and_empty_context_reads_eot(run):
    loaded = load_model(run)
    tok = loaded.tokenizer
    context_ids, choice_ids = encode_pair("[5 5] | sum => ", "10", loaded)
    assert context_ids == tok.encode("[5 5] | sum =>") and choice_ids == tok.encode(" 10")
    context_ids, choice_ids = encode_pair("", "[1]", loaded)
    assert context_ids == [tok.eot_id] and choice_ids == tok.encode("[1]")


class ForcedModel(nn.Module):
    """Logits that prefer the token `favourite` everywhere by `margin` nats (0: uniform)."""

    def __init__(self, vocab_size: int, favourite: int, margin: float):
        super().__init__()
        self.config = type("Config", (), {"context_length": 64})()
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[favourite] = margin

    def forward(self, idx, targets=None):
        return self.bias.expand(*idx.shape, -1), None


def forced(run, token: str, margin: float) -> LoadedModel:
    loaded = load_model(run)
    favourite = loaded.tokenizer.encode(token)[0]
    model = ForcedModel(loaded.model.config.vocab_size, favourite, margin)
    return LoadedModel(model, loaded.tokenizer, loaded.path, "lmlab")


def test_accuracy_follows_the_likeliest_choice(run):
    loaded = forced(run, "7", margin=5.0)
    examples = [
        Example("x", ["777", "123"], 0),  # the model loves 7: right
        Example("x", ["12", "77"], 0),  # it picks 77: wrong
        Example("x", ["7", "1"], 1),  # it picks 7: wrong
        Example("x", ["3", "1", "7"], 2),  # right
    ]
    report = score_task(loaded, examples, bootstrap=200)
    assert [r["predicted"] for r in report.records] == [0, 1, 0, 2]
    assert report.aggregates["accuracy"].value == 0.5
    low, high = report.aggregates["accuracy"].ci_low, report.aggregates["accuracy"].ci_high
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    # Hand-checked: with V tokens, log p(7) = 5 - log(e^5 + V - 1).
    vocab = loaded.model.bias.numel()
    log_p7 = 5.0 - math.log(math.exp(5.0) + vocab - 1)
    assert report.records[0]["loglikelihoods"][0] == pytest.approx(3 * log_p7, abs=1e-5)


def test_acc_norm_divides_by_length_in_characters(run):
    # The model loves 7: log p(7) = a is near 0, any other token costs b << a. Seven 7s and
    # a 1 sum to 7a + b, below b alone (accuracy picks "1"), but per character
    # (7a + b) / 8 is far above b (acc_norm picks the long choice).
    loaded = forced(run, "7", margin=5.0)
    examples = [Example("x", ["77777771", "1"], 0), Example("x", ["7", "1"], 0)]
    report = score_task(loaded, examples, bootstrap=0)
    assert [r["predicted"] for r in report.records] == [1, 0]
    assert [r["predicted_norm"] for r in report.records] == [0, 0]
    assert report.aggregates["accuracy"].value == 0.5
    assert report.aggregates["acc_norm"].value == 1.0
    assert report.aggregates["accuracy"].ci_low is None


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_eval_task_command(run, tmp_path, capsys):
    from lmlab.commands.eval import main

    rows = [
        {"context": e.context, "choices": e.choices, "label": e.label, "id": i}
        for i, e in enumerate(EXAMPLES)
    ]
    task = write(tmp_path / "mc.jsonl", rows)
    out, records = tmp_path / "mc.json", tmp_path / "records.jsonl"
    args = [str(run), "--task", str(task), "--json", "--out", str(out)]
    assert main([*args, "--records-out", str(records)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    [result] = printed["tasks"]
    assert result["examples"] == 4 and result["truncated"] == 2
    report = score_task(load_model(run), EXAMPLES)
    assert result["metrics"]["accuracy"]["value"] == report.aggregates["accuracy"].value
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["id"] for r in lines] == [0, 1, 2, 3]
    assert main([str(run), "--task", str(task), "--task", str(task)]) == 0
    table = capsys.readouterr().out
    assert "accuracy" in table and "acc_norm" in table and "oldest tokens were dropped" in table


@pytest.mark.parametrize(
    "lines, message",
    [
        (["not json"], "mc.jsonl:1: not JSON"),
        ([["a list"]], "mc.jsonl:1: expected a JSON object"),
        ([{"context": "a", "choices": ["b", "c"]}], "mc.jsonl:1: missing label"),
        ([{"context": "a", "choices": ["b"], "label": 0}], "at least 2"),
        ([{"context": "a", "choices": ["b", 3], "label": 0}], r"choices\[1\] must be"),
        ([{"context": "a", "choices": ["b", ""], "label": 0}], r"choices\[1\] must be"),
        ([{"context": 1, "choices": ["b", "c"], "label": 0}], "'context' must be a string"),
        ([{"context": "a", "choices": ["b", "c"], "label": 2}], r"index into choices \(0..1\)"),
        ([{"context": "a", "choices": ["b", "c"], "label": True}], "index into choices"),
        (["", "  "], "holds no examples"),
    ],
)
def test_bad_task_files_are_one_line_errors(tmp_path, lines, message):
    with pytest.raises(UserError, match=message):
        read_task(write(tmp_path / "mc.jsonl", lines))


def test_bad_command_lines(run, tmp_path):
    from lmlab.commands.eval import main

    task = write(tmp_path / "mc.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 0}])
    with pytest.raises(UserError, match="does not exist"):
        main([str(run), "--task", str(tmp_path / "missing.jsonl")])
    with pytest.raises(UserError, match="is a folder"):
        main([str(run), "--task", str(task), "--out", str(tmp_path)])
    with pytest.raises(UserError, match="one --task at a time"):
        main([str(run), "--task", str(task), "--task", str(task), "--records-out", "r.jsonl"])
    with pytest.raises(UserError, match="--limit"):
        main([str(run), "--task", str(task), "--limit", "0"])
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.slow
def test_an_exported_folder_scores_like_the_run_and_like_transformers(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from lmlab.export.hf import export_hf

    export_hf(run, tmp_path / "hf")
    ours, _ = choice_loglikelihoods(load_model(run), EXAMPLES[:3])
    exported, _ = choice_loglikelihoods(load_model(tmp_path / "hf"), EXAMPLES[:3])
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for example, row_ours, row_exported in zip(EXAMPLES[:3], ours, exported, strict=True):
        for choice, a, b in zip(example.choices, row_ours, row_exported, strict=True):
            context = example.context.rstrip()
            spill = example.context[len(context) :]
            whole = hf_tok(context + spill + choice)["input_ids"]
            start = len(hf_tok(context)["input_ids"]) if context else 0
            ids = ([hf_tok.eos_token_id] if not context else []) + whole
            start = start if context else 1
            with torch.no_grad():
                logits = hf(torch.tensor([ids[:-1]])).logits[0]
            logprobs = torch.log_softmax(logits.double(), dim=-1)
            theirs = sum(float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids)))
            assert a == pytest.approx(theirs, abs=1e-4)
            assert b == pytest.approx(theirs, abs=1e-4)


LM_EVAL_TASK = """task: lmlab_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.mark.slow
def test_lm_eval_hf_model_agrees_on_an_exported_folder(run, tmp_path):
    """The command docs/evaluation.md gives, run as is on an `lmlab export` folder."""
    import os
    import shutil
    import subprocess

    pytest.importorskip("lm_eval")
    from lmlab.export.hf import export_hf
    from lmlab.generate.predict import read_inputs

    export_hf(run, tmp_path / "hf")
    # A FLOWROLL task: the right result among three others; one long context truncates.
    records = read_inputs("dsl:flowroll:24:1-2")
    rows = []
    for i, r in enumerate(records):
        others = [x["reference"] for x in records if x["reference"] != r["reference"]]
        choices = [" " + c for c in [r["reference"], *others[i % 5 : i % 5 + 2]]]
        rows.append({"context": r["prompt"], "choices": choices[i % 3 :] + choices[: i % 3]})
        rows[-1]["label"] = rows[-1]["choices"].index(" " + r["reference"])
    data = write(tmp_path / "mc.jsonl", rows)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "lmlab_mc.yaml").write_text(LM_EVAL_TASK.format(data=data))
    command = [shutil.which("lm_eval") or "lm_eval", "--model", "hf", "--model_args"]
    command += [f"pretrained={tmp_path / 'hf'}", "--tasks", "lmlab_mc", "--include_path"]
    command += [str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "4"]
    command += ["--output_path", str(tmp_path / "results")]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run(command, check=True, capture_output=True, env=env, timeout=600)
    [results] = list((tmp_path / "results").rglob("results_*.json"))
    theirs = json.loads(results.read_text())["results"]["lmlab_mc"]
    ours = score_task(load_model(run), read_task(data), bootstrap=0).aggregates
    assert theirs["acc,none"] == pytest.approx(ours["accuracy"].value, abs=1e-9)
    assert theirs["acc_norm,none"] == pytest.approx(ours["acc_norm"].value, abs=1e-9)
    assert 0 < ours["accuracy"].value < 1 or 0 < ours["acc_norm"].value < 1
