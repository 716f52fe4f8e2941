"""A run as one GGUF file, the format llama.cpp (and tools built on it) loads.

    general.*       architecture ("gpt2" / "llama"), name, file type
    gpt2.* llama.*  context length, widths, head counts, norm epsilon, RoPE base
    tokenizer.*     byte-level BPE as llama.cpp spells it: model "gpt2", pre-tokenizer
                    "gpt-2", tokens, token types, merges, bos / eos / padding ids, and the
                    run's chat template when it has one
    tensors         llama.cpp's names (blk.N.attn_q.weight, ...), in nn.Linear's (out, in)
                    layout, which is lmlab's too

Tensor names come from one table, `gguf_tensor_pairs`: lmlab's parameter names paired with
their Hugging Face names by `lmlab.model.hf.param_pairs`, which the `gguf` package's own
HF -> GGUF name map turns into llama.cpp's names. Differences the export absorbs:
- LLaMA q / k rows are permuted. lmlab's RoPE rotates the two halves of each head
  (HF's rotate_half); llama.cpp's "llama" arch rotates adjacent pairs, so HF -> GGUF
  converters interleave the halves and GGUF -> HF loaders undo it.
- llama.cpp's "gpt2" arch requires every bias, so a bias-free GPT-2 is written with zero
  biases (the same function, as in the Hugging Face export).
- Tied embeddings: no output.weight; llama.cpp and transformers then use token_embd.

Storage types follow llama.cpp's converter: 1-D tensors, norms, biases and GPT-2's
position table stay f32; other weights are f32, f16 or q8_0. q8_0 quantizes rows in blocks
of 32, so a weight whose rows are not a multiple of 32 long is stored f16 (listed in the
result's `f16_fallback`).

The tokenizer is checked before anything is written: llama.cpp can only reproduce lmlab's
byte-level BPE (GPT-2's pre-tokenizer regex, which llama.cpp knows as pre "gpt-2"). A
char-level tokenizer, or a byte-level BPE with any other normalizer or pre-tokenizer, is
refused: llama.cpp would cut the same text into different ids. End-of-text doubles as
bos (add_bos_token is false: lmlab adds no token when it encodes); ids the model has but
the tokenizer lacks are written as unused "[PAD<id>]" tokens. lmlab encodes a special token's
text found in a prompt as plain text, as llama.cpp does when asked not to parse specials.

The export checks itself before the file appears: it reads the file back with
`gguf.GGUFReader` (tensor names, shapes, types), loads it with transformers' GGUF loader,
compares the logits with lmlab's on a fixed input (an f32 file over 1e-4 is refused; f16 and
q8_0 report theirs against EXPECTED_BOUNDS) and checks that the tokenizer transformers builds
from the file's metadata encodes sample texts to lmlab's ids. llama.cpp itself (through
llama-cpp-python) is checked by the slow tests: same token ids, same greedy continuations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from lmlab.errors import UserError
from lmlab.model.config import ModelConfig

GGUFDType = Literal["f32", "f16", "q8_0"]
GGUF_DTYPES: tuple[str, ...] = get_args(GGUFDType)
MAX_F32_DIFFERENCE = 1e-4
# What "close" means for the lossy types: about 3x the largest logit difference measured
# (transformers vs lmlab) on the `tiny` preset trained 300 steps on FLOWROLL with a BPE
# tokenizer, logits' std ~3: f16 3.1e-3 (gpt2) / 2.8e-3 (llama); q8_0 5.7e-2 / 9.2e-2. A
# guide, not a refusal: the export reports its difference and whether it is within these.
EXPECTED_BOUNDS = {"f32": MAX_F32_DIFFERENCE, "f16": 1e-2, "q8_0": 0.25}
Q8_0_BLOCK = 32  # values per q8_0 block: a q8_0 row must be a multiple of this long
# Texts whose ids the GGUF tokenizer must reproduce: spaces, newlines, digits, punctuation,
# contractions and multi-byte characters, where byte-level pre-tokenizers differ.
TOKENIZER_PROBES = (
    "Hello world",
    "[3 1 2] | sort => [1 2 3]",
    "  two  spaces,\n\nnew lines\tand a tab  ",
    "it's they're we'll I'd 12345 3.14159",
    "unicode: héllo wörld — naïve 你好 🙂",
)
_PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's byte-level regex (not "gpt2")


def gguf_tensor_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(lmlab parameter name, GGUF tensor name) for every tensor the GGUF file holds.

    A bias-free GPT-2 still lists its biases (llama.cpp's gpt2 arch requires them; they are
    written as zeros), and a tied model has no output.weight."""
    import gguf

    from lmlab.model.hf import param_pairs

    arch = gguf.MODEL_ARCH.GPT2 if cfg.family == "gpt2" else gguf.MODEL_ARCH.LLAMA
    names = gguf.get_tensor_name_map(arch, cfg.n_layer)
    full = dataclasses.replace(cfg, bias=True) if cfg.family == "gpt2" else cfg
    pairs = []
    for ours, hf_name, _ in param_pairs(full):
        if ours == "lm_head.weight" and cfg.tie_embeddings:
            continue
        theirs = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if theirs is None:
            raise RuntimeError(f"gguf has no {cfg.family} tensor name for HF {hf_name!r}")
        pairs.append((ours, theirs))
    return pairs


def export_gguf(
    spec: str | Path,
    out: str | Path,
    *,
    dtype: str = "f32",
    overwrite: bool = False,
    merge_lora: bool = False,
) -> dict[str, Any]:
    """Write a run's newest checkpoint (or a checkpoint) as one GGUF file; returns where it
    wrote and what the self-check measured.

    `out` is a file ending in .gguf, or an existing folder to hold NAME-DTYPE.gguf (NAME is
    the run's name). A LoRA run needs `merge_lora=True` (base + adapters folded in)."""
    try:
        import gguf
        import transformers  # noqa: F401  (the self-check needs it: fail before any work)
    except ImportError:
        raise UserError(
            "exporting to GGUF needs gguf and transformers: pip install 'lmlab[export]'"
        ) from None
    from lmlab.model.hf import quiet_transformers
    from lmlab.model.lora import lora_modules
    from lmlab.model.lora import merge_lora as merge_lora_into
    from lmlab.runs.load import build_from_checkpoint

    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype for gguf must be one of {', '.join(GGUF_DTYPES)}, got {dtype!r}")
    model, tokenizer, cfg, ckpt = build_from_checkpoint(spec, quantized=False)
    name = cfg.logging.name or "lmlab"
    target = _target_file(Path(out), f"{name}-{dtype}.gguf", overwrite)
    if lora_modules(model):
        if not merge_lora:
            raise UserError(
                f"{ckpt} is a {cfg.finetune.method} fine-tune (adapters on a base model): pass "
                "--merge-lora to fold them into the weights"
            )
        model = merge_lora_into(model).eval()  # a plain model: base + adapters folded in
    model = model.float()
    mcfg: ModelConfig = model.config
    if mcfg.family == "gpt2" and mcfg.gelu != "tanh":
        raise UserError(
            "GGUF's gpt2 architecture runs the tanh GELU and this model uses the exact one "
            "(model.gelu=exact): export it with --format hf instead"
        )
    if mcfg.family == "llama" and mcfg.head_dim * mcfg.n_head != mcfg.d_model:
        raise UserError("GGUF export of a LLaMA with head_dim * n_head != d_model is not supported")
    vocab = _tokenizer_vocab(tokenizer, mcfg.vocab_size)
    tensors, f16_fallback = _gguf_tensors(model, dtype)
    template = ckpt / "chat_template.jinja"
    chat_template = template.read_text(encoding="utf-8") if template.is_file() else None

    ids = torch.randint(
        0,
        mcfg.vocab_size,
        (2, min(16, mcfg.context_length)),
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        expected = model(ids)[0].float()  # (2, T, vocab)

    # Built in a hidden folder beside the target, checked there, then renamed into place:
    # a failure anywhere leaves nothing behind (TemporaryDirectory removes the folder).
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as tmp:
        path = Path(tmp) / target.name
        writer = gguf.GGUFWriter(str(path), "gpt2" if mcfg.family == "gpt2" else "llama")
        _write_metadata(writer, mcfg, name, dtype, tokenizer, vocab, chat_template)
        for tensor_name, array, qtype in tensors:
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_read_back(path, tensors, mcfg)
        with quiet_transformers():
            difference = _transformers_logit_difference(path, ids, expected)
        if dtype == "f32" and difference > MAX_F32_DIFFERENCE:
            raise UserError(
                f"the GGUF model's logits differ from lmlab's by {difference:.2e} "
                f"(over {MAX_F32_DIFFERENCE:g}); nothing was written. This is a bug: please report it"
            )
        with quiet_transformers():
            _check_tokenizer(path, tokenizer)
        size_bytes = path.stat().st_size
        os.replace(path, target)
    return {
        "out": str(target),
        "checkpoint": str(ckpt),
        "dtype": dtype,
        "architecture": mcfg.family,
        "tensors": len(tensors),
        "size_bytes": size_bytes,
        "f16_fallback": f16_fallback,
        "max_logit_difference": difference,
        "expected_max_difference": EXPECTED_BOUNDS[dtype],
        "tokenizer_probes": len(TOKENIZER_PROBES),
    }


def _target_file(out: Path, default_name: str, overwrite: bool) -> Path:
    """The file to write: `out` itself (NAME.gguf) or `out`/default_name (a folder)."""
    if out.is_dir():
        out = out / default_name
    elif out.suffix != ".gguf":
        raise UserError(f"--out {out} must be a file ending in .gguf or an existing folder")
    if out.is_dir():
        raise UserError(f"{out} is a folder: --out must name a .gguf file")
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists: choose another --out, or pass --overwrite")
    return out


def _tokenizer_vocab(tokenizer: Any, vocab_size: int) -> dict[str, list]:
    """tokens, token types and merges as llama.cpp's "gpt2" tokenizer reads them.

    UserError, before anything is written, for a tokenizer llama.cpp would not reproduce."""
    from gguf import TokenType

    spec = json.loads(tokenizer.tokenizer.to_str())
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    why = None
    if tokenizer.kind == "char":
        why = "it is char-level, which llama.cpp lacks (prepare data with --tokenizer bpe:N)"
    elif model.get("type") != "BPE" or model.get("byte_fallback"):
        why = f"its model is {model.get('type')}, not byte-level BPE"
    elif model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        why = "its BPE uses subword prefixes or suffixes"
    elif spec.get("normalizer") is not None:
        why = "it normalizes text first, which llama.cpp's byte-level BPE does not"
    elif pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex"):
        why = "its pre-tokenizer is not GPT-2's byte-level regex (llama.cpp pre 'gpt-2')"
    elif (spec.get("decoder") or {}).get("type") != "ByteLevel":
        why = "its decoder is not byte-level"
    if why is not None:
        raise UserError(f"cannot write this tokenizer to GGUF faithfully: {why}")

    added = tokenizer.tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(vocab_size):
        token = tokenizer.tokenizer.id_to_token(token_id)
        if token is None:  # the model's vocabulary is larger than the tokenizer's
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        elif token_id in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"tokens": tokens, "types": types, "merges": merges}


def _interleave_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q / k rows from rotate_half's layout (per head: all first halves, then all second
    halves) to llama.cpp's (per head: the pairs side by side). Works on weights and biases."""
    head_dim = weight.shape[0] // n_heads
    # (n_heads, 2, head_dim / 2, ...) -> (n_heads, head_dim / 2, 2, ...)
    split = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape)


def _storage_type(gguf_name: str, tensor: torch.Tensor, dtype: str) -> Any:
    """The GGML type llama.cpp's converter would choose for this tensor and --dtype."""
    from gguf import GGMLQuantizationType as Q

    if (
        tensor.ndim == 1
        or not gguf_name.endswith(".weight")
        or gguf_name.endswith("_norm.weight")
        or gguf_name.startswith("position_embd.")
        or dtype == "f32"
    ):
        return Q.F32
    if dtype == "q8_0" and tensor.shape[-1] % Q8_0_BLOCK == 0:
        return Q.Q8_0
    return Q.F16


def _gguf_tensors(model: torch.nn.Module, dtype: str) -> tuple[list[tuple[str, Any, Any]], list]:
    """[(GGUF name, numpy data, GGML type)] in file order, and the weights q8_0 left f16."""
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    cfg: ModelConfig = model.config
    state = model.state_dict()
    tensors, fallback = [], []
    for ours, theirs in gguf_tensor_pairs(cfg):
        if ours in state:
            tensor = state[ours].detach().float().cpu()
        else:  # a bias-free GPT-2's bias: zeros, one per output of its weight
            tensor = torch.zeros(state[ours.removesuffix(".bias") + ".weight"].shape[0])
        if cfg.family == "llama" and ".attn.q_proj." in ours:
            tensor = _interleave_rope_rows(tensor, cfg.n_head)
        elif cfg.family == "llama" and ".attn.k_proj." in ours:
            tensor = _interleave_rope_rows(tensor, cfg.n_kv_head)
        qtype = _storage_type(theirs, tensor, dtype)
        array = tensor.contiguous().numpy()
        if qtype == Q.Q8_0:
            array = quants.quantize(array, Q.Q8_0)  # uint8 blocks; the writer knows the shape
        elif qtype == Q.F16:
            array = array.astype(np.float16)
            if dtype == "q8_0":
                fallback.append(theirs)
        tensors.append((theirs, array, qtype))
    return tensors, fallback


def _write_metadata(
    writer: Any,
    cfg: ModelConfig,
    name: str,
    dtype: str,
    tokenizer: Any,
    vocab: dict[str, list],
    chat_template: str | None,
) -> None:
    """general.*, the architecture's hyperparameters and tokenizer.* under llama.cpp's keys."""
    import gguf

    file_types = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }
    writer.add_name(name)
    writer.add_file_type(file_types[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layer)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_head)
    if cfg.family == "gpt2":
        writer.add_layer_norm_eps(cfg.norm_eps)
    else:
        writer.add_head_count_kv(cfg.n_kv_head)
        writer.add_layer_norm_rms_eps(cfg.norm_eps)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_rope_dimension_count(cfg.head_dim)

    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    writer.add_tokenizer_pre(_PRE_TOKENIZER)
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    writer.add_token_merges(vocab["merges"])
    eot = tokenizer.eot_id
    writer.add_bos_token_id(eot)  # documents are separated (and begun) by end-of-text
    writer.add_eos_token_id(eot)
    writer.add_pad_token_id(tokenizer.pad_id if tokenizer.pad_id is not None else eot)
    # lmlab's encode adds no special tokens: neither may llama.cpp's.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def _check_read_back(path: Path, tensors: list[tuple[str, Any, Any]], cfg: ModelConfig) -> None:
    """The file holds exactly the tensors written, with their types and logical shapes."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    found = {t.name: (t.tensor_type, [int(d) for d in t.shape]) for t in reader.tensors}
    for tensor_name, array, qtype in tensors:
        shape = list(array.shape)
        if qtype == gguf.GGMLQuantizationType.Q8_0:  # bytes per row -> values per row
            shape = list(gguf.quant_shape_from_byte_shape(array.shape, qtype))
        # GGUF lists dimensions innermost first: (out, in) is stored as [in, out].
        if found.pop(tensor_name, None) != (qtype, shape[::-1]):
            raise RuntimeError(f"{path.name}: tensor {tensor_name} did not read back as written")
    if found:
        raise RuntimeError(f"{path.name}: unexpected tensors {sorted(found)}")
    arch = reader.fields["general.architecture"].contents()
    if arch != cfg.family or reader.fields[f"{arch}.block_count"].contents() != cfg.n_layer:
        raise RuntimeError(f"{path.name}: metadata did not read back as written")


def _transformers_logit_difference(path: Path, ids: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |logit| difference between transformers' model loaded from the file and lmlab's.

    transformers reads GPT-2's GGUF context length into `n_ctx` and its feed-forward width
    into `feed_forward_length`, which GPT2Config does not use (it sizes the position table
    from `n_positions`, the MLP from `n_inner`); we carry the file's values across. LLaMA
    biases likewise need `attention_bias` / `mlp_bias`, which the loader never sets."""
    import transformers

    # An absolute gguf_file: transformers tries a relative one against the working directory
    # first, so an unrelated file of the same name there would be checked instead.
    folder, name = str(path.parent), str(path.resolve())
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    if config.model_type == "gpt2":
        config.n_positions = config.n_ctx
        config.n_inner = config.feed_forward_length
    else:
        import gguf

        biased = any(t.name.endswith("attn_q.bias") for t in gguf.GGUFReader(str(path)).tensors)
        config.attention_bias = config.mlp_bias = biased
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, config=config, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()  # (2, T, vocab)
    return (logits - expected).abs().max().item()


def _check_tokenizer(path: Path, tokenizer: Any) -> None:
    """transformers' tokenizer built from the file's metadata gives lmlab's ids."""
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=str(path.resolve())
    )
    for text in TOKENIZER_PROBES:
        theirs, ours = hf_tokenizer.encode(text), tokenizer.encode(text)
        if theirs != ours:
            raise UserError(
                f"the GGUF tokenizer encodes {text!r} as {theirs[:8]}... but lmlab as "
                f"{ours[:8]}...; nothing was written. This is a bug: please report it"
            )
