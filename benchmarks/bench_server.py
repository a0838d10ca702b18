"""What the HTTP server adds: time to first token and time per token of a streamed completion through
`python -m mixtral_ext serve` (server-sent events over 127.0.0.1, read with httpx), against
Engine.stream in this process, on the same model and settings (greedy, EOS ignored, the same prompt,
whose KV cache no run reuses: in process it is cleared, through the server another prompt runs between).

    python benchmarks/bench_server.py [--model DIR] [--tokens 128] [--runs 5] [--device cpu|cuda]

Without --model, a random checkpoint of the demo shape is written and served. Prints a markdown
table of medians over the runs; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

import mixtral_ext
from mixtral_ext.synthetic import write_random_checkpoint

PROMPT = "The history of the Mediterranean sea begins"


def engine_run(engine, tokens: int) -> tuple[float, float]:
    """(seconds to the first delta, seconds per delta after it) of Engine.stream."""
    engine.clear_prefix_cache()
    start = time.perf_counter()
    times = [time.perf_counter() for _ in engine.stream(PROMPT, max_tokens=tokens, temperature=0, ignore_eos=True)]
    return times[0] - start, (times[-1] - times[0]) / (len(times) - 1)


def server_run(client: httpx.Client, url: str, tokens: int) -> tuple[float, float]:
    """The same through the server: the first and later server-sent events that carry a token."""
    client.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1})  # leaves another prefix cached
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    start, times = time.perf_counter(), []
    with client.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]" and json.loads(line[6:])["choices"]:
                times.append(time.perf_counter())
    return times[0] - start, (times[-1] - times[0]) / (len(times) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or write_random_checkpoint(tmp)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen([sys.executable, "-m", "mixtral_ext", "serve", "--model", model, "--port", str(port),
                                   "--device", args.device], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(timeout=120) as client:
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    try:
                        if client.get(url + "/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    time.sleep(0.2)
                served = [server_run(client, url, args.tokens) for _ in range(args.runs + 1)][1:]  # one warm-up
            # The server's engine is idle from here on: the in-process engine runs alone.
            with mixtral_ext.Engine.from_pretrained(model, device=args.device, progress=False) as engine:
                local = [engine_run(engine, args.tokens) for _ in range(args.runs + 1)][1:]
        finally:
            server.terminate()
            server.wait(timeout=30)
    rows = {"Engine.stream (in process)": local, "HTTP server (SSE, httpx)": served}
    medians = {name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
               for name, runs in rows.items()}
    print(f"\n{os.path.basename(model.rstrip('/')) if args.model else 'demo model'} on {args.device}, "
          f"{args.tokens} tokens, median of {args.runs} runs\n")
    print("| path | time to first token ms | ms per token | tokens/s |")
    print("|---|---|---|---|")
    for name, (ttft, per_token) in medians.items():
        print(f"| {name} | {1e3 * ttft:.2f} | {1e3 * per_token:.3f} | {1 / per_token:.0f} |")
    (local_ttft, local_tok), (http_ttft, http_tok) = medians.values()
    print(f"\nthe server adds {1e3 * (http_ttft - local_ttft):.2f} ms to the first token and "
          f"{1e3 * (http_tok - local_tok):.3f} ms per token")


if __name__ == "__main__":
    main()
