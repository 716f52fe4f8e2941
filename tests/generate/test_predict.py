"""lmlab predict: batched predictions equal one-at-a-time greedy generation, on lmlab runs,
LoRA runs and exported Hugging Face folders; bad inputs are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmlab.cli import main as cli_main
from lmlab.config import build_config
from lmlab.data.chat import Message, chat_prompt_ids
from lmlab.errors import UserError
from lmlab.generate.predict import PredictOptions, cut_at_stop, predict, read_inputs
from lmlab.generate.sampling import generate
from lmlab.runs.load import load_model
from lmlab.train.loop import train


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def run(flowroll_data: Path, tmp_path_factory) -> Path:
    """A tiny LLaMA trained a little on FLOWROLL: its greedy outputs are not constant."""
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path_factory.mktemp('runs')}",
            "model.context_length=64",
            "train.micro_batch_size=8",
            "train.max_steps=200",
            "train.lr=3e-3",
            "train.warmup_steps=5",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=quiet).run_dir


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        cli_main(argv)
    return info.value.code


def one_at_a_time(loaded, ids: list[int], max_new_tokens: int) -> list[int]:
    eot = loaded.tokenizer.eot_id
    new = list(
        generate(
            loaded.model,
            torch.tensor([ids]),
            max_new_tokens,
            temperature=0.0,
            stop_token_ids=(eot,),
        )
    )
    return new[:-1] if new and new[-1] == eot else new


def test_batched_predictions_equal_one_at_a_time_greedy(run, tmp_path):
    out = tmp_path / "preds.jsonl"
    code = run_cli(
        ["predict", str(run), "--input", "dsl:flowroll:12", "--out", str(out)]
        + ["--batch-size", "5", "--max-new-tokens", "20"]
    )
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12
    assert {"prompt", "reference", "dsl", "difficulty", "prediction"} <= set(rows[0])
    assert len({len(r["prompt"]) for r in rows}) > 1  # prompts of several lengths: padding
    loaded = load_model(run)
    tok = loaded.tokenizer
    for row in rows:
        expected = one_at_a_time(loaded, tok.encode(row["prompt"]), 20)
        # A practice-language answer ends at the end of its line.
        assert row["prediction"] == cut_at_stop(tok.decode(expected), ["\n"])[0], row["prompt"]
    assert len({r["prediction"] for r in rows}) > 1


def test_stop_strings_end_and_are_cut(run, tmp_path):
    loaded = load_model(run)
    records = [{"prompt": r["prompt"]} for r in read_inputs("dsl:flowroll:6")]
    free = predict(loaded, records, PredictOptions(max_new_tokens=16, stop_at_eot=False))
    # Stop at the first character of each free-running prediction that has one.
    stopped_rows = [(r, p["prediction"]) for r, p in zip(records, free, strict=True)]
    stop = next(text[2] for _, text in stopped_rows if len(text) > 3)
    cut = predict(
        loaded, records, PredictOptions(max_new_tokens=16, stop=[stop], stop_at_eot=False)
    )
    for full, short in zip(free, cut, strict=True):
        assert short["prediction"] == cut_at_stop(full["prediction"], [stop])[0]
    assert any(stop in f["prediction"] for f in free)
    assert not any(stop in c["prediction"] for c in cut)
    assert records[0] == {"prompt": records[0]["prompt"]}  # inputs untouched


def test_chat_records_use_the_template_and_keep_the_reply_as_reference(run):
    loaded = load_model(run)
    record = {
        "messages": [
            {"role": "user", "content": "[1 2] | sort =>"},
            {"role": "assistant", "content": " [1 2]"},
        ],
        "id": 7,
    }
    [row] = predict(loaded, [record], PredictOptions(max_new_tokens=8))
    assert row["reference"] == " [1 2]" and row["id"] == 7
    prompt = chat_prompt_ids([Message("user", "[1 2] | sort =>")], loaded.tokenizer)
    # The reply is asked for after the assistant marker (this char tokenizer has no "\n").
    assert "[1 2] | sort =><|end|>" in loaded.tokenizer.decode(prompt)
    assert loaded.tokenizer.decode(prompt[-14:-1]) == "<|assistant|>"
    expected = loaded.tokenizer.decode(one_at_a_time(loaded, prompt, 8))
    assert row["prediction"] == cut_at_stop(expected, ["<|end|>"])[0]


@pytest.mark.slow
def test_exported_folder_and_lora_run_predict_like_the_run(run, tmp_path):
    pytest.importorskip("transformers")
    from lmlab.export.hf import export_hf
    from lmlab.finetune.task import finetune

    records = read_inputs("dsl:flowroll:6")
    options = PredictOptions(max_new_tokens=12)
    ours = predict(load_model(run), records, options)
    export_hf(run, tmp_path / "hf")
    theirs = predict(load_model(tmp_path / "hf"), records, options)
    assert [r["prediction"] for r in theirs] == [r["prediction"] for r in ours]

    sft = tmp_path / "sft.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"prompt": f"[{i} {i + 1}] | sort =>", "completion": f" [{i} {i + 1}]"})
            + "\n"
            for i in range(24)
        )
    )
    cfg = build_config(
        "finetune-lora",
        overrides=[
            f"finetune.base={run}",
            f"finetune.data={sft}",
            f"logging.runs_dir={tmp_path / 'ft'}",
            "finetune.epochs=0",
            "train.max_steps=6",
            "train.micro_batch_size=4",
            "train.lr=2e-2",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    lora_run = finetune(cfg, log=quiet).run_dir
    loaded = load_model(lora_run)
    rows = predict(loaded, records, PredictOptions(max_new_tokens=12, batch_size=4))
    for row in rows:
        expected = one_at_a_time(loaded, loaded.tokenizer.encode(row["prompt"]), 12)
        assert row["prediction"] == cut_at_stop(loaded.tokenizer.decode(expected), ["\n"])[0]
    # Exported with its adapters merged (only when asked), it predicts the same.
    with pytest.raises(UserError, match="--merge-lora"):
        export_hf(lora_run, tmp_path / "lora-hf")
    assert not (tmp_path / "lora-hf").exists()
    export_hf(lora_run, tmp_path / "lora-hf", merge_lora=True)
    merged = predict(load_model(tmp_path / "lora-hf"), records, options)
    assert [r["prediction"] for r in merged] == [
        r["prediction"] for r in predict(loaded, records, options)
    ]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "extra", "message"),
    [
        (None, [], "does not exist"),
        ("", [], "holds no records"),
        ('{"prompt": "a"}\nnot json\n', [], "in.jsonl:2: not JSON"),
        ('["a list"]\n', [], "expected a JSON object"),
        ('{"question": "a"}\n', [], "no 'prompt' or 'messages' field \\(it has: question\\)"),
        ('{"prompt": 3}\n', [], "'prompt' must be a string"),
        ('{"messages": []}\n', [], "non-empty list"),
        ('{"messages": [{"role": "bot", "content": "x"}]}\n', [], "has role 'bot'"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}\n', [], "a turn before"),
        ('{"prompt": "a", "prediction": "b"}\n', [], "already has a 'prediction'"),
        ('{"prompt": "' + "x" * 80 + '"}\n', [], "context 64"),
        ('{"prompt": "a"}\n', ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        ('{"prompt": "a"}\n', ["--batch-size", "0"], "--batch-size must be >= 1"),
        ('{"prompt": "a"}\n', ["--limit", "0"], "--limit must be >= 1"),
        ('{"prompt": "a"}\n', ["--stop", ""], "must not be empty"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(
    run, tmp_path, capsys, content, extra, message
):
    source = tmp_path / "in.jsonl"
    if content is not None:
        write(source, content)
    out = tmp_path / "preds.jsonl"
    assert run_cli(["predict", str(run), "--input", str(source), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert __import__("re").search(message, err), err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["in.jsonl"] if content is not None else [])


def test_existing_output_unknown_language_and_missing_model_are_refused(run, tmp_path, capsys):
    out = write(tmp_path / "preds.jsonl", "keep\n")
    args = ["--input", "dsl:flowroll:2", "--out", str(out)]
    assert run_cli(["predict", str(run), *args]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == "keep\n"
    assert run_cli(["predict", str(run), "--input", "dsl:nope", "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    with pytest.raises(UserError):
        load_model(tmp_path / "missing")


def test_lmlab_layout_saved_as_a_template_is_applied_as_lmlab_layout(run, tmp_path):
    """Fine-tunes save lmlab's layout as chat_template.jinja: loading reads it as the
    layout (turn text plain, replies end at <|end|>); any other template is kept."""
    import shutil

    from lmlab.data.chat import DEFAULT_CHAT_TEMPLATE

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = load_model(copy).path
    (ckpt / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    assert load_model(copy).chat_template is None
    other = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    (ckpt / "chat_template.jinja").write_text(other)
    assert load_model(copy).chat_template == other


def test_int8_weights_through_eval_predict_and_generate(run, tmp_path, capsys):
    def eval_json(*extra: str) -> dict:
        assert run_cli(["eval", str(run), "--json", "--batches", "4", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    plain, int8 = eval_json(), eval_json("--quantize", "int8")
    assert int8["quantize"] == "int8" and "quantize" not in plain
    assert int8["val_loss"] != plain["val_loss"]  # the int8 model did run
    assert abs(int8["val_loss"] - plain["val_loss"]) < 0.02 * plain["val_loss"]

    out = tmp_path / "preds.jsonl"
    argv = ["predict", str(run), "--input", "dsl:flowroll:6", "--out", str(out)]
    assert run_cli([*argv, "--max-new-tokens", "12", "--quantize", "int8"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(isinstance(r["prediction"], str) for r in rows)
    capsys.readouterr()

    prompt = rows[0]["prompt"]
    argv = ["generate", str(run), "--prompt", prompt, "--temperature", "0"]
    assert run_cli([*argv, "--max-new-tokens", "8", "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    with pytest.raises(SystemExit) as info:  # argparse: one line naming the choices
        cli_main([*argv, "--quantize", "int4"])
    assert info.value.code == 2
    assert "invalid choice: 'int4'" in capsys.readouterr().err
