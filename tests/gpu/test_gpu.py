"""The GPU tier: what only a CUDA device can check, each on a tiny model in seconds.

`pytest -m gpu` runs these on a machine with CUDA; elsewhere every one is skipped with the
reason (`pytest -m gpu -rs`), and the default run (`-m 'not slow and not gpu'`) deselects
them. The helpers take the device as an argument, so their logic also runs on a CPU.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmlab.cli import main as cli_main
from lmlab.config import Config, build_config
from lmlab.data.loader import TokenLoader
from lmlab.data.shards import load_manifest, open_split
from lmlab.estimate.plan import make_plan
from lmlab.generate.sampling import generate
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.runs.device import autocast, peak_flops
from lmlab.runs.load import build_from_checkpoint
from lmlab.train.distributed.runtime import Dist
from lmlab.train.loop import train
from lmlab.train.optim import adamw_options, param_groups
from lmlab.train.setup import Engine, build_engine, train_step

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False)",
    ),
]

Batch = tuple[torch.Tensor, torch.Tensor]


# ---- helpers (device-independent) --------------------------------------------------------


def small_config(data: Path, device: torch.device, *overrides: str) -> Config:
    """A 2-layer LLaMA over the data's characters. head_dim is 16, a multiple of 8, so
    flash attention can take it in bf16 (ultra-tiny's head_dim of 12 could not)."""
    vocab_size = load_manifest(data)["tokenizer"]["vocab_size"]
    return build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"model.vocab_size={vocab_size}",
            "model.context_length=64",
            "model.n_layer=2",
            "model.d_model=64",
            "model.n_head=4",
            f"train.device={device}",
            "train.lr=1e-3",
            "logging.tensorboard=false",
            *overrides,
        ],
    )


def fixed_batches(data: Path, n: int, micro_batch: int = 16, seq_len: int = 64) -> list[Batch]:
    """The first n batches of the train split, in a seeded order: real text, so the loss
    falls quickly and two runs can be compared along a curve rather than at ln(vocab)."""
    loader = TokenLoader(open_split(data, "train"), micro_batch, seq_len, seed=0)
    return [loader.next_batch() for _ in range(n)]


def full_fp32_matmuls(device: torch.device) -> None:
    """IEEE fp32 matmuls: build_engine turns TF32 on, whose 10-bit mantissa would blur
    comparisons that are meant to be between fp32 and something else."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def parameters(engine: Engine) -> dict[str, torch.Tensor]:
    """A copy of the engine's weights, by name."""
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def run_steps(
    cfg: Config, device: torch.device, batches: list[Batch]
) -> tuple[list[float], dict[str, torch.Tensor], Engine]:
    """A seeded engine (the trainer's set-up) and one trainer step per batch: the losses,
    the initial weights and the engine."""
    engine = build_engine(cfg, Dist(), device)
    full_fp32_matmuls(device)
    start = parameters(engine)
    t = cfg.train
    losses = [
        float(train_step(engine, lambda b=b: b, accum=1, lr=t.lr, grad_clip=t.grad_clip))
        for b in batches
    ]
    return losses, start, engine


def step_with_gradients(
    engine: Engine, grads: list[torch.Tensor], lr: float, grad_clip: float, finite: bool = True
) -> None:
    """One trainer step whose gradients are exactly `grads` (the loss is sum(p * g)), so two
    engines are given the same gradients whatever their kernels; `finite=False` makes the
    loss NaN (gradients unchanged), a step the trainer must skip."""
    params = list(engine.model.parameters())

    def loss_fn(batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        loss = sum((p * g).sum() for p, g in zip(params, grads, strict=True))
        return loss if finite else loss + float("nan")

    train_step(engine, lambda: (torch.zeros(1),), 1, lr, grad_clip, loss_fn=loss_fn)


FLASH = "aten::_scaled_dot_product_flash_attention"
FUSED_SDPA = (
    FLASH,
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)
"""SDPA's fused CUDA implementations: none of them materialises the T x T scores."""
SDPA_OPS = (
    *FUSED_SDPA,
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_attention_math",
)


def sdpa_kernels_used(
    model: torch.nn.Module, idx: torch.Tensor, dtype: torch.dtype | None
) -> set[str]:
    """Which of SDPA's implementations a training forward and backward dispatched to (the
    aten op names the profiler records on the host, whatever the device)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with autocast(idx.device, dtype):
            loss = model(idx, idx)[1]
        loss.backward()
    return {event.key for event in prof.key_averages()} & set(SDPA_OPS)


# ---- 1. bf16 autocast vs fp32 ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_bf16_autocast_training_follows_fp32(flowroll_data: Path, cuda: torch.device, family):
    """Same seed, init and batches: the bf16 run's loss stays within 1% of the fp32 run's
    at each of 20 steps, while the loss itself falls by a fifth or more. bf16 keeps 8
    significant bits (each rounding errs by up to 2^-8, 0.4%), but the weights, the
    residual stream, the norms and the loss stay fp32 and the loss is a mean over 1,024
    tokens, so roundings mostly cancel: on a CPU (bf16 autocast) the two curves differ
    by about 1e-4. A 1% gap means more than rounding (a matmul or a reduction in the
    wrong precision)."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(cuda)} has no bf16")
    batches = fixed_batches(flowroll_data, 20)
    family_override = f"model.family={family}"
    fp32, _, _ = run_steps(
        small_config(flowroll_data, cuda, family_override, "train.precision=fp32"), cuda, batches
    )
    bf16, _, engine = run_steps(
        small_config(flowroll_data, cuda, family_override, "train.precision=bf16"), cuda, batches
    )
    assert engine.amp_dtype == torch.bfloat16
    assert all(math.isfinite(x) for x in fp32 + bf16)
    assert fp32[-1] < 0.8 * fp32[0]  # it learned: not two flat lines at ln(vocab)
    assert bf16 == pytest.approx(fp32, rel=1e-2)


# ---- 2. fused vs foreach AdamW ---------------------------------------------------------------


def test_fused_adamw_matches_foreach(flowroll_data: Path, cuda: torch.device):
    """lmlab picks the fused AdamW kernel on CUDA; given the same gradients for 5 trainer
    steps (the third non-finite, which the fused kernel skips on the device through
    `found_inf`), its weights equal the foreach implementation's to ~1e-6 relative (the
    two order the same fp32 arithmetic differently) and it counts 4 steps."""
    cfg = small_config(flowroll_data, cuda, "train.precision=fp32")
    t = cfg.train
    fused = build_engine(cfg, Dist(), cuda)
    assert fused.optimizer.defaults["fused"]  # lmlab's own choice on CUDA
    foreach = build_engine(cfg, Dist(), cuda)
    foreach.optimizer = torch.optim.AdamW(
        param_groups(foreach.model, t.weight_decay),
        **{**adamw_options(t, cuda), "fused": False, "foreach": True},
    )
    start = parameters(fused)
    assert all(torch.equal(start[n], p) for n, p in parameters(foreach).items())

    generator = torch.Generator().manual_seed(0)
    before = start
    for step in range(5):
        grads = [
            (torch.randn(p.shape, generator=generator) * 1e-2).to(cuda)
            for p in fused.model.parameters()
        ]
        finite = step != 2
        for engine in (fused, foreach):
            step_with_gradients(engine, grads, t.lr, t.grad_clip, finite)
            assert float(engine.skipped) == (0.0 if finite else 1.0)
        after = parameters(fused)
        for name, p in parameters(foreach).items():
            torch.testing.assert_close(after[name], p, rtol=1e-6, atol=1e-8, msg=name)
            if not finite:
                assert torch.equal(after[name], before[name]), f"{name} moved in a skipped step"
        before = after
    for name, p in before.items():  # every weight trained (each has a gradient)
        assert not torch.equal(p, start[name]), name
    for p in fused.model.parameters():
        assert float(fused.optimizer.state[p]["step"]) == 4  # the skipped step is not counted


# ---- 3. flash attention -------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,n_kv_head",
    [("llama", None), ("llama", 2), ("gpt2", None)],
    ids=["llama", "gqa", "gpt2"],
)
def test_attention_takes_flash_attention_in_bf16(cuda: torch.device, family, n_kv_head):
    """A bf16 training step of either family (GQA too) dispatches SDPA to one fused
    kernel by itself, never to the math path that materialises T x T scores; and with
    flash attention forced it runs (`sdpa_kernel` raises if flash cannot take the
    inputs: a mask, an odd head_dim, a stride) and gives the loss of the default pick."""
    capability = torch.cuda.get_device_capability(cuda)
    if capability < (8, 0):
        pytest.skip(f"flash attention needs compute capability 8.0+, this GPU has {capability}")
    cfg = ModelConfig(
        family=family,
        vocab_size=512,
        context_length=256,
        n_layer=2,
        n_head=4,
        n_kv_head=n_kv_head,
        d_model=256,  # head_dim 64
    )
    torch.manual_seed(0)
    model = build_model(cfg, cuda)
    idx = torch.randint(0, cfg.vocab_size, (4, 256), device=cuda)
    used = sdpa_kernels_used(model, idx, torch.bfloat16)
    assert len(used) == 1 and used <= set(FUSED_SDPA), used
    with autocast(cuda, torch.bfloat16):
        chosen = model(idx, idx)[1]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), autocast(cuda, torch.bfloat16):
        flash = model(idx, idx)[1]
    flash.backward()
    assert math.isfinite(flash.item()) and flash.item() == pytest.approx(chosen.item(), rel=1e-3)


# ---- 4. torch.compile vs eager -------------------------------------------------------------


@pytest.mark.parametrize(
    "precision,loss_rel,weights_rel",
    [("fp32", 1e-4, 1e-3), ("bf16", 1e-2, 0.1)],
    ids=["fp32", "bf16"],
)
def test_compiled_training_steps_match_eager(
    flowroll_data: Path, cuda: torch.device, precision, loss_rel, weights_rel
):
    """train.compile=true (each block compiled by lmlab's parallelize) against eager over 5
    steps: the same losses, and weights whose distance from eager's is small next to how
    far training moved them. Inductor fuses elementwise ops and reductions, so the two
    differ by rounding only. On a CPU (Inductor's C++ backend) the losses differ by 0
    (fp32) and 8e-5 (bf16) relative, the weights by 2e-6 (fp32) and 1.3e-2 (bf16) of the
    distance moved: in bf16 a rounding can flip the sign of a tiny gradient, which
    AdamW's first steps turn into a full-size update."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(cuda)} has no bf16")
    batches = fixed_batches(flowroll_data, 5)
    settings = [f"train.precision={precision}", "train.lr=3e-3"]
    torch.compiler.reset()
    try:
        eager, start, eager_engine = run_steps(
            small_config(flowroll_data, cuda, *settings), cuda, batches
        )
        compiled, _, compiled_engine = run_steps(
            small_config(flowroll_data, cuda, *settings, "train.compile=true"), cuda, batches
        )
        assert all(  # what nn.Module.compile sets: compile really was applied
            getattr(block, "_compiled_call_impl", None) is not None
            for block in compiled_engine.model.blocks
        )
        assert compiled == pytest.approx(eager, rel=loss_rel)
        a, b = parameters(eager_engine), parameters(compiled_engine)
        moved = math.sqrt(sum((a[n] - start[n]).double().square().sum() for n in a))
        apart = math.sqrt(sum((a[n] - b[n]).double().square().sum() for n in a))
        assert apart < weights_rel * moved
    finally:
        torch.compiler.reset()


# ---- 5. a bf16 GPU checkpoint on the CPU ---------------------------------------------------


def test_bf16_gpu_checkpoint_generates_on_cpu(flowroll_data: Path, tmp_path: Path, cuda):
    """`lmlab train` in bf16 on the GPU, then the checkpoint through `lmlab generate`'s
    loader on the CPU: it generates valid token ids, and its fp32 logits over the prompt
    and continuation equal the same checkpoint's logits on the GPU (IEEE fp32 there too)."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(cuda)} has no bf16")
    cfg = small_config(
        flowroll_data,
        cuda,
        "train.precision=bf16",
        f"logging.runs_dir={tmp_path}",
        "train.max_steps=30",
        "train.warmup_steps=5",
        "train.micro_batch_size=8",
        "eval.interval=0",
        "checkpoint.interval=0",
    )
    run_dir = train(cfg, log=lambda *a, **k: None).run_dir

    model, tokenizer, saved, _ = build_from_checkpoint(run_dir, torch.device("cpu"))
    assert saved.train.precision == "bf16" and saved.train.device == str(cuda)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    prompt = tokenizer.encode("[3 1 2] | sort =>")
    new = list(generate(model, torch.tensor([prompt]), 16, temperature=0.0))
    assert len(new) == 16 and all(0 <= t < saved.model.vocab_size for t in new)
    assert isinstance(tokenizer.decode(new), str)

    gpu_model, *_ = build_from_checkpoint(run_dir, cuda)
    full_fp32_matmuls(cuda)
    sequence = torch.tensor([prompt + new])
    with torch.no_grad():
        cpu_logits = model(sequence)[0]
        gpu_logits = gpu_model(sequence.to(cuda))[0].cpu()
    assert gpu_logits.dtype == torch.float32
    torch.testing.assert_close(cpu_logits, gpu_logits, rtol=1e-4, atol=1e-4)


# ---- 6. `lmlab bench` MFU -------------------------------------------------------------------


def test_bench_reports_mfu_on_cuda(cuda: torch.device, capsys):
    """`lmlab bench --device cuda` prints JSON whose mfu is a fraction in (0, 1], the
    model FLOPs per second over the GPU's dense peak."""
    peak = peak_flops(cuda)
    if peak is None:
        pytest.skip(
            f"no dense peak FLOP/s known for {torch.cuda.get_device_name(cuda)} "
            "(lmlab.runs.device.PEAK_FLOPS), so bench reports no MFU"
        )
    args = ["bench", "--preset", "tiny", "--steps", "3", "--warmup", "2"]
    args += ["--seq-len", "256", "--micro-batch", "8", "--device", str(cuda)]
    with pytest.raises(SystemExit) as info:
        cli_main(args)
    assert info.value.code == 0
    result = json.loads(capsys.readouterr().out)
    mfu = result["mfu"]
    assert isinstance(mfu, float) and 0 < mfu <= 1
    assert mfu == pytest.approx(result["flops_per_token"] * result["tokens_per_s"] / peak)
    assert result["peak_flops"] == peak and result["precision"] in ("bf16", "fp16")
    assert result["memory_measure"] == "torch.cuda.max_memory_allocated"
    assert result["peak_memory_bytes"] > 0


# ---- 7. the planner's memory estimate -----------------------------------------------------


def random_batches(vocab_size: int, micro_batch: int, seq_len: int, n: int) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab_size, (n, micro_batch, seq_len + 1), generator=generator)
    return [(row[:, :-1], row[:, 1:]) for row in rows]


def accumulated_step(engine: Engine, batches: list[Batch], lr: float) -> None:
    """One trainer step over len(batches) micro-batches: from the second on, the
    gradients of the earlier ones are alive with the activations, as the planner counts."""
    pending = iter(batches)
    train_step(engine, lambda: next(pending), accum=len(batches), lr=lr, grad_clip=1.0)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_planned_memory_matches_cuda_peak_within_15_percent(cuda: torch.device, precision):
    """`lmlab plan`'s per-GPU memory (make_plan's memory_per_gpu) for a 15M-parameter
    LLaMA at micro-batch 16 x 256 tokens, against torch.cuda.max_memory_allocated over
    one real training step (two micro-batches, AdamW state already made), less what was
    allocated before the model was built. Activations and the loss buffer are most of
    it (over 1 GiB), weights, gradients and AdamW state the rest."""
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip(f"{torch.cuda.get_device_name(cuda)} has no bf16")
    micro_batch, seq_len = 16, 256
    overrides = [
        "model.vocab_size=8192",
        f"model.context_length={seq_len}",
        f"train.device={cuda}",
        f"train.precision={precision}",
    ]
    cfg = build_config("medium", overrides=overrides)
    plan = make_plan(cfg.model, micro_batch=micro_batch, seq_len=seq_len, precision=precision)
    planned = plan["memory_per_gpu"]["total_bytes"]
    batches = random_batches(cfg.model.vocab_size, micro_batch, seq_len, 2)

    # A throwaway step first, so that what stays allocated once per process (cuBLAS
    # workspaces) is in the baseline and not in the measurement.
    warm = build_config("medium", overrides=[*overrides, "model.n_layer=1"])
    engine = build_engine(warm, Dist(), cuda)
    accumulated_step(engine, random_batches(warm.model.vocab_size, 2, 64, 2), cfg.train.lr)
    del engine
    gc.collect()
    torch.cuda.synchronize(cuda)
    torch.cuda.empty_cache()
    baseline = torch.cuda.memory_allocated(cuda)

    engine = build_engine(cfg, Dist(), cuda)
    accumulated_step(engine, batches, cfg.train.lr)  # AdamW's state exists from here on
    torch.cuda.synchronize(cuda)
    torch.cuda.reset_peak_memory_stats(cuda)
    accumulated_step(engine, batches, cfg.train.lr)
    torch.cuda.synchronize(cuda)
    measured = torch.cuda.max_memory_allocated(cuda) - baseline
    print(precision, "planned", planned, "measured", measured, plan["memory_per_gpu"])
    assert planned > 2**30 and plan["memory_per_gpu"]["activations_bytes"] > planned / 3
    assert planned == pytest.approx(measured, rel=0.15)
