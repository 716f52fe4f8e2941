"""A checkpoint whose weights were saved in bfloat16 (as a bf16 GPU run may save them)
loads on a CPU as float32 and generates."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lmlab.config import build_config
from lmlab.generate.batch import generate_batch
from lmlab.generate.predict import PredictOptions, predict, read_inputs
from lmlab.generate.sampling import generate
from lmlab.runs.checkpoint import WEIGHTS_FILE, record_hashes
from lmlab.runs.load import load_model
from lmlab.train.loop import train


def test_bf16_saved_weights_load_as_float32_and_generate(flowroll_data: Path, tmp_path: Path):
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path}",
            "model.context_length=64",
            "train.max_steps=20",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    run = train(cfg, log=lambda *a, **k: None).run_dir
    [ckpt] = sorted((run / "checkpoints").iterdir())
    weights = load_file(ckpt / WEIGHTS_FILE)
    save_file({k: v.to(torch.bfloat16) for k, v in weights.items()}, ckpt / WEIGHTS_FILE)
    record_hashes(ckpt)  # converted in place on purpose
    assert all(v.dtype == torch.bfloat16 for v in load_file(ckpt / WEIGHTS_FILE).values())

    loaded = load_model(run, "cpu")
    for name, p in loaded.model.state_dict().items():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, weights[name].to(torch.bfloat16).float()), name
    prompt = torch.tensor([loaded.tokenizer.encode("[1 2] | sort =>")])
    assert len(list(generate(loaded.model, prompt, 8, temperature=0.0))) == 8
    # A trained model, prompts of different lengths: left-padded batches give each prompt
    # the greedy tokens it gets alone.
    texts = ["[1 2] | sort =>", "[3] | rev =>", "[9 8 7 6 5] | sort | rev =>"]
    prompts = [loaded.tokenizer.encode(t) for t in texts]
    assert len({len(p) for p in prompts}) == len(prompts)
    alone = [list(generate(loaded.model, torch.tensor([p]), 10, temperature=0.0)) for p in prompts]
    assert generate_batch(loaded.model, prompts, max_new_tokens=10, pad_id=0) == alone
    [row] = predict(loaded, read_inputs("dsl:flowroll:1"), PredictOptions(max_new_tokens=8))
    assert isinstance(row["prediction"], str)
