"""Best-fit packing (lmlab.data.packing) and document masks (model.attention)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmlab.config import build_config
from lmlab.data.loader import TokenLoader
from lmlab.data.packing import PackedLoader, best_fit_decreasing, find_documents
from lmlab.data.shards import TokenSplit
from lmlab.errors import UserError
from lmlab.model.attention import document_attention
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig
from lmlab.train.loop import train

EOT = 0


def stream(lengths: list[int] | np.ndarray, first: int, closed: bool = True) -> np.ndarray:
    """Documents of the given lengths, each followed by EOT; every other token is unique
    (first, first + 1, ...), so where each token went can be checked. `closed=False`
    leaves the last document without its EOT (a shard cut mid-document)."""
    total = int(np.sum(lengths)) + len(lengths)
    tokens = np.arange(first, first + total, dtype=np.int64)
    tokens[np.cumsum(np.asarray(lengths) + 1) - 1] = EOT
    return tokens if closed else tokens[:-1]


def web_like(n_docs: int, seed: int, vocab: int = 50_000) -> np.ndarray:
    """Lognormal document lengths (median 400 tokens, sigma 1: a long tail), random ids."""
    rng = np.random.default_rng(seed)
    lengths = np.maximum(1, np.round(rng.lognormal(np.log(400), 1.0, n_docs))).astype(np.int64)
    tokens = rng.integers(1, vocab, int(lengths.sum()) + n_docs)
    tokens[np.cumsum(lengths + 1) - 1] = EOT
    return tokens.astype(np.uint16)


def small_split() -> TokenSplit:
    rng = np.random.default_rng(3)
    a = stream(rng.integers(1, 40, 60).tolist() + [75, 3, 64], first=1)  # 75, 64: longer than a row
    b = stream(rng.integers(1, 20, 50).tolist(), first=len(a) + 1, closed=False)
    return TokenSplit([a, b])


# ---- the plan ----------------------------------------------------------------------------


def test_best_fit_decreasing_fills_the_tightest_row():
    rows = best_fit_decreasing(np.array([5, 7, 3, 2, 6, 1]), 10)
    # 7 -> row 0 (3 left), 6 -> row 1 (4 left), 5 -> row 2 (5 left), 3 -> row 0 (full),
    # 2 -> row 1 (2 left), 1 -> row 1 (1 left)
    assert rows.tolist() == [2, 0, 0, 1, 1, 1]


def test_rows_start_at_documents_and_hold_every_token_once():
    split, T = small_split(), 16
    loader = PackedLoader(split, 1, T, EOT, seed=7, doc_ids=True)
    docs = find_documents(split, EOT)
    doc_of = {
        (int(s), int(b)): int(n)
        for s, b, n in zip(docs.shard, docs.start, docs.length, strict=True)
    }
    plan = loader.epoch_rows(0)
    for p in range(len(plan.length)):
        s, start = int(plan.shard[p]), int(plan.start[p])
        if (s, start) in doc_of:  # a document begins here: at an EOT or a shard's start
            assert start == 0 or split.shards[s][start] == EOT
            continue
        # else a piece of a document longer than a row, cut at a multiple of the row length
        begin = max(b for (s2, b) in doc_of if s2 == s and b < start)
        assert doc_of[(s, begin)] > T and (start - begin) % T == 0
    inputs, targets = [], []
    for _ in range(plan.num_rows):  # one row per batch: the whole epoch, nothing dropped
        x, y, doc = loader.next_batch()
        real = y[0] != -100
        assert torch.equal(real, torch.arange(T) < real.sum()) and real[0]  # padding at the end
        assert (doc[0].diff() >= 0).all()
        inputs += x[0][real].tolist()
        targets += y[0][real].tolist()
    assert loader.epoch == 0 and loader.position == plan.num_rows
    assert sorted(inputs) == sorted(np.concatenate([s[:-1] for s in split.shards]).tolist())
    assert sorted(targets) == sorted(np.concatenate([s[1:] for s in split.shards]).tolist())
    assert loader.num_tokens == len(targets)


@pytest.mark.parametrize("seq_len", [256, 1024])
def test_utilisation_on_web_like_lengths(seq_len: int):
    split = TokenSplit([web_like(12_000, seed=1), web_like(12_000, seed=2)])
    loader = PackedLoader(split, 8, seq_len, EOT)
    assert loader.utilisation >= 0.995, loader.utilisation
    assert loader.epoch_rows(1).utilisation >= 0.995


def test_packing_is_deterministic_resumable_and_ranks_are_disjoint():
    split = small_split()
    a = PackedLoader(split, 3, 16, EOT, seed=5, doc_ids=True)
    batches = [a.next_batch() for _ in range(a.batches_per_epoch + 3)]  # crosses an epoch
    assert a.epoch == 1
    b = PackedLoader(split, 3, 16, EOT, seed=5, doc_ids=True)
    for _ in range(7):
        b.next_batch()
    c = PackedLoader(split, 3, 16, EOT, seed=5, doc_ids=True)
    c.load_state_dict(b.state_dict())
    for expected in batches[7:]:
        assert all(torch.equal(t, e) for t, e in zip(c.next_batch(), expected, strict=True))
    other_seed = PackedLoader(split, 3, 16, EOT, seed=6).next_batch()
    assert not torch.equal(other_seed[0], batches[0][0])
    assert not np.array_equal(a.epoch_rows(0).order, a.epoch_rows(1).order)
    with pytest.raises(UserError, match="seq_len was 16, now 8"):
        PackedLoader(split, 3, 8, EOT, seed=5).load_state_dict(b.state_dict())
    with pytest.raises(UserError, match="packed with concat"):
        c.load_state_dict(TokenLoader(split, 3, 16, seed=5).state_dict())
    r0, r1 = (PackedLoader(split, 2, 16, EOT, seed=5, rank=r, world_size=2) for r in (0, 1))
    w0, w1 = r0.next_rows(), r1.next_rows()
    assert not set(w0) & set(w1)
    assert sorted([*w0, *w1]) == sorted(PackedLoader(split, 4, 16, EOT, seed=5).next_rows())


def test_too_little_data_and_bad_tokens_are_one_line_errors():
    split = TokenSplit([stream([3, 4, 5], first=1)])
    with pytest.raises(UserError, match="too little data"):
        PackedLoader(split, 8, 16, EOT)
    loader = PackedLoader(split, 1, 16, EOT, vocab_size=5)
    with pytest.raises(UserError, match="beyond the vocabulary"):
        loader.next_batch()


def test_concat_document_ids_begin_at_each_eot():
    split = TokenSplit([stream([3, 1, 5, 2, 6, 4], first=1)])
    x, _, doc = TokenLoader(split, 2, 8, shuffle=False, eot_id=EOT).next_batch()
    assert torch.equal(doc, (x == EOT).cumsum(dim=1))
    assert doc[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # x[0] = 1 2 3 EOT 5 EOT 7 8


def test_packing_is_a_config_choice():
    assert build_config("tiny").data.packing == "concat"
    assert build_config("tiny", overrides=["data.packing=best_fit"]).data.packing == "best_fit"
    with pytest.raises(UserError, match="data.packing must be one of concat, best_fit"):
        build_config("tiny", overrides=["data.packing=best-fit"])


# ---- the mask and positions -------------------------------------------------------------


def reference_document_attention(doc_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain loops that `document_attention` replaces."""
    B, T = doc_ids.shape
    positions = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        ids = doc_ids[b].tolist()
        for i in range(T):
            start = i
            while start > 0 and ids[start - 1] == ids[i]:
                start -= 1
            positions[b, i] = i - start
            for j in range(start, i + 1):
                mask[b, 0, i, j] = True
    return positions, mask


def test_document_attention_matches_the_reference():
    gen = torch.Generator().manual_seed(0)
    doc_ids = (torch.rand(5, 37, generator=gen) < 0.15).long().cumsum(dim=1)
    doc_ids[0] = 0  # one document
    doc_ids[1] = torch.arange(37)  # every token its own
    positions, mask = document_attention(doc_ids)
    expected_positions, expected_mask = reference_document_attention(doc_ids)
    assert torch.equal(positions, expected_positions) and torch.equal(mask, expected_mask)
    assert torch.equal(mask[0, 0], torch.ones(37, 37, dtype=torch.bool).tril())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_doc_mask_loss_equals_the_documents_alone(family: str):
    torch.manual_seed(0)
    cfg = ModelConfig(
        family=family,
        vocab_size=97,
        context_length=48,
        n_layer=2,
        n_head=4,
        d_model=32,
        init_std=0.2,  # far from uniform outputs, so that reading other documents shows
    )
    model = build_model(cfg).eval()
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 30, 40).tolist()
    tokens = rng.integers(1, 97, int(np.sum(lengths)) + len(lengths))
    tokens[np.cumsum(np.asarray(lengths) + 1) - 1] = EOT
    loader = PackedLoader(TokenSplit([tokens]), 4, 48, EOT, doc_ids=True)
    x, y, doc = loader.next_batch()
    assert (doc.amax(dim=1) >= 1).all()  # two documents (or one and padding) in every row
    with torch.no_grad():
        positions, mask = document_attention(doc)
        packed = model(x, y, positions=positions, attn_mask=mask)[1]
        total, count = 0.0, 0
        for b in range(len(x)):
            for d in doc[b].unique():
                where = (doc[b] == d) & (y[b] != -100)
                if where.any():  # padding has no targets
                    alone = model(x[b][where][None], y[b][where][None])[1]
                    total += alone.item() * int(where.sum())
                    count += int(where.sum())
        unmasked = model(x, y)[1]
    assert count == int((y != -100).sum())
    assert packed.item() == pytest.approx(total / count, rel=1e-5, abs=1e-6)
    assert abs(unmasked.item() - total / count) > 1e-3


# ---- training -----------------------------------------------------------------------------


def test_training_with_best_fit_and_doc_mask_reports_utilisation(flowroll_data: Path, tmp_path):
    lines: list[str] = []
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path / 'runs'}",
            "data.packing=best_fit",
            "data.doc_mask=true",
            "model.context_length=64",
            "train.micro_batch_size=4",
            "train.max_steps=3",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    result = train(cfg, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    startup = next(line for line in lines if line.startswith("model "))
    assert "| best_fit packing (" in startup and "of row tokens real, document mask)" in startup
    assert result.state.step == 3 and np.isfinite(result.final_eval["val_loss"])
