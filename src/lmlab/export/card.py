"""A model card (README.md) for a published model, written from the run's own files.

Every fact on the card comes from something on disk: the run's config.yaml (architecture,
training settings, base model, data), its metrics.jsonl (steps, tokens, the loss curve,
validation loss and perplexity) and any evaluation reports the user passes (`lmlab score
--out`, `lmlab eval --task ... --out`). What is not known is said to be unknown, never
guessed. The card starts with the YAML metadata the Hugging Face Hub reads (license,
library, tags, base_model, datasets, model-index).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmlab.errors import UserError

LOSS_CURVE = "loss_curve.png"


@dataclass
class CardFacts:
    """What the card says, gathered by `facts_from_run` or `facts_from_folder`."""

    name: str
    family: str
    parameters: int
    context_length: int
    vocab_size: int
    run: str | None = None
    """The run's name/id, when the model comes from an lmlab run."""
    method: str | None = None
    """"pretraining", or the fine-tuning method (full, lora, qlora, dpo, ...)."""
    base_model: str | None = None
    """A Hub name the run was fine-tuned from (metadata), or None."""
    base_description: str | None = None
    data: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    """Hub dataset names (hf:NAME inputs), for the metadata."""
    steps: int | None = None
    tokens_seen: int | None = None
    val_loss: float | None = None
    training_config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    """Rows {"source", "metric", "value", "ci_low", "ci_high"} from evaluation reports."""
    chat: bool = False
    """The folder carries a chat template (the usage example then sends messages)."""
    end_of_turn: str | None = None
    """Text that ends a reply in the chat layout when it is not a token (lmlab's `<|end|>`)."""


def _is_hub_name(name: str) -> bool:
    """OWNER/NAME that is not a path on this machine."""
    return (
        name.count("/") == 1
        and not name.startswith(("/", ".", "~"))
        and not Path(name).expanduser().exists()
    )


def _local_name(spec: str) -> str:
    """A local path as its last component: a card is public, the user's folders are not.
    `hf:` may name a local data file or saved dataset too (hf:/data/x.parquet)."""
    if spec.startswith("dsl:"):
        return spec
    prefix, rest = ("hf:", spec[3:]) if spec.startswith("hf:") else ("", spec)
    if (prefix and _is_hub_name(rest)) or "/" not in rest.replace("\\", "/"):
        return spec
    return prefix + Path(rest).name


def _hub_dataset(spec: str) -> str | None:
    """The Hub dataset id of an `hf:OWNER/NAME` input, or None (a local file, dsl:, ...)."""
    if spec.startswith("hf:") and _is_hub_name(spec[3:]):
        return spec[3:]
    return None


def _prepared_inputs(data_dir: str) -> list[str]:
    """The inputs `lmlab prepare` recorded for a data directory (or the directory itself)."""
    try:
        manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
        inputs = manifest["source"]["inputs"]
    except (OSError, ValueError, KeyError, TypeError):
        return [data_dir]
    return [str(i) for i in inputs] if isinstance(inputs, list) and inputs else [data_dir]


def facts_from_run(ckpt: Path, run_dir: Path | None, cfg: Any, parameters: int) -> CardFacts:
    """Facts of an lmlab checkpoint, its run's metrics and config (`Config`)."""
    from lmlab.runs.checkpoint import read_meta
    from lmlab.runs.metrics import read_metrics, summarize

    meta = read_meta(ckpt)
    history = read_metrics(run_dir) if run_dir is not None else []
    if "step" in meta:  # an older checkpoint of the run: its history, not what came after
        history = [r for r in history if r["step"] <= meta["step"]]
    summary = summarize(history)
    ft = cfg.finetune
    finetuned = bool(ft.base)
    base_model = None
    base_description = None
    if finetuned:
        base = str(ft.base)
        if _is_hub_name(base):
            base_model = base
        base_description = base if base_model else f"a local model ({_local_name(base)})"
    inputs = [str(ft.data)] if finetuned else _prepared_inputs(str(cfg.data.path))
    datasets = [d for d in (_hub_dataset(s) for s in inputs if s) if d]
    data = [_local_name(s) for s in inputs if s]
    config = {
        "model": _plain(cfg.model),
        "train": {
            k: v
            for k, v in _plain(cfg.train).items()
            if k not in ("device", "cpu_threads", "compile", "strategy")
        },
    }
    if finetuned:
        keep = ("method", "objective", "data", "lora_rank", "lora_alpha", "lora_dropout")
        config["finetune"] = {k: v for k, v in _plain(ft).items() if k in keep}
        config["finetune"]["data"] = _local_name(str(ft.data))
    name = run_dir.name if run_dir is not None else ckpt.name
    run = f"{run_dir.parent.name}/{run_dir.name}" if run_dir is not None else ckpt.name
    return CardFacts(
        name=name,
        family=cfg.model.family,
        parameters=parameters,
        context_length=cfg.model.context_length,
        vocab_size=cfg.model.vocab_size,
        run=run,
        method=ft.method if finetuned else "pretraining",
        base_model=base_model,
        base_description=base_description,
        data=data,
        datasets=datasets,
        steps=meta.get("step", summary["step"]),
        tokens_seen=meta.get("tokens_seen", summary["tokens_seen"]),
        val_loss=summary["last_val_loss"],
        training_config=config,
        history=history,
    )


def facts_from_folder(folder: Path) -> CardFacts:
    """Facts of an already exported Hugging Face folder (no training history)."""
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{folder}/config.json could not be read: {e}") from None
    parameters = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has keys(), not iteration)
                parameters += math.prod(f.get_slice(key).get_shape())
    family = {"llama": "llama", "gpt2": "gpt2", "mixtral": "moe"}.get(
        config.get("model_type"), "unknown"
    )
    return CardFacts(
        name=folder.name,
        family=family,
        parameters=parameters,
        context_length=config.get("max_position_embeddings") or config.get("n_positions") or 0,
        vocab_size=config.get("vocab_size", 0),
    )


def _plain(section: Any) -> dict[str, Any]:
    from dataclasses import asdict, is_dataclass

    return asdict(section) if is_dataclass(section) else dict(section)


def read_evaluations(paths: list[Path]) -> list[dict[str, Any]]:
    """Rows for the evaluation table from `lmlab score --out` and `lmlab eval --task --out`
    JSON files; anything else is refused in one line."""
    rows = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError(f"--eval {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise UserError(f"--eval {path} is not a JSON report: {e}") from None
        if isinstance(report, dict) and report.get("format") == "lmlab-score":
            source = Path(str(report.get("predictions") or path)).name
            for metric, score in report["metrics"].items():
                rows.append({"source": source, "metric": metric, **_interval(score)})
        elif isinstance(report, dict) and isinstance(report.get("tasks"), list):
            for task in report["tasks"]:
                for metric, score in task["metrics"].items():
                    rows.append(
                        {"source": Path(task["task"]).name, "metric": metric, **_interval(score)}
                    )
        else:
            raise UserError(
                f"--eval {path} is not a report of `lmlab score --out` or `lmlab eval --task --out`"
            )
    return rows


def _interval(score: dict[str, Any]) -> dict[str, Any]:
    return {k: score.get(k) for k in ("value", "ci_low", "ci_high")}


def draw_loss_curve(history: list[dict[str, Any]], path: Path) -> bool:
    """loss_curve.png of training and validation loss; False (no file) without matplotlib
    or without any loss to draw."""
    train = [(r["step"], r["loss"]) for r in history if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    if not train and not val:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        # Markers while points are few: a lone logged step is otherwise invisible.
        marker = "." if len(train) < 50 else None
        ax.plot(*zip(*train, strict=True), label="training loss", linewidth=1, marker=marker)
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _model_index_results(facts: CardFacts) -> list[dict[str, Any]]:
    """model-index results, one per dataset. The Hub (and huggingface_hub's ModelCard)
    refuse a result without its dataset's type and name: a Hub dataset id when the data
    came from one, else the data's own (public) name."""
    results = []
    if facts.val_loss is not None:
        data = ", ".join(facts.data) or "training data"
        dataset_type = facts.datasets[0] if len(facts.datasets) == 1 else data
        metrics = [
            {"type": "loss", "name": "validation loss", "value": round(facts.val_loss, 4)},
            {
                "type": "perplexity",
                "name": "validation perplexity",
                "value": round(math.exp(facts.val_loss), 2),
            },
        ]
        results.append(_result(dataset_type, f"held-out split of {data}", metrics))
    sources: dict[str, list[dict[str, Any]]] = {}
    for row in facts.evaluations:
        sources.setdefault(row["source"], []).append(
            {"type": row["metric"], "name": row["metric"], "value": row["value"]}
        )
    results += [_result(source, source, metrics) for source, metrics in sources.items()]
    return results


def _result(dataset_type: str, dataset_name: str, metrics: list) -> dict[str, Any]:
    return {
        "task": {"type": "text-generation"},
        "dataset": {"type": dataset_type, "name": dataset_name},
        "metrics": metrics,
    }


def _usage(facts: CardFacts, repo_id: str) -> list[str]:
    """A transformers snippet: plain text in, or (with a chat template) a conversation."""
    if not facts.chat:
        return [
            "from transformers import pipeline",
            "",
            f'generate = pipeline("text-generation", model="{repo_id}")',
            'print(generate("Hello", max_new_tokens=40)[0]["generated_text"])',
        ]
    lines = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
        'messages = [{"role": "user", "content": "Hello"}]',
        "inputs = tokenizer.apply_chat_template(",
        '    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True',
        ")",
        "out = model.generate(**inputs, max_new_tokens=40)",
        'reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)',
    ]
    if facts.end_of_turn:  # plain text, not a token: generate() does not stop at it
        lines.append(f'print(reply.split("{facts.end_of_turn}")[0])')
    else:
        lines.append("print(reply)")
    return lines


def model_card(facts: CardFacts, repo_id: str, license: str, has_curve: bool) -> str:
    """README.md: Hub metadata, then what the model is, how it was trained and scored,
    how to use it and what it is not for."""
    metadata: dict[str, Any] = {
        "license": license,
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["lmlab", facts.family, "text-generation"],
    }
    if facts.base_model:
        metadata["base_model"] = facts.base_model
    if facts.datasets:
        metadata["datasets"] = facts.datasets
    results = _model_index_results(facts)
    if results:
        metadata["model-index"] = [{"name": repo_id.split("/")[1], "results": results}]

    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", ""]
    lines += [f"# {repo_id.split('/')[1]}", ""]
    kind = {"llama": "LLaMA", "gpt2": "GPT-2", "moe": "Mixture-of-experts (Mixtral)"}.get(
        facts.family, facts.family
    )
    origin = (
        f"trained with lmlab (run `{facts.run}`)"
        if facts.run
        else "published from a Hugging Face folder"
    )
    lines += [
        f"A {facts.parameters:,}-parameter {kind}-architecture language model, {origin}. "
        f"Context length {facts.context_length} tokens, vocabulary {facts.vocab_size:,} tokens.",
        "",
    ]
    lines += ["## Training", ""]
    if facts.run is None:
        lines += ["Unknown: this card was written for an exported folder without its run.", ""]
    else:
        if facts.method == "pretraining":
            lines.append("Trained from scratch.")
        else:
            lines.append(f"Fine-tuned ({facts.method}) from {facts.base_description}.")
        lines.append("")
        lines.append(f"- data: {', '.join(f'`{d}`' for d in facts.data) or 'unknown'}")
        if facts.steps is not None:
            lines.append(f"- steps: {facts.steps:,}")
        if facts.tokens_seen is not None:
            lines.append(f"- tokens seen: {facts.tokens_seen:,}")
        lines += [
            "",
            "Training configuration:",
            "",
            "```yaml",
            yaml.safe_dump(facts.training_config, sort_keys=False).rstrip(),
            "```",
            "",
        ]
        if has_curve:
            lines += [f"![training and validation loss]({LOSS_CURVE})", ""]
        else:
            lines += [
                "(No loss curve: matplotlib is not installed, or the run logged no loss.)",
                "",
            ]
    lines += ["## Evaluation", ""]
    if facts.val_loss is None and not facts.evaluations:
        lines += ["No evaluation was recorded.", ""]
    else:
        lines += ["| data | metric | value | 95% interval |", "|---|---|---:|---|"]
        if facts.val_loss is not None:
            lines.append(
                f"| held-out split of the training data | validation loss (perplexity {math.exp(facts.val_loss):.2f}) | {facts.val_loss:.4f} | |"
            )
        for row in facts.evaluations:
            interval = (
                f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]"
                if row.get("ci_low") is not None
                else ""
            )
            lines.append(f"| {row['source']} | {row['metric']} | {row['value']:.4f} | {interval} |")
        lines.append("")
    lines += ["## How to use", "", "```python", *_usage(facts, repo_id), "```", ""]
    lines += [
        "## Intended use and limitations",
        "",
        f"A small model ({facts.parameters:,} parameters"
        + (f", {facts.tokens_seen:,} tokens in its last training run" if facts.tokens_seen else "")
        + ") for learning, experiments and narrow tasks like the data it was trained on. "
        "It has not been evaluated for safety, bias or factual accuracy; expect confident, "
        "wrong and repetitive output outside its training data, and do not use it for "
        "decisions that affect people.",
        "",
    ]
    return "\n".join(lines)
