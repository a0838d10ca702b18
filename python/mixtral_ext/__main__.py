"""Command line: `python -m mixtral_ext` (also installed as `mixtral-ext`).

  demo                               a random-weight Mixtral with the real v3 tokenizer, made on the spot,
                                     streams text (meaningless: the weights are random)
  generate --model DIR --prompt TEXT streams a completion from a model directory
  chat --model DIR                   an interactive multi-turn chat in the model's chat format
                                     (/reset starts over, /exit or end of input quits)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from .engine import Engine
from .errors import MixtralError
from .synthetic import write_random_checkpoint


def stream_to_stdout(engine: Engine, prompt: str, args: argparse.Namespace) -> None:
    deltas = engine.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p, seed=args.seed)
    count = 0
    for delta in deltas:
        print(delta.text, end="", flush=True)
        count += 1
    print()
    print(f"[{count} tokens, finish: {delta.finish_reason}, on {engine.device}]", file=sys.stderr)


def chat_loop(engine: Engine, args: argparse.Namespace) -> None:
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("chat: type a message; /reset starts over, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        start, parts, count = time.perf_counter(), [], 0
        try:
            for delta in engine.chat_stream(messages, max_tokens=args.max_tokens, temperature=args.temperature,
                                            top_p=args.top_p, seed=args.seed):
                print(delta.text, end="", flush=True)
                parts.append(delta.text)
                count += 1
        except (MixtralError, ValueError) as e:  # e.g. the history outgrew the context: say so, keep chatting
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        if delta.tool_calls:  # no tools run here: the calls are shown and kept in the history as text
            parts = [f"tool calls: {[call.to_openai() for call in delta.tool_calls]}"]
            print(parts[0], end="")
        print()
        if "".join(parts).strip():  # the format has no empty assistant turns; user turns in a row are merged
            messages.append({"role": "assistant", "content": "".join(parts)})
        elapsed = time.perf_counter() - start
        print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s, finish: {delta.finish_reason}]",
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream from a random-weight model made on the spot")
    generate = sub.add_parser("generate", help="stream a completion from a model directory")
    generate.add_argument("--prompt", required=True)
    chat = sub.add_parser("chat", help="chat with a model directory, multi-turn")
    chat.add_argument("--system", default=None, help="a system prompt")
    for command in (generate, chat):
        command.add_argument("--model", required=True)
        command.add_argument("--dtype", default=None)
        command.add_argument("--max-context", type=int, default=None)
    for command in (demo, generate, chat):
        command.add_argument("--max-tokens", type=int, default=48 if command is not chat else 512)
        command.add_argument("--temperature", type=float, default=0.7)
        command.add_argument("--top-p", type=float, default=0.95)
        command.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "chat":
            chat_loop(Engine.from_pretrained(args.model, dtype=args.dtype, max_context=args.max_context), args)
            return 0
        if args.command == "demo":
            with tempfile.TemporaryDirectory() as tmp:
                print("mixtral_ext demo: a small Mixtral with RANDOM weights and the real Mistral v3 tokenizer; "
                      "the text below is meaningless, it shows the engine loading, sampling and streaming.",
                      file=sys.stderr)
                engine = Engine.from_pretrained(write_random_checkpoint(tmp), progress=True)
                prompt = "Mixtral is a sparse mixture of experts model that"
                print(prompt, end="", flush=True)
                stream_to_stdout(engine, prompt, args)
                timed = engine.generate(prompt, max_tokens=args.max_tokens, temperature=0)
        else:
            engine = Engine.from_pretrained(args.model, dtype=args.dtype, max_context=args.max_context)
            stream_to_stdout(engine, args.prompt, args)
            timed = engine.generate(args.prompt, max_tokens=args.max_tokens, temperature=0)
        print(f"[greedy rerun: first token {1e3 * timed.time_to_first_token:.1f} ms, "
              f"{timed.tokens_per_second:.1f} tokens/s, {timed.usage.cached_tokens} prompt tokens reused]",
              file=sys.stderr)
    except (MixtralError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
