"""Command line: `python -m mixtral_ext` (also installed as `mixtral-ext`).

  demo                      a random-weight model made on the spot: greedy decode of token ids
  run --model DIR --tokens  greedy decode of token ids on a model directory
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from .engine import Engine
from .errors import MixtralError
from .synthetic import write_random_checkpoint


def greedy_decode(engine: Engine, prompt: list[int], max_tokens: int) -> None:
    with engine.new_sequence() as seq:
        start = time.perf_counter()
        logits = seq.append(prompt)
        first = time.perf_counter()
        out = []
        for _ in range(max_tokens):
            token = int(np.argmax(logits))
            out.append(token)
            print(token, end=" ", flush=True)
            logits = seq.append([token])
        end = time.perf_counter()
    print()
    decode_rate = (len(out) - 1) / (end - first) if len(out) > 1 else float("nan")
    print(f"prompt {len(prompt)} tokens: first token after {1e3 * (first - start):.1f} ms; "
          f"{decode_rate:.1f} tokens/s decode on {engine.device}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral-ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="greedy decode on a random-weight model made on the spot")
    demo.add_argument("--max-tokens", type=int, default=32)
    run = sub.add_parser("run", help="greedy decode of token ids on a model directory")
    run.add_argument("--model", required=True)
    run.add_argument("--tokens", type=int, nargs="+", required=True)
    run.add_argument("--max-tokens", type=int, default=32)
    run.add_argument("--dtype", default=None)
    run.add_argument("--max-context", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            with tempfile.TemporaryDirectory() as tmp:
                print("mixtral_ext demo: the weights are RANDOM, so the token ids mean nothing; "
                      "this shows the engine loading and decoding.", file=sys.stderr)
                engine = Engine.from_pretrained(write_random_checkpoint(tmp), progress=True)
                greedy_decode(engine, [1, 1014, 1032, 2200], args.max_tokens)
        else:
            engine = Engine.from_pretrained(args.model, dtype=args.dtype, max_context=args.max_context)
            greedy_decode(engine, args.tokens, args.max_tokens)
    except (MixtralError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
