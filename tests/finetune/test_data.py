"""Fine-tuning data: record validation, loss masks, chat templates, batching, resume."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lmlab.data.dsl import generate_corpus
from lmlab.data.tokenizer import EOT, train_char
from lmlab.errors import UserError
from lmlab.finetune.data import (
    DEFAULT_CHAT_TEMPLATE,
    IGNORE_INDEX,
    Chat,
    Example,
    Message,
    PreferenceLoader,
    PreferencePair,
    PromptCompletion,
    SFTLoader,
    Text,
    dsl_records,
    load_sft_splits,
    pad_batch,
    pad_id_for,
    read_chat_template,
    read_preference_pairs,
    read_sft_records,
    render_chat,
    split_records,
    tokenize_pairs,
    tokenize_records,
)
from lmlab.model.build import build_model
from lmlab.model.config import ModelConfig

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = (
    Message("system", "You are terse."),
    Message("user", "Hi there"),
    Message("assistant", "Hello."),
)


@pytest.fixture(scope="module")
def tok():
    """Char-level: every printable ASCII character is one token, so decoding is exact."""
    return train_char([string.printable + "äöü"])


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def learned_text(tok, example: Example) -> str:
    """The tokens that carry loss, decoded (labels[0] is never a target, so it must be -100)."""
    assert example.labels[0] == IGNORE_INDEX
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


def tiny_model(vocab_size: int, context_length: int = 64):
    """float64 weights, so the 1e-6 comparisons below measure masking, not rounding."""
    torch.manual_seed(0)
    cfg = ModelConfig("gpt2", vocab_size, context_length, n_layer=2, n_head=2, d_model=32)
    return build_model(cfg).double().eval()


# ---------------------------------------------------------------------------------------
# Loss masks


def test_prompt_completion_learns_completion_and_end_token(tok):
    (example,), stats = tokenize_records([PromptCompletion("2+2 =", " 4, surely")], tok, 64)
    assert tok.decode(example.input_ids) == "2+2 = 4, surely" + EOT
    assert learned_text(tok, example) == " 4, surely" + EOT
    n_prompt = len(tok.encode("2+2 ="))
    assert example.labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example.labels[n_prompt:] == example.input_ids[n_prompt:]
    assert (stats.examples, stats.truncated, stats.dropped) == (1, 0, 0)


def test_text_learns_every_token_but_the_first(tok):
    (example,), _ = tokenize_records([Text("plain words")], tok, 64)
    assert example.labels[1:] == example.input_ids[1:]
    assert example.input_ids[-1] == tok.eot_id


def test_special_token_strings_in_data_stay_text(tok):
    (example,), _ = tokenize_records([PromptCompletion("a", f" {EOT}")], tok, 64)
    assert example.input_ids.count(tok.eot_id) == 1  # only the one appended


def test_padded_batch_masks_prompts_and_padding(tok):
    records = [PromptCompletion("p" * n, " c" * (3 - n // 2)) for n in (1, 3, 5)]
    examples, _ = tokenize_records(records, tok, 32)
    x, y = pad_batch(examples, pad_id=pad_id_for(tok))
    assert x.shape == y.shape == (3, max(len(e) for e in examples) - 1)
    for row, (record, example) in enumerate(zip(records, examples, strict=True)):
        n = len(example) - 1
        assert x[row, :n].tolist() == example.input_ids[:-1]
        assert (x[row, n:] == tok.pad_id).all() and (y[row, n:] == IGNORE_INDEX).all()
        assert (
            tok.decode(t for t in y[row].tolist() if t != IGNORE_INDEX) == record.completion + EOT
        )


# ---------------------------------------------------------------------------------------
# Prompt tokens contribute nothing; batched loss equals the per-example loss


def test_masked_positions_neither_change_the_loss_nor_get_gradient(tok):
    records = [PromptCompletion("a prompt, longer", " yes"), PromptCompletion("q", " no way")]
    examples, _ = tokenize_records(records, tok, 32)
    x, y = pad_batch(examples, pad_id_for(tok))
    model = tiny_model(tok.vocab_size)
    logits, loss = model(x, y)
    masked = y == IGNORE_INDEX
    assert masked.any() and (~masked).any()

    # The labels are the true next tokens wherever they are not masked...
    true_next = [Example(e.input_ids, e.input_ids) for e in examples]
    _, y_true = pad_batch(true_next, pad_id_for(tok))
    assert torch.equal(y_true[~masked], y[~masked])
    # ...and whatever targets the masked positions had, the loss is the same.
    for _ in range(3):
        scrambled = torch.where(masked, torch.randint_like(y, tok.vocab_size), y_true)
        _, same = model(x, scrambled.masked_fill(masked, IGNORE_INDEX))
        assert same.item() == loss.item()
    _, unmasked = model(x, y_true)  # counting the prompt would change it
    assert unmasked.item() != loss.item()

    # d loss / d logits is exactly zero where the label is masked, nonzero where it is not.
    logits = logits.detach().requires_grad_(True)
    F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
    grad_norm = logits.grad.abs().sum(-1)  # (B, T)
    assert (grad_norm[masked] == 0).all()
    assert (grad_norm[~masked] > 0).all()


def test_batched_loss_equals_loss_of_examples_one_at_a_time(tok):
    rng = random.Random(0)
    records = [
        PromptCompletion("".join(rng.choices("abc", k=rng.randint(1, 9))), " " + "xy" * k)
        for k in (1, 3, 5, 2)
    ] + [Text("just some text here")]
    examples, _ = tokenize_records(records, tok, 48)
    assert len({len(e) for e in examples}) > 1  # different lengths, so different padding
    model = tiny_model(tok.vocab_size)
    x, y = pad_batch(examples, pad_id_for(tok))
    _, batched = model(x, y)

    total_loss, total_tokens = 0.0, 0
    for example in examples:
        xi, yi = pad_batch([example], pad_id_for(tok))  # no padding at all
        _, mean = model(xi, yi)
        n = (yi != IGNORE_INDEX).sum().item()
        total_loss += mean.item() * n
        total_tokens += n
    assert abs(total_loss / total_tokens - batched.item()) < 1e-6


# ---------------------------------------------------------------------------------------
# Chat


def test_default_template_renders_a_conversation(tok):
    expected = (
        "<|system|>\nYou are terse.<|end|>\n"
        "<|user|>\nHi there<|end|>\n"
        "<|assistant|>\nHello.<|end|>\n"
    )
    assert render_chat(CONVERSATION) == expected
    assert render_chat(CONVERSATION[:2], add_generation_prompt=True) == (
        expected.split("<|assistant|>")[0] + "<|assistant|>\n"
    )
    (example,), _ = tokenize_records([Chat(CONVERSATION)], tok, 128)
    assert tok.decode(example.input_ids) == expected + EOT
    assert learned_text(tok, example) == "Hello.<|end|>\n" + EOT


def test_default_template_python_equals_its_jinja_text(tok):
    conversation = CONVERSATION + (Message("user", "More?"), Message("assistant", "No."))
    for generation_prompt in (False, True):
        assert render_chat(conversation, add_generation_prompt=generation_prompt) == render_chat(
            conversation, DEFAULT_CHAT_TEMPLATE, add_generation_prompt=generation_prompt
        )
    # The prefix-by-prefix Jinja path finds the same assistant spans as the plain one.
    records = [Chat(conversation)]
    plain, _ = tokenize_records(records, tok, 256)
    jinja, _ = tokenize_records(records, tok, 256, chat_template=DEFAULT_CHAT_TEMPLATE)
    assert plain == jinja
    assert learned_text(tok, plain[0]) == "Hello.<|end|>\nNo.<|end|>\n" + EOT


def test_jinja_template_masks_all_but_assistant_turns(tok):
    conversation = (
        Message("user", "One"),
        Message("assistant", "1"),
        Message("user", "Two"),
        Message("assistant", "2"),
    )
    (example,), _ = tokenize_records([Chat(conversation)], tok, 256, chat_template=CHATML)
    assert tok.decode(example.input_ids) == render_chat(conversation, CHATML) + EOT
    assert learned_text(tok, example) == "1<|im_end|>\n2<|im_end|>\n" + EOT


def test_jinja_template_matches_transformers_and_reads_special_tokens(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    special = train_char([string.printable])
    special.tokenizer.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=special.tokenizer, eos_token=EOT, chat_template=CHATML
    )
    conversation = [{"role": m.role, "content": m.content} for m in CONVERSATION]
    for generation_prompt in (False, True):
        assert render_chat(
            CONVERSATION, CHATML, add_generation_prompt=generation_prompt
        ) == hf.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=generation_prompt
        )
    (example,), _ = tokenize_records([Chat(CONVERSATION)], special, 256, chat_template=CHATML)
    im_end = special.tokenizer.token_to_id("<|im_end|>")
    assert example.input_ids[:-1] == hf.encode(render_chat(CONVERSATION, CHATML))
    assert example.input_ids.count(im_end) == 3  # markup became special ids, one per turn

    hf.save_pretrained(tmp_path)
    template, variables = read_chat_template(tmp_path)
    assert template == CHATML and variables["eos_token"] == EOT


def test_jinja_generation_tags_render_and_errors_name_the_record(tok):
    tagged = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}"
        "A: {% generation %}{{ m['content'] }}\n{% endgeneration %}"
        "{% else %}U: {{ m['content'] }}\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}A: {% endif %}"
    )
    conversation = (Message("user", "hi"), Message("assistant", "yo"))
    (example,), _ = tokenize_records([Chat(conversation)], tok, 64, chat_template=tagged)
    assert tok.decode(example.input_ids) == "U: hi\nA: yo\n" + EOT
    assert learned_text(tok, example) == "yo\n" + EOT
    failing = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UserError, match="^f.jsonl:2: the chat template failed: roles must"):
        tokenize_records([Chat(conversation, "f.jsonl:2")], tok, 64, chat_template=failing)


def test_jinja_template_that_is_not_prefix_stable_is_refused(tok):
    # Renders only the last message: earlier text changes as the conversation grows.
    last_only = "{{ messages[-1]['content'] }}"
    conversation = (Message("user", "a"), Message("assistant", "b"), Message("assistant", "c"))
    with pytest.raises(UserError, match="prefix by prefix"):
        tokenize_records([Chat(conversation, "f.jsonl:3")], tok, 64, chat_template=last_only)


# ---------------------------------------------------------------------------------------
# Over-long examples


def test_truncation_keeps_the_start_and_counts(tok):
    records = [
        PromptCompletion("short", " fits"),  # 5 + 5 + 1 = 11 tokens
        PromptCompletion("p" * 10, " " + "c" * 20),  # cut inside the completion: kept
        PromptCompletion("p" * 30, " never seen"),  # completion cut away entirely: dropped
    ]
    examples, stats = tokenize_records(records, tok, seq_len=15)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)
    assert [len(e) for e in examples] == [11, 16]
    assert tok.decode(examples[1].input_ids) == ("p" * 10 + " " + "c" * 20)[:16]
    assert learned_text(tok, examples[1]) == " ccccc"

    with pytest.raises(UserError, match=r"^train\.jsonl:7: 32 tokens, more than seq_len \+ 1 = 16"):
        tokenize_records(
            [PromptCompletion("p" * 10, " " + "c" * 20, "train.jsonl:7")],
            tok,
            seq_len=15,
            on_overflow="error",
        )


def test_preference_pairs_mask_the_prompt_and_pad_both_sides_alike(tok, tmp_path):
    path = write_jsonl(
        tmp_path / "prefs.jsonl",
        [
            {"prompt": "Q1:", "chosen": " good answer", "rejected": " bad"},
            {"prompt": "Question 2:", "chosen": " yes", "rejected": " a much longer no"},
        ],
    )
    pairs = read_preference_pairs(path).records
    assert pairs[0] == PreferencePair("Q1:", " good answer", " bad")
    examples, stats = tokenize_pairs(pairs, tok, 64)
    assert stats.examples == 2
    assert learned_text(tok, examples[1].rejected) == " a much longer no" + EOT
    loader = PreferenceLoader(examples, 2, 64, pad_id_for(tok), shuffle=False)
    cx, cy, rx, ry = loader.next_batch()
    assert cx.shape == cy.shape == rx.shape == ry.shape
    prompt = len(tok.encode("Question 2:"))
    assert torch.equal(cx[1, :prompt], rx[1, :prompt])
    assert (cy[1, : prompt - 1] == IGNORE_INDEX).all() and (
        ry[1, : prompt - 1] == IGNORE_INDEX
    ).all()
    with pytest.raises(UserError, match="prefs.jsonl:1: a preference record"):
        read_sft_records(path)


# ---------------------------------------------------------------------------------------
# Splits and data sources


def test_split_is_seeded_deterministic_and_order_free():
    records = [PromptCompletion(f"prompt {i}", f" answer {i}") for i in range(400)]
    train, val = split_records(records, val_fraction=0.2, seed=0)
    assert len(train) + len(val) == 400 and 40 < len(val) < 120
    shuffled = records[::-1]
    train2, val2 = split_records(shuffled, val_fraction=0.2, seed=0)
    assert set(val2) == set(val) and set(train2) == set(train)
    _, other_seed = split_records(records, val_fraction=0.2, seed=1)
    assert set(other_seed) != set(val)
    assert split_records(records, 0.0)[1] == []
    with pytest.raises(UserError, match="val_fraction"):
        split_records(records, 1.0)


def test_load_sft_splits_from_a_file_and_an_explicit_val_file(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f" c{i}"} for i in range(50)]
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    data = load_sft_splits(train_file, val_fraction=0.2, seed=3)
    assert len(data.train) + len(data.val) == 50 and data.val
    val_file = write_jsonl(tmp_path / "val.jsonl", rows[:5])
    data = load_sft_splits(train_file, val_file)
    assert len(data.train) == 50 and len(data.val) == 5


def test_dsl_source_gives_prompt_and_completion_of_each_line():
    records = dsl_records("dsl:flowroll:30:1-2", "train", seed=0)
    lines = generate_corpus("flowroll", 30, 0, "1-2", split="train")
    assert len(records) == 30
    for record, line in zip(records, lines, strict=True):
        assert record.prompt.endswith("=>") and record.completion.startswith(" ")
        assert record.prompt + record.completion == line
    data = load_sft_splits("dsl:dimmatch:40")
    assert len(data.train) == 40 and len(data.val) == 100
    assert not {r.prompt for r in data.train} & {r.prompt for r in data.val}
    with pytest.raises(UserError, match="unknown practice language"):
        dsl_records("dsl:nosuch")


# ---------------------------------------------------------------------------------------
# Loader


def make_examples(tok, n: int = 23) -> list[Example]:
    records = [PromptCompletion(f"q{i}" * (1 + i % 4), f" a{i}") for i in range(n)]
    return tokenize_records(records, tok, 32)[0]


def test_loader_resumes_exactly_across_epochs(tok):
    examples = make_examples(tok)
    loader = SFTLoader(examples, batch_size=4, seq_len=32, pad_id=pad_id_for(tok), seed=7)
    for _ in range(3):
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch() for _ in range(10)]  # crosses two epoch ends (5 per epoch)

    resumed = SFTLoader(examples, batch_size=4, seq_len=32, pad_id=pad_id_for(tok), seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    for (x, y), (rx, ry) in zip(expected, (resumed.next_batch() for _ in range(10)), strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)

    other = SFTLoader(examples[:-1], batch_size=4, seq_len=32, pad_id=pad_id_for(tok), seed=7)
    with pytest.raises(UserError, match="num_examples was 23, now 22"):
        other.load_state_dict(state)


def test_loader_epochs_shuffle_and_ranks_split_the_global_batch(tok):
    examples = make_examples(tok)
    single = SFTLoader(examples, 6, 32, pad_id_for(tok), seed=1)
    ranks = [
        SFTLoader(examples, 3, 32, pad_id_for(tok), seed=1, rank=r, world_size=2) for r in (0, 1)
    ]
    epoch0 = [single.next_indices().tolist() for _ in range(single.batches_per_epoch)]
    assert len({i for batch in epoch0 for i in batch}) == 6 * 3  # no repeats within an epoch
    for batch in epoch0:
        assert ranks[0].next_indices().tolist() + ranks[1].next_indices().tolist() == batch
    assert single.next_indices().tolist() != epoch0[0]  # a new order in epoch 1


def test_loader_pads_to_seq_len_on_request_and_checks_lengths(tok):
    examples = make_examples(tok)
    x, y = SFTLoader(examples, 4, 32, pad_id_for(tok), pad_to="seq_len").next_batch()
    assert x.shape == y.shape == (4, 32)
    with pytest.raises(UserError, match="more than seq_len"):
        SFTLoader(examples, 4, 5, pad_id_for(tok))
    with pytest.raises(UserError, match="too little data"):
        SFTLoader(examples, 24, 32, pad_id_for(tok))


# ---------------------------------------------------------------------------------------
# Bad records

GOOD_PC = {"prompt": "p", "completion": " c"}
BAD_LINES = [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object, got a list"),
    ('"just a string"', "expected a JSON object, got a string"),
    ({"prompt": "p"}, "missing key 'completion'"),
    ({"prompt": 3, "completion": " c"}, "'prompt' must be a string, got a number"),
    ({"prompt": "p", "completion": ""}, "'completion' is empty"),
    ({"prompt": "p", "completion": None}, "'completion' must be a string, got null"),
    ({"foo": "bar"}, "unknown record (keys: foo)"),
    ({"prompt": "p", "completion": " c", "text": "t"}, "keys of several formats"),
    ({"messages": "hello"}, "'messages' must be a list, got a string"),
    ({"messages": []}, "'messages' is empty"),
    ({"messages": ["hi"]}, "messages[0] must be an object"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0] has unknown role 'bot'"),
    ({"messages": [{"role": "user"}]}, "missing key 'messages[0].content'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"text": ""}, "'text' is empty"),
    ({"text": ["a"]}, "'text' must be a string, got a list"),
]


@pytest.mark.parametrize(("line", "message"), BAD_LINES, ids=[m for _, m in BAD_LINES])
def test_bad_record_is_a_one_line_error_naming_file_and_line(tmp_path, line, message):
    good = {"messages": [{"role": "assistant", "content": "x"}]} if "messages" in str(line) else {}
    good = good or ({"text": "t"} if "text" in str(line) else GOOD_PC)
    path = write_jsonl(tmp_path / "data.jsonl", [good, "", line])
    with pytest.raises(UserError) as error:
        read_sft_records(path)
    text = str(error.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_non_utf8_bytes_are_a_bad_record(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD_PC).encode() + b'\n{"prompt": "\xff", "completion": " c"}\n')
    with pytest.raises(UserError, match=r"data\.jsonl:2: not UTF-8 \(byte 0xff"):
        read_sft_records(path)
    assert read_sft_records(path, skip_bad=True).bad_records == 1


def test_skip_bad_counts_the_bad_records(tmp_path):
    bad = [line for line, _ in BAD_LINES if "messages" not in str(line) and "text" not in str(line)]
    rows = [GOOD_PC, *bad, {"prompt": "q", "completion": " d"}]
    loaded = read_sft_records(write_jsonl(tmp_path / "data.jsonl", rows), skip_bad=True)
    assert loaded.format == "prompt_completion"
    assert len(loaded.records) == 2 and loaded.bad_records == len(bad) >= 7
    assert loaded.first_error.endswith(
        ":2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"
    )


def test_whole_file_problems_are_refused_even_when_skipping(tmp_path):
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [GOOD_PC, {"text": "t"}])
    with pytest.raises(
        UserError, match=r"mixed\.jsonl:2: a text record in a file of prompt_completion"
    ):
        read_sft_records(mixed, skip_bad=True)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="is empty"):
        read_sft_records(empty, skip_bad=True)
    all_bad = write_jsonl(tmp_path / "bad.jsonl", ["{", "[]"])
    with pytest.raises(UserError, match=r"no good records \(2 bad\)"):
        read_sft_records(all_bad, skip_bad=True)
    with pytest.raises(UserError, match="cannot read"):
        read_sft_records(tmp_path / "missing.jsonl")
