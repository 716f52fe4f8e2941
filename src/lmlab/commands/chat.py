"""`lmlab chat`: talk to a chat-tuned model in the terminal, replies streamed as they come."""

from __future__ import annotations

import argparse
import sys

from lmlab.commands.predict import add_quantize_argument
from lmlab.errors import UserError

EPILOG = """examples:
  lmlab chat runs/finetune-lora/20261124-101500
  lmlab chat exported/assistant --system "Answer in one sentence." --temperature 0.3
  lmlab chat runs/chat-full/20261124-101500 --temperature 0 --max-new-tokens 100

The conversation is laid out with the model's chat template (the one it was fine-tuned
with, or a Hugging Face folder's), so a model tuned with `lmlab finetune` on "messages"
data sees what it learned. Only what fits the model's context is sent: the oldest turns
are dropped first, the system message never. In the chat: /reset, /system TEXT, /help,
/quit (or Ctrl-D)."""


def main(argv: list[str]) -> int:
    """Run `lmlab chat ARGV...`: read lines from stdin until /quit or end of input."""
    parser = argparse.ArgumentParser(
        prog="lmlab chat",
        description="Chat with a model in the terminal (lmlab runs, LoRA runs, Hugging Face folders).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("model", metavar="RUN|CKPT|HF_DIR")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=None, help="repeatable replies")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    add_quantize_argument(parser)
    args = parser.parse_args(argv)

    from lmlab.generate.chat import ChatSession, handle_command
    from lmlab.runs.device import select_device
    from lmlab.runs.load import load_model

    loaded = load_model(args.model, select_device(args.device), quantize=args.quantize)
    session = ChatSession(
        loaded,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    template = "its chat template" if session.chat_template else "lmlab's chat layout"
    print(f"chatting with {loaded.path} ({template}); /help for commands, /quit to leave")
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            message = handle_command(session, line)
            if message is None:
                return 0
            print(message)
            continue
        print("model> ", end="", flush=True)
        try:
            for piece in session.reply(line):
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            print("\n(reply interrupted)")
            continue
        except UserError as e:  # a message too long for the context: say so, keep chatting
            print(f"\n({e})")
            continue
        print()
        if session.dropped:
            print(f"(the oldest {session.dropped} exchange(s) no longer fit the context)")
