"""lmlab chat: prompts laid out as fine-tuning laid them out, the context kept by dropping
the oldest turns (never the system message), replies ending at end-of-turn, the commands
and the terminal loop."""

from __future__ import annotations

import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from torch import nn

from lmlab.config import build_config
from lmlab.data.chat import DEFAULT_CHAT_TEMPLATE, Message, chat_prompt_ids, render_chat
from lmlab.errors import UserError
from lmlab.generate.chat import ChatSession, end_of_turn_mark, handle_command
from lmlab.runs.load import LoadedModel, load_model
from lmlab.train.loop import train


@pytest.fixture(scope="module")
def run(flowroll_data: Path, tmp_path_factory) -> Path:
    cfg = build_config(
        "ultra-tiny",
        overrides=[
            f"data.path={flowroll_data}",
            f"logging.runs_dir={tmp_path_factory.mktemp('runs')}",
            "model.context_length=256",
            "train.max_steps=10",
            "train.device=cpu",
            "eval.interval=0",
            "logging.tensorboard=false",
        ],
    )
    return train(cfg, log=lambda *a, **k: None).run_dir


class Scripted(nn.Module):
    """A model that says the given token ids, one per forward pass, whatever it reads."""

    def __init__(self, vocab_size: int, script: list[int], context_length: int = 96):
        super().__init__()
        self.config = SimpleNamespace(
            context_length=context_length, n_layer=1, n_kv_head=1, head_dim=1, family="stub"
        )
        self.vocab_size, self.script, self.calls = vocab_size, script, 0
        self.seen: list[list[int]] = []
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, idx, targets=None, *, kv_cache=None, **kwargs):
        self.seen.append(idx[0].tolist())
        logits = torch.zeros(1, idx.size(1), self.vocab_size)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits, None


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def scripted(
    run: Path, text_ids: list[int], context_length: int = 96, chat_template: str | None = None
) -> LoadedModel:
    loaded = load_model(run)
    vocab = loaded.model.config.vocab_size
    model = Scripted(vocab, text_ids, context_length)
    return LoadedModel(model, loaded.tokenizer, loaded.path, "lmlab", chat_template)


def test_prompt_is_the_conversation_as_fine_tuning_lays_it_out(run):
    loaded = load_model(run)
    session = ChatSession(loaded, system="be brief", max_new_tokens=8, temperature=0.0)
    reply = "".join(session.reply("[1 2] | sort =>"))
    assert session.history == [
        Message("user", "[1 2] | sort =>"),
        Message("assistant", reply.strip()),
    ]
    ids, budget = session.prompt("[3] | sum =>")
    expected = chat_prompt_ids(
        [Message("system", "be brief"), *session.history, Message("user", "[3] | sum =>")],
        loaded.tokenizer,
    )
    assert ids == expected and budget == 8
    shown = [Message("system", "be brief"), *session.history, Message("user", "[3] | sum =>")]
    # The same ids as the rendered text, its markup read as special tokens.
    text = render_chat(shown, None, add_generation_prompt=True)
    reading_markup = Tokenizer.from_str(loaded.tokenizer.to_json())
    assert ids == reading_markup.encode(text, add_special_tokens=False).ids


def test_reply_stops_at_end_of_turn_and_hides_the_mark(run):
    tok = load_model(run).tokenizer
    said = tok.encode("[1 2]") + tok.encode("<|end|>") + tok.encode("never shown")
    session = ChatSession(scripted(run, said), max_new_tokens=40, temperature=0.0)
    pieces = list(session.reply("hi"))
    assert "".join(pieces) == "[1 2]"
    assert session.loaded.model.calls == len(tok.encode("[1 2]")) + len(tok.encode("<|end|>"))
    # And at the end-of-text token.
    session = ChatSession(scripted(run, tok.encode("ok") + [tok.eot_id]), temperature=0.0)
    assert "".join(session.reply("hi")) == "ok"


def test_a_saved_default_layout_is_tokenized_and_stopped_as_lmlabs_own(run):
    """A fine-tune saves lmlab's layout as chat_template.jinja: prompts are then built as
    fine-tuning built them (turn text stays plain text) and replies stop at <|end|>."""
    tok = load_model(run).tokenizer
    said = tok.encode("[2 1]") + tok.encode("<|end|>") + tok.encode("[7]")
    session = ChatSession(
        scripted(run, said, chat_template=DEFAULT_CHAT_TEMPLATE), max_new_tokens=30
    )
    assert session.chat_template is None
    text = "<|endoftext|> [1 2] | rev =>"  # would be the end-of-text id if read as markup
    ids, _ = session.prompt(text)
    assert ids == chat_prompt_ids([Message("user", text)], tok)
    assert tok.eot_id not in ids
    assert chat_prompt_ids([Message("user", text)], tok, DEFAULT_CHAT_TEMPLATE) != ids
    assert "".join(session.reply(text)) == "[2 1]"


def test_end_of_turn_is_read_off_the_template():
    assert end_of_turn_mark(None) == "<|end|>"
    assert end_of_turn_mark(DEFAULT_CHAT_TEMPLATE) == "<|end|>"  # an exported lmlab model
    assert end_of_turn_mark(CHATML) == "<|im_end|>"
    llama2 = (
        "{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
    )
    assert end_of_turn_mark(llama2, {"eos_token": "</s>"}) == "</s>"
    assert end_of_turn_mark("{% for m in messages %}{{ m['content'] }}\n{% endfor %}") is None
    picky = "{{ raise_exception('a system turn first') }}"
    assert end_of_turn_mark(picky) is None  # end-of-text still ends replies


def test_a_jinja_template_reply_stops_at_its_own_mark(run):
    # Markup in the tiny run's characters, so the stub can "say" the mark.
    template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} ==done== {% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    assert end_of_turn_mark(template) == "==done=="
    tok = load_model(run).tokenizer
    said = tok.encode("[3 1] ==do") + tok.encode("ne== [9]")
    loaded = scripted(run, said, chat_template=template)
    session = ChatSession(loaded, max_new_tokens=40, temperature=0.0)
    # The space before the mark is streamed before the mark is known; history strips it.
    assert "".join(session.reply("[1 3] | rev =>")) == "[3 1] "
    assert tok.decode(loaded.model.seen[0]) == "[user] [1 3] | rev => ==done== [assistant] "
    assert session.history[-1] == Message("assistant", "[3 1]")


def test_oldest_turns_are_dropped_to_fit_and_the_system_message_stays(run):
    tok = load_model(run).tokenizer
    session = ChatSession(
        scripted(run, tok.encode("[0 0 0 0]") + [tok.eot_id], context_length=160),
        system="sort",
        max_new_tokens=12,
        temperature=0.0,
    )
    for i in range(6):
        "".join(session.reply(f"[{i} {i}] | sort | rev =>"))
    # 160 tokens hold the system message and a couple of exchanges, not six.
    kept = session.history[:-2]  # what the last reply was shown, before its own exchange
    assert 1 <= len(kept) // 2 < 5 and session.dropped >= 1
    assert kept[0] != Message("user", "[0 0] | sort | rev =>")
    prefills = [ids for ids in session.loaded.model.seen if len(ids) > 1]
    shown = [Message("system", "sort"), *kept, Message("user", "[5 5] | sort | rev =>")]
    assert prefills[-1] == chat_prompt_ids(shown, tok)
    with pytest.raises(UserError, match="shorten them"):
        session.prompt("x" * 200)


def test_commands_change_the_session(run):
    session = ChatSession(load_model(run), system="old")
    session.history = [Message("user", "a"), Message("assistant", "b")]
    assert "system message: 'new'" in handle_command(session, "/system new")
    assert session.system == "new" and session.history == []
    session.history = [Message("user", "a"), Message("assistant", "b")]
    handle_command(session, "/reset")
    assert session.history == [] and session.system == "new"
    handle_command(session, "/system")
    assert session.system is None
    assert "/reset" in handle_command(session, "/help")
    assert "unknown command" in handle_command(session, "/nope")
    assert handle_command(session, "/quit") is None


@pytest.mark.parametrize("script", ["hello\n/system be brief\n/reset\n/quit\n", "hello\n\n"])
def test_the_terminal_loop_ends_on_quit_and_at_end_of_input(run, monkeypatch, capsys, script):
    from lmlab.commands.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert main([str(run), "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("chatting with") and "model> " in out
    if "/system" in script:
        assert "system message: 'be brief'" in out and "conversation forgotten" in out


def test_a_message_too_long_is_reported_and_the_chat_goes_on(run, monkeypatch, capsys):
    from lmlab.commands.chat import main

    long = "[1 2 3] | sort => " * 60
    assert len(load_model(run).tokenizer.encode(long)) > 256  # the run's context
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{long}\nhello\n/quit\n"))
    assert main([str(run), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "shorten them" in out and out.count("model> ") == 2


def test_bad_settings(run):
    loaded = load_model(run)
    with pytest.raises(UserError, match="--max-new-tokens"):
        ChatSession(loaded, max_new_tokens=0)
    with pytest.raises(UserError, match="temperature"):
        ChatSession(loaded, temperature=-1.0)
    with pytest.raises(UserError, match="top_p"):
        ChatSession(loaded, top_p=1.5)
