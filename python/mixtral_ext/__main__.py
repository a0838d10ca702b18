"""Command line: `python -m mixtral_ext` (also installed as `mixtral-ext`).

  demo                               a random-weight Mixtral with the real v3 tokenizer, made on the spot,
                                     streams text (meaningless: the weights are random)
  generate --model DIR --prompt TEXT streams a completion from a model directory
"""

from __future__ import annotations

import argparse
import sys
import tempfile

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral-ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="stream from a random-weight model made on the spot")
    generate = sub.add_parser("generate", help="stream a completion from a model directory")
    generate.add_argument("--model", required=True)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--dtype", default=None)
    generate.add_argument("--max-context", type=int, default=None)
    for command in (demo, generate):
        command.add_argument("--max-tokens", type=int, default=48)
        command.add_argument("--temperature", type=float, default=0.7)
        command.add_argument("--top-p", type=float, default=0.95)
        command.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    try:
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
