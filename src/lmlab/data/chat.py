"""Chat templates: a conversation (system / user / assistant turns) as the text a model reads.

lmlab's own layout (DEFAULT_CHAT_TEMPLATE) is rendered in plain Python; any other template
is Jinja, rendered the way transformers renders it. Fine-tuning (finetune/data.py) uses the
pieces to put the loss on assistant turns; prediction and chat use `render_chat` to build
prompts that end ready for a reply.
"""

from __future__ import annotations

import functools
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple

from tokenizers import Tokenizer

from lmlab.data.tokenizer import TextTokenizer
from lmlab.errors import UserError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = typing.get_args(Role)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""lmlab's chat layout, as the Jinja template an exported tokenizer_config.json can carry.
lmlab renders it in plain Python (`default_chat_pieces`); a test checks the two agree:

    <|system|>\\nYou are terse.<|end|>\\n<|user|>\\nHi<|end|>\\n<|assistant|>\\nHello.<|end|>\\n

Loss falls on each assistant turn's content and its `<|end|>\\n`."""
END_OF_TURN = "<|end|>\n"


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: Role
    content: str


class Piece(NamedTuple):
    """Text tokenized on its own; `trained`: learn its tokens; `special`: special-token
    strings in it become their ids (template markup) instead of plain text (user data)."""

    text: str
    trained: bool
    special: bool = False


def default_chat_pieces(messages: Sequence[Message]) -> list[Piece]:
    pieces = []
    for m in messages:
        learned = m.role == "assistant"
        pieces += [
            Piece(f"<|{m.role}|>\n", False, special=True),
            Piece(m.content, learned),
            Piece(END_OF_TURN, learned, special=True),
        ]
    return pieces


def _template_error(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> Any:
    """Compile a chat template as transformers does: sandboxed, trim_blocks, lstrip_blocks,
    loop controls, `raise_exception`, `strftime_now`, and a `tojson` that keeps non-ASCII."""
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UserError(
            "a Jinja chat template needs jinja2: pip install jinja2 (transformers brings it)"
        ) from None

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask markup)
        renders its body; lmlab finds assistant spans by prefixes instead."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _template_error
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(
            f"the chat template is not valid Jinja: {e.message} (line {e.lineno})"
        ) from None


def _render_jinja(
    source: str,
    messages: Sequence[Message],
    add_generation_prompt: bool,
    variables: Mapping,
    where: str = "",
) -> str:
    import jinja2

    template = _compile_template(source)
    try:
        return template.render(
            messages=[{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as e:
        raise UserError(f"{where + ': ' if where else ''}the chat template failed: {e}") from None


def jinja_chat_pieces(
    source: str, messages: Sequence[Message], variables: Mapping, where: str
) -> list[Piece]:
    """Assistant spans found by rendering prefix by prefix: turn k's span is what
    messages[:k+1] adds to messages[:k] rendered with its generation prompt. Works for any
    template whose renderings of a conversation's prefixes extend one another."""
    pieces, done = [], ""  # done: text covered by pieces so far
    for k, m in enumerate(messages):
        if m.role != "assistant":
            continue
        before = _render_jinja(source, messages[:k], True, variables, where)
        after = _render_jinja(source, messages[: k + 1], False, variables, where)
        if not (before.startswith(done) and after.startswith(before)):
            raise UserError(
                f"{where}: the chat template does not render this conversation prefix by "
                f"prefix (turn {k} changes earlier text), so its assistant spans cannot be found"
            )
        pieces += [
            Piece(before[len(done) :], False, True),
            Piece(after[len(before) :], True, True),
        ]
        done = after
    full = _render_jinja(source, messages, False, variables, where)
    if not full.startswith(done):
        raise UserError(f"{where}: the chat template renders the last turns differently")
    return [*pieces, Piece(full[len(done) :], False, True)]


def render_chat(
    messages: Sequence[Message],
    chat_template: str | None = None,
    *,
    add_generation_prompt: bool = False,
    template_vars: Mapping[str, str] | None = None,
) -> str:
    """A conversation as text: with `chat_template` (Jinja, as transformers renders it) or
    lmlab's DEFAULT_CHAT_TEMPLATE. With `add_generation_prompt`, ends ready for a reply."""
    if chat_template is not None:
        return _render_jinja(chat_template, messages, add_generation_prompt, template_vars or {})
    text = "".join(p.text for p in default_chat_pieces(messages))
    return text + ("<|assistant|>\n" if add_generation_prompt else "")


def read_chat_template(directory: str | Path) -> tuple[str | None, dict[str, str]]:
    """(Jinja chat template or None, special-token strings it may use) of a Hugging Face
    tokenizer folder: `chat_template.jinja`, else tokenizer_config.json's "chat_template"
    (a string, or a list of named templates: the one named "default")."""
    directory = Path(directory)
    config_path = directory / "tokenizer_config.json"
    try:
        config = (
            json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        )
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {config_path}: {e}") from None
    variables = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            variables[key] = value
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return (template if isinstance(template, str) else None), variables


class PieceEncoder:
    """Encodes pieces; special-token strings become ids only in pieces marked special."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self._parsing: Tokenizer | None = None

    def __call__(self, piece: Piece) -> list[int]:
        if not piece.special:
            return self.tokenizer.encode(piece.text)  # special-token strings stay plain text
        if self._parsing is None:
            # A copy that reads special tokens, as transformers does with rendered templates
            # (TextTokenizer turns that off for user text; a fresh Tokenizer has it on).
            self._parsing = Tokenizer.from_str(self.tokenizer.to_json())
        return self._parsing.encode(piece.text, add_special_tokens=False).ids


def chat_prompt_ids(
    messages: Sequence[Message],
    tokenizer: TextTokenizer,
    chat_template: str | None = None,
    template_vars: Mapping[str, str] | None = None,
) -> list[int]:
    """Token ids of a conversation ready for the assistant's reply, tokenized exactly as
    fine-tuning tokenizes the turns before a reply (so the model sees what it learned)."""
    if chat_template is None:
        pieces = [*default_chat_pieces(messages), Piece("<|assistant|>\n", False, special=True)]
    else:
        text = render_chat(
            messages, chat_template, add_generation_prompt=True, template_vars=template_vars
        )
        pieces = [Piece(text, False, special=True)]
    encode = PieceEncoder(tokenizer)
    return [i for piece in pieces for i in encode(piece)]
