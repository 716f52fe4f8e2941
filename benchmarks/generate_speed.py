"""Greedy generation speed on the CPU: lmlab against transformers on the same weights.

For LLaMA and GPT-2 of about 15M parameters (random weights, seeded), 256 new tokens after
a 16-token prompt, greedy, every stop token disabled:

- lmlab `generate` (the streaming path of `lmlab generate`), batch 1;
- lmlab `generate_batch` (the path of `lmlab predict`), batch 1 and batch 8;
- transformers `model.generate` on the model `lmlab.model.hf.to_hf` converts, batch 1
  and batch 8;
- lmlab with int8 weights (`--quantize int8`, a copy quantized by
  `lmlab.model.quant.quantize_linears_int8`), batch 1 and batch 8. Its tokens differ from
  float32's by design (other weights), so it is left out of the token check; the JSON
  says whether they agreed.

The runs are interleaved (one of each per round) and the medians reported, so a machine
that other programs keep busy slows every contender alike; the ratios are what to read.
Before timing, the benchmark checks that lmlab and transformers choose the same tokens.
Targets (issue 12): lmlab batch 1 >= 1.5x transformers batch 1; lmlab batch 8 >= 4x lmlab
batch 1 (throughput, tokens/s summed over rows).

Prints one JSON object.  python benchmarks/generate_speed.py [--rounds 5] [--family llama]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from lmlab.generate.batch import generate_batch
from lmlab.generate.sampling import generate
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.model.hf import to_hf
from lmlab.model.quant import quantize_linears_int8
from lmlab.runs.provenance import source_commit

NEW_TOKENS = 256
PROMPT_TOKENS = 16
SHAPE = dict(vocab_size=8192, context_length=512, n_layer=6, n_head=6, d_model=384)


def models(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    ours = build_model(ModelConfig(family=family, **SHAPE)).eval()
    theirs = to_hf(ours).eval()
    theirs.generation_config.eos_token_id = None  # never stop early: 256 tokens each
    theirs.generation_config.pad_token_id = 0
    return ours, theirs


def contenders(
    ours: torch.nn.Module, theirs: torch.nn.Module, ours_int8: torch.nn.Module, prompt: list[int]
) -> dict[str, tuple[int, Callable[[], list[list[int]]]]]:
    """name -> (batch size, a function returning each row's new tokens)."""

    def lmlab_generate(model: torch.nn.Module) -> Callable[[], list[list[int]]]:
        return lambda: [list(generate(model, torch.tensor([prompt]), NEW_TOKENS, temperature=0.0))]

    def lmlab_batch(model: torch.nn.Module, n: int) -> Callable[[], list[list[int]]]:
        return lambda: generate_batch(model, [prompt] * n, max_new_tokens=NEW_TOKENS)

    def transformers(n: int) -> Callable[[], list[list[int]]]:
        def run() -> list[list[int]]:
            with torch.inference_mode():
                out = theirs.generate(
                    torch.tensor([prompt] * n),
                    attention_mask=torch.ones(n, len(prompt), dtype=torch.long),
                    do_sample=False,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                )
            return out[:, len(prompt) :].tolist()

        return run

    return {
        "lmlab_generate_b1": (1, lmlab_generate(ours)),
        "lmlab_batch_b1": (1, lmlab_batch(ours, 1)),
        "lmlab_batch_b8": (8, lmlab_batch(ours, 8)),
        "transformers_b1": (1, transformers(1)),
        "transformers_b8": (8, transformers(8)),
        "lmlab_int8_b1": (1, lmlab_generate(ours_int8)),
        "lmlab_int8_b8": (8, lmlab_batch(ours_int8, 8)),
    }


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, a tied tensor counted once."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def bench(family: str, rounds: int) -> dict:
    ours, theirs = models(family)
    ours_int8 = copy.deepcopy(ours)
    quantize_linears_int8(ours_int8)
    prompt = torch.randint(
        1, SHAPE["vocab_size"], (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(1)
    ).tolist()
    runs = contenders(ours, theirs, ours_int8, prompt)
    outputs = {name: fn() for name, (_, fn) in runs.items()}  # warm-up, and the check
    reference = outputs["transformers_b1"][0]
    same = {name: all(row == reference for row in rows) for name, rows in outputs.items()}
    int8_same = {name: same.pop(name) for name in ("lmlab_int8_b1", "lmlab_int8_b8")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (_, fn) in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    tokens_per_s = {
        name: batch * NEW_TOKENS / statistics.median(times[name])
        for name, (batch, _) in runs.items()
    }
    return {
        "parameters": sum(p.numel() for p in ours.parameters()),
        "model_bytes": {"float32": model_bytes(ours), "int8": model_bytes(ours_int8)},
        "same_tokens_as_transformers": same,
        "int8_same_tokens_as_transformers": int8_same,
        "tokens_per_s_median": {k: round(v, 1) for k, v in tokens_per_s.items()},
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "ratios": {
            "lmlab_generate_b1_vs_transformers_b1": round(
                tokens_per_s["lmlab_generate_b1"] / tokens_per_s["transformers_b1"], 2
            ),
            "lmlab_batch_b1_vs_transformers_b1": round(
                tokens_per_s["lmlab_batch_b1"] / tokens_per_s["transformers_b1"], 2
            ),
            "lmlab_b8_vs_lmlab_b1": round(
                tokens_per_s["lmlab_batch_b8"] / tokens_per_s["lmlab_batch_b1"], 2
            ),
            "lmlab_b8_vs_transformers_b8": round(
                tokens_per_s["lmlab_batch_b8"] / tokens_per_s["transformers_b8"], 2
            ),
            "lmlab_int8_b1_vs_lmlab_b1": round(
                tokens_per_s["lmlab_int8_b1"] / tokens_per_s["lmlab_generate_b1"], 2
            ),
            "lmlab_int8_b8_vs_lmlab_b8": round(
                tokens_per_s["lmlab_int8_b8"] / tokens_per_s["lmlab_batch_b8"], 2
            ),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--family", choices=("llama", "gpt2"), action="append")
    args = parser.parse_args()
    import transformers

    result = {
        "benchmark": "generate_speed",
        "commit": source_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "new_tokens": NEW_TOKENS,
        "prompt_tokens": PROMPT_TOKENS,
        "rounds": args.rounds,
        "shape": SHAPE,
    }
    for family in args.family or ["llama", "gpt2"]:
        result[family] = bench(family, args.rounds)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
