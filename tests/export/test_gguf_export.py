"""lmlab export --format gguf: llama.cpp's names and metadata, transformers' GGUF loader gives
lmlab's logits and ids, refusals write nothing; llama.cpp itself when llama-cpp-python is there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.commands.export import main as export_main
from lmlab.config import build_config
from lmlab.errors import UserError
from lmlab.export import gguf as gguf_export
from lmlab.export.gguf import TOKENIZER_PROBES, export_gguf
from lmlab.runs.checkpoint import list_checkpoints
from lmlab.runs.load import build_from_checkpoint
from lmlab.train.loop import train

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

F16_BOUND = 2e-3  # measured on these 3-step runs: ~2e-4 (EXPECTED_BOUNDS: trained models)
Q8_0_BOUND = 2e-2  # measured on these runs: ~6e-3

# Every tensor llama.cpp's gpt2 / llama archs read for one block, as llama.cpp spells them.
GPT2_BLOCK = [
    f"{t}.{p}"
    for t in ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")
    for p in ("weight", "bias")
]
LLAMA_BLOCK = [
    f"{t}.weight"
    for t in (
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    )
]


def quiet(*args, **kwargs) -> None:
    pass


@pytest.fixture(scope="module")
def bpe_data(tmp_path_factory) -> Path:
    """FLOWROLL prepared with a byte-level BPE tokenizer (GGUF cannot hold char-level)."""
    from lmlab.data.prepare import prepare

    out = tmp_path_factory.mktemp("bpe") / "flowroll"
    prepare(["dsl:flowroll:3000"], out, "bpe:512", log=quiet)
    return out


def tiny_run(data: Path, runs: Path, family: str, *extra: str) -> Path:
    """A few steps of a 2-layer model, d_model 64 so every weight's rows suit q8_0."""
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={data}",
            f"logging.runs_dir={runs}",
            f"model.family={family}",
            "model.d_model=64",
            "model.context_length=32",
            "train.micro_batch_size=4",
            "train.max_steps=3",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
            *extra,
        ],
    )
    return train(cfg, log=quiet).run_dir


# A bias-free GPT-2 (zero biases in the file) and a grouped-query LLaMA (k permuted by its
# own head count) are the cases a converter most easily gets wrong.
RUN_VARIANTS = {"gpt2": ("model.bias=false",), "llama": ("model.n_kv_head=2",)}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def run(request, bpe_data, tmp_path_factory) -> Path:
    family = request.param
    return tiny_run(bpe_data, tmp_path_factory.mktemp("runs"), family, *RUN_VARIANTS[family])


def transformers_from_gguf(path: Path):
    """transformers' model and tokenizer from the file, with GPT2Config's two gaps filled in
    from the file's own metadata (see export/gguf.py)."""
    folder, name = str(path.parent), str(path.resolve())
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type == "gpt2":
        config.n_positions, config.n_inner = config.n_ctx, config.feed_forward_length
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=torch.float32
    ).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)


def field(reader, key: str):
    return reader.fields[key].contents()


def interleaved_by_hand(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q / k row order, one row at a time: within each head, row 2i + s is
    rotate_half's row s * half + i (s = 0 for the first half, 1 for the second)."""
    head_dim = weight.shape[0] // n_heads
    half = head_dim // 2
    rows = [
        h * head_dim + s * half + i for h in range(n_heads) for i in range(half) for s in (0, 1)
    ]
    return weight[rows]


def test_gguf_has_llama_cpp_names_metadata_and_lmlab_logits(run, tmp_path, capsys):
    out = tmp_path / "model.gguf"
    assert export_main([str(run), "--format", "gguf", "--out", str(out)]) == 0
    assert "max logit difference" in capsys.readouterr().out
    ours, tokenizer, cfg, _ = build_from_checkpoint(run)
    m = cfg.model
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in reader.tensors}

    # Names: llama.cpp's, every one, nothing else; no output.weight when tied.
    block = GPT2_BLOCK if m.family == "gpt2" else LLAMA_BLOCK
    expected = ["token_embd.weight"] + (["position_embd.weight"] if m.family == "gpt2" else [])
    expected += [f"blk.{i}.{name}" for i in range(m.n_layer) for name in block]
    expected += ["output_norm.weight"] + (["output_norm.bias"] if m.family == "gpt2" else [])
    expected += [] if m.tie_embeddings else ["output.weight"]
    assert sorted(tensors) == sorted(expected)
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    # Shapes, innermost dimension first as GGUF lists them.
    kv_width = m.n_kv_head * m.head_dim
    assert list(tensors["token_embd.weight"].shape) == [m.d_model, m.vocab_size]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [m.d_ff, m.d_model]
    if m.family == "gpt2":
        assert list(tensors["blk.0.attn_qkv.weight"].shape) == [m.d_model, 3 * m.d_model]
        assert list(tensors["position_embd.weight"].shape) == [m.d_model, m.context_length]
        assert not tensors["blk.0.attn_qkv.bias"].data.any()  # bias=False: zeros
    else:
        assert list(tensors["blk.0.attn_k.weight"].shape) == [m.d_model, kv_width]
        state = ours.state_dict()
        for name, heads in (("q", m.n_head), ("k", m.n_kv_head)):
            written = torch.from_numpy(np.array(tensors[f"blk.1.attn_{name}.weight"].data))
            lmlab = interleaved_by_hand(state[f"blocks.1.attn.{name}_proj.weight"], heads)
            assert torch.equal(written, lmlab), name
        assert field(reader, "llama.attention.head_count_kv") == m.n_kv_head
        assert field(reader, "llama.rope.freq_base") == pytest.approx(m.rope_theta)
        assert field(reader, "llama.rope.dimension_count") == m.head_dim

    # Metadata under llama.cpp's keys.
    arch = m.family
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(reader, f"{arch}.context_length") == m.context_length
    assert field(reader, f"{arch}.embedding_length") == m.d_model
    assert field(reader, f"{arch}.feed_forward_length") == m.d_ff
    assert field(reader, f"{arch}.block_count") == m.n_layer
    assert field(reader, f"{arch}.attention.head_count") == m.n_head
    eps_key = "layer_norm_epsilon" if arch == "gpt2" else "layer_norm_rms_epsilon"
    assert field(reader, f"{arch}.attention.{eps_key}") == pytest.approx(m.norm_eps)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert tokens == [tokenizer.tokenizer.id_to_token(i) for i in range(m.vocab_size)]
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[tokenizer.eot_id] == types[tokenizer.pad_id] == gguf.TokenType.CONTROL
    assert types.count(gguf.TokenType.NORMAL) == m.vocab_size - 2
    assert len(field(reader, "tokenizer.ggml.merges")) == m.vocab_size - 256 - 2
    assert field(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eot_id
    assert field(reader, "tokenizer.ggml.padding_token_id") == tokenizer.pad_id
    assert field(reader, "tokenizer.ggml.add_bos_token") is False

    # transformers' GGUF loader: lmlab's logits, lmlab's ids.
    hf_model, hf_tokenizer = transformers_from_gguf(out)
    ids = torch.randint(0, m.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        difference = (hf_model(input_ids=ids).logits - ours(ids)[0]).abs().max().item()
    assert difference <= 1e-4
    for text in (*TOKENIZER_PROBES, "[12 7 3] | reverse =>"):
        assert hf_tokenizer.encode(text) == tokenizer.encode(text), text


@pytest.mark.parametrize("dtype, bound", [("f16", F16_BOUND), ("q8_0", Q8_0_BOUND)])
def test_f16_and_q8_0_are_close_and_keep_norms_f32(run, dtype, bound, tmp_path):
    result = export_gguf(run, tmp_path, dtype=dtype)  # a folder: NAME-DTYPE.gguf inside
    out = Path(result["out"])
    assert out.parent == tmp_path and out.name == f"ultra-tiny-{dtype}.gguf"
    assert 0 < result["max_logit_difference"] <= bound
    assert result["f16_fallback"] == []  # d_model 64: every row a multiple of 32
    stored = gguf.GGMLQuantizationType.F16 if dtype == "f16" else gguf.GGMLQuantizationType.Q8_0
    for t in gguf.GGUFReader(str(out)).tensors:
        keep_f32 = len(t.shape) == 1 or t.name.startswith("position_embd")
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if keep_f32 else stored), t.name


def test_q8_0_falls_back_to_f16_for_rows_not_a_multiple_of_32(bpe_data, tmp_path, capsys):
    run = tiny_run(bpe_data, tmp_path / "runs", "llama", "model.d_model=48", "model.d_ff=128")
    argv = [str(run), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--dtype", "q8_0"]
    assert export_main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(result["out"]).tensors}
    # Rows of 48 (inputs of width d_model) cannot be q8_0; ffn_down's rows are d_ff = 128 long.
    matrices = [name for name in types if name.endswith(".weight") and "norm" not in name]
    assert sorted(result["f16_fallback"]) == sorted(n for n in matrices if "ffn_down" not in n)
    assert all(types[name] == gguf.GGMLQuantizationType.F16 for name in result["f16_fallback"])
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert result["max_logit_difference"] <= Q8_0_BOUND


def test_llama_with_biases_permutes_q_and_k_biases_too(bpe_data, tmp_path):
    run = tiny_run(bpe_data, tmp_path / "runs", "llama", "model.bias=true", "model.n_kv_head=2")
    result = export_gguf(run, tmp_path / "m.gguf")
    assert result["max_logit_difference"] <= 1e-4
    tensors = {t.name: t for t in gguf.GGUFReader(result["out"]).tensors}
    model = build_from_checkpoint(run)[0]
    state = model.state_dict()
    for name, heads in (("q", model.config.n_head), ("k", model.config.n_kv_head)):
        written = torch.from_numpy(np.array(tensors[f"blk.0.attn_{name}.bias"].data))
        assert torch.equal(
            written, interleaved_by_hand(state[f"blocks.0.attn.{name}_proj.bias"], heads)
        )
    assert {"blk.0.attn_output.bias", "blk.0.ffn_gate.bias", "blk.1.ffn_down.bias"} <= set(tensors)


def test_refusals_are_one_line_and_leave_nothing_behind(bpe_data, flowroll_data, tmp_path):
    run = tiny_run(bpe_data, tmp_path / "runs", "llama")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    existing = out_dir / "taken.gguf"
    existing.write_text("mine")
    with pytest.raises(UserError, match="exists.*--overwrite"):
        export_gguf(run, existing)
    assert existing.read_text() == "mine"
    with pytest.raises(UserError, match="ending in .gguf"):
        export_gguf(run, tmp_path / "model.bin")
    with pytest.raises(UserError, match="dtype"):
        export_main([str(run), "--format", "gguf", "--out", str(out_dir), "--dtype", "bf16"])
    empty_run = tmp_path / "runs" / "empty"
    empty_run.mkdir()
    with pytest.raises(UserError, match="no checkpoints"):
        export_gguf(empty_run, out_dir / "a.gguf")

    # Char-level: llama.cpp has no such tokenizer; refused before anything is written.
    char_run = tiny_run(flowroll_data, tmp_path / "char_runs", "gpt2")
    with pytest.raises(UserError, match="char-level") as info:
        export_gguf(char_run, out_dir / "b.gguf")
    assert "\n" not in str(info.value)

    # GGUF's gpt2 architecture has the tanh GELU only: an exact-GELU GPT-2 is refused.
    exact_run = tiny_run(bpe_data, tmp_path / "exact_runs", "gpt2", "model.gelu=exact")
    with pytest.raises(UserError, match="exact one") as info:
        export_gguf(exact_run, out_dir / "e.gguf")
    assert "\n" not in str(info.value)

    # A failed self-check (here: q / k rows not permuted) writes nothing, not even a temp file;
    # it also shows the permutation is what makes llama.cpp's layout match.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_export, "_interleave_rope_rows", lambda w, n_heads: w)
        with pytest.raises(UserError, match="logits differ"):
            export_gguf(run, out_dir / "c.gguf")
    assert sorted(p.name for p in out_dir.iterdir()) == ["taken.gguf"]

    # --overwrite replaces the file once the new one is complete.
    result = export_gguf(run, existing, overwrite=True)
    assert existing.read_bytes()[:4] == b"GGUF" and result["max_logit_difference"] <= 1e-4
    assert sorted(p.name for p in out_dir.iterdir()) == ["taken.gguf"]


def test_lora_run_exports_merged_only_with_merge_lora(bpe_data, tmp_path):
    from lmlab.finetune.task import finetune

    base = tiny_run(bpe_data, tmp_path / "base", "llama")
    cfg = build_config(
        "finetune-lora",
        overrides=[
            f"finetune.base={base}",
            "finetune.data=dsl:flowroll:200",
            f"logging.runs_dir={tmp_path / 'runs'}",
            "finetune.epochs=0",
            "train.max_steps=5",
            "train.lr=1e-2",
            "train.micro_batch_size=4",
            "train.device=cpu",
            "logging.tensorboard=false",
        ],
    )
    lora_run = finetune(cfg, log=quiet).run_dir
    out = tmp_path / "lora.gguf"
    with pytest.raises(UserError, match="--merge-lora"):
        export_main([str(lora_run), "--format", "gguf", "--out", str(out)])
    assert not out.exists()
    assert export_main([str(lora_run), "--format", "gguf", "--out", str(out), "--merge-lora"]) == 0
    # The fine-tune's chat template travels in the file, for llama.cpp's chat mode.
    template = (list_checkpoints(lora_run)[-1] / "chat_template.jinja").read_text()
    assert field(gguf.GGUFReader(str(out)), "tokenizer.chat_template") == template

    # The file computes what the unmerged run computes (adapters on), not the base.
    ours, _, _, _ = build_from_checkpoint(lora_run)
    base_model, _, _, _ = build_from_checkpoint(base)
    hf_model, _ = transformers_from_gguf(out)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs, expected = hf_model(input_ids=ids).logits, ours(ids)[0]
        assert (theirs - expected).abs().max().item() <= 1e-4
        assert (base_model(ids)[0] - expected).abs().max().item() > 1e-3  # adapters matter


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_llama_cpp_greedy_tokens_match_lmlab(bpe_data, family, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from lmlab.generate.sampling import generate

    trained = ("train.max_steps=40", "train.lr=3e-3", *RUN_VARIANTS[family])
    run = tiny_run(bpe_data, tmp_path / "runs", family, *trained)
    out = Path(export_gguf(run, tmp_path / "m.gguf")["out"])
    ours, tokenizer, _, _ = build_from_checkpoint(run)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False)
    try:
        for prompt in ("[3 1 2] | sort =>", "[7 5] | reverse =>", "[1 2 3] |"):
            ids = tokenizer.encode(prompt)
            assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids
            theirs = []
            for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, reset=True):
                theirs.append(token)
                if len(theirs) == 8:
                    break
            mine = list(generate(ours, torch.tensor([ids]), max_new_tokens=8, temperature=0.0))
            assert theirs == mine, prompt
    finally:
        llm.close()
