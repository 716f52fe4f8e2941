"""A conversation with a chat-tuned model: `lmlab chat` underneath.

`ChatSession` keeps the turns, lays them out with the model's chat template (the one it
was fine-tuned with, or lmlab's default layout, exactly as fine-tuning tokenized them:
`lmlab.data.chat.chat_prompt_ids`), and streams each reply as text while it is generated.
A reply ends at the end-of-text token or at the template's end-of-turn marker (`<|end|>`
in lmlab's layout, `<|im_end|>` in ChatML, ...; neither is shown). Only what fits the
model's context is sent: the oldest user/assistant pairs are dropped first; the system
message always stays.

    >>> session = ChatSession(load_model("runs/chat-lora/20261124-101500"), system="Be brief.")
    >>> for piece in session.reply("What is LoRA?"):
    ...     print(piece, end="", flush=True)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmlab.data.chat import DEFAULT_CHAT_TEMPLATE, Message, chat_prompt_ids, render_chat
from lmlab.errors import UserError
from lmlab.generate.sampling import generate
from lmlab.runs.load import LoadedModel

END_OF_TURN_MARK = "<|end|>"
"""Where a reply ends in lmlab's default chat layout."""

_SENTINEL = "Lmlab0Reply0Sentinel"


def end_of_turn_mark(
    chat_template: str | None, template_vars: dict[str, str] | None = None
) -> str | None:
    """The text a template writes right after an assistant's words (`<|end|>`, `<|im_end|>`,
    `<end_of_turn>`, `</s>`, ...), or None when it writes nothing there.

    Read off the template itself by rendering a one-exchange conversation, so an exported
    lmlab layout, ChatML or Gemma all stop where they were tuned to stop, not only when the
    tokenizer's end-of-text token comes.
    """
    if chat_template is None:
        return END_OF_TURN_MARK
    exchange = [Message("user", "Hi"), Message("assistant", _SENTINEL)]
    try:
        text = render_chat(exchange, chat_template, template_vars=template_vars)
    except UserError:
        return None  # a template that wants more (a system turn, ...): end-of-text only
    after = text.partition(_SENTINEL)[2].split()
    return after[0] if after else None


@dataclass
class ChatSession:
    """A model, the system message, the turns so far and how replies are sampled."""

    loaded: LoadedModel
    system: str | None = None
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = 0.9
    seed: int | None = None
    history: list[Message] = field(default_factory=list)
    """User and assistant turns, alternating, oldest first (the system message is apart)."""
    dropped: int = 0
    """User/assistant pairs the last reply left out (and forgot) to fit the context."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        # generate() checks the sampling settings before it starts; asking it for nothing
        # now reports a bad --temperature/--top-p before the first message, not after it.
        one_token = torch.zeros(1, 1, dtype=torch.long)
        generate(self.loaded.model, one_token, 0, self.temperature, self.top_k, self.top_p)

    @property
    def chat_template(self) -> str | None:
        """The Jinja template prompts are laid out with, or None for lmlab's own layout.

        A fine-tune saves lmlab's layout as chat_template.jinja with each checkpoint (and an
        export carries it); that is still lmlab's layout, tokenized piece by piece as the
        first fine-tune did: markup as special tokens, the turns' text as plain text (so a
        user typing "<|endoftext|>" cannot end the conversation's document)."""
        template = self.loaded.chat_template
        if template is None or template.strip() == DEFAULT_CHAT_TEMPLATE.strip():
            return None
        return template

    def reset(self) -> None:
        """Forget the conversation (the system message stays)."""
        self.history.clear()
        self.dropped = 0

    def set_system(self, text: str) -> None:
        """A new system message; empty text removes it."""
        self.system = text.strip() or None

    def messages(self, user_text: str, skip_pairs: int = 0) -> list[Message]:
        """What the model is shown for a new user turn: system, the kept turns, the turn."""
        system = [Message("system", self.system)] if self.system else []
        return [*system, *self.history[2 * skip_pairs :], Message("user", user_text)]

    def prompt(self, user_text: str) -> tuple[list[int], int]:
        """(prompt ids, reply budget in tokens) for a new user turn, the oldest pairs left
        out until the prompt and a reply fit the context."""
        loaded, context = self.loaded, self.loaded.model.config.context_length
        for skip in range(len(self.history) // 2 + 1):
            ids = chat_prompt_ids(
                self.messages(user_text, skip),
                loaded.tokenizer,
                self.chat_template,
                loaded.template_vars,
            )
            # The KV cache holds the prompt and all but the last new token.
            if len(ids) + self.max_new_tokens - 1 <= context:
                self.dropped = skip
                return ids, self.max_new_tokens
        if len(ids) < context:  # no history left: a shorter reply still fits
            self.dropped = len(self.history) // 2
            return ids, context - len(ids) + 1
        raise UserError(
            f"this message and the system message are {len(ids)} tokens; the model reads "
            f"{context}: shorten them"
        )

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's reply to `user_text`, then add both turns to the history."""
        loaded = self.loaded
        tokenizer = loaded.tokenizer
        ids, budget = self.prompt(user_text)
        mark = end_of_turn_mark(self.chat_template, loaded.template_vars)
        marks = [mark] if mark else []
        device = next(loaded.model.parameters()).device
        tokens = generate(
            loaded.model,
            torch.tensor([ids], device=device),
            budget,
            self.temperature,
            self.top_k,
            self.top_p,
            self.seed,
            stop_token_ids=(tokenizer.eot_id,),
        )
        new: list[int] = []
        shown = 0  # characters of the reply already yielded
        text = ""
        for token in tokens:
            if token == tokenizer.eot_id:
                break
            new.append(token)
            text = tokenizer.decode(new)
            cut = min((i for i in (text.find(m) for m in marks) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                break
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 character: wait for its next byte
            # Hold back a tail that could be the start of an end-of-turn mark.
            safe = len(text) - _partial_mark(text, marks)
            if safe > shown:
                yield text[shown:safe]
                shown = safe
        if len(text) > shown:
            yield text[shown:]
        self.history = self.history[2 * self.dropped :]
        self.history += [Message("user", user_text), Message("assistant", text.strip())]


def _partial_mark(text: str, marks: list[str]) -> int:
    """Length of the longest end of `text` that begins one of the marks."""
    return max(
        (n for m in marks for n in range(len(m) - 1, 0, -1) if text.endswith(m[:n])), default=0
    )


HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message (/system alone removes it)
  /help           this list
  /quit           leave (so do Ctrl-D and Ctrl-C)"""


def handle_command(session: ChatSession, line: str) -> str | None:
    """Run a /command; returns what to print, or None for /quit. Unknown commands say so."""
    name, _, rest = line.strip().partition(" ")
    if name in ("/quit", "/exit"):
        return None
    if name == "/reset":
        session.reset()
        return "(conversation forgotten)"
    if name == "/system":
        session.set_system(rest)
        session.reset()
        return f"(system message: {session.system!r}; conversation restarted)"
    if name == "/help":
        return HELP
    return f"unknown command {name!r}; /help lists them"
