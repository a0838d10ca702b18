"""Command line: `python -m mixtral_ext` (also installed as `mixtral-ext`).

  demo                               a random-weight Mixtral with the real v3 tokenizer, made on the spot,
                                     streams text (meaningless: the weights are random)
  generate --model DIR --prompt TEXT streams a completion from a model directory
  chat --model DIR                   an interactive multi-turn chat in the model's chat format
                                     (/reset starts over, /exit or end of input quits)
  bench [--model DIR | --shape S]    time to first token and tokens/s, for a model directory or a
                                     synthetic model (random weights made on the device) of shape
                                     demo, 8x7b or 8x22b, optionally with fewer --layers
  memory [--model DIR | --shape S]   GPU memory by expert dtype and context, from the config alone;
         [--gpu-memory h200]         marks what fits and the longest context (--json, --plot too)

generate, chat and bench take --device cpu|cuda, --dtype, --num-threads and --expert-dtype float8_e4m3 or int4
(the experts' weights in FP8, or in 4-bit groups of 128, quantized as they load; an FP8 or int4 checkpoint's
experts stay as stored by default). generate, chat, bench and serve take --tensor-parallel N: the model split
over N processes (ranks) that this one starts, or that torchrun started, this command running in each, and
--expert-parallel: the experts split whole, E/N to a rank, instead of each expert's width:
  torchrun --nproc-per-node 2 -m mixtral_ext generate --model DIR --prompt TEXT --tensor-parallel 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import sys
import tempfile
import time

import numpy as np

from .engine import Engine
from .errors import MixtralError, SettingError
from .parallel import follow_torchrun, torchrun_rank
from .memory import DEFAULT_CONTEXTS, format_table, memory_table, model_config, parse_memory, plot_table
from .synthetic import SHAPES, write_random_checkpoint


def stream_to_stdout(engine: Engine, prompt: str, args: argparse.Namespace) -> None:
    """Streams one generation, then its timing (from the same run) on stderr."""
    start, first, count, delta = time.perf_counter(), None, 0, None
    for delta in engine.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                               seed=args.seed):
        first = first or time.perf_counter()
        print(delta.text, end="", flush=True)
        count += 1
    end = time.perf_counter()
    print()
    rate = f", {(count - 1) / (end - first):.1f} tokens/s after it" if count > 1 and end > first else ""
    print(f"[{count} tokens, finish: {delta.finish_reason}, on {engine.device}; first token after "
          f"{1e3 * (first - start):.1f} ms{rate}]", file=sys.stderr)


def chat_loop(engine: Engine, args: argparse.Namespace, read_line=input) -> list[dict]:
    """The interactive chat; returns the conversation. Ctrl-C during a reply stops that reply (the
    conversation keeps what was said); at the prompt it clears the line."""
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    print("chat: type a message; /reset starts over, /exit quits (Ctrl-C stops a reply)", file=sys.stderr)
    while True:
        try:
            line = read_line("> ")
        except EOFError:
            print()
            return messages
        except KeyboardInterrupt:
            print("\n(/exit quits)", file=sys.stderr)
            continue
        if line.strip() == "/exit":
            return messages
        if line.strip() == "/reset":
            messages = list(system)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        start, parts, count, delta, finish, stream = time.perf_counter(), [], 0, None, None, None
        try:
            stream = engine.chat_stream(messages, max_tokens=args.max_tokens, temperature=args.temperature,
                                        top_p=args.top_p, seed=args.seed)
            for delta in stream:
                print(delta.text, end="", flush=True)
                parts.append(delta.text)
                count += 1
            finish = delta.finish_reason if delta else None
        except KeyboardInterrupt:
            finish = "interrupted"
        except (MixtralError, ValueError) as e:  # e.g. the history outgrew the context: say so, keep chatting
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        finally:
            if stream is not None:
                stream.close()  # an interrupted reply stops here and gives its KV pages back
        if delta is not None and delta.tool_calls:  # no tools run here: shown, and kept in the history as text
            parts = [f"tool calls: {[call.to_openai() for call in delta.tool_calls]}"]
            print(parts[0], end="")
        print()
        if "".join(parts).strip():  # the format has no empty assistant turns; user turns in a row are merged
            messages.append({"role": "assistant", "content": "".join(parts)})
        elapsed = time.perf_counter() - start
        print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s, finish: {finish}]", file=sys.stderr)


def bench(args: argparse.Namespace) -> dict:
    """Prefill of a random prompt, then greedy decode past EOS; returns the measurements."""
    if args.model:
        engine = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                        expert_dtype=args.expert_dtype,
                                        max_context=args.prompt_tokens + args.new_tokens, cuda_graphs=args.cuda_graphs,
                                        num_threads=args.num_threads, tensor_parallel=args.tensor_parallel,
                                        expert_parallel=args.expert_parallel)
        name = args.model
    else:
        config = SHAPES[args.shape]
        if args.layers:
            config = dataclasses.replace(config, num_layers=args.layers)
        engine = Engine.synthetic(config, device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                                  max_context=args.prompt_tokens + args.new_tokens, max_batch_tokens=args.prompt_tokens,
                                  cuda_graphs=args.cuda_graphs, num_threads=args.num_threads,
                                  tensor_parallel=args.tensor_parallel, expert_parallel=args.expert_parallel)
        name = f"synthetic {args.shape}, {config.num_layers} layers"
    if args.expert_dtype:
        name += f", experts in {args.expert_dtype}"
    if args.tensor_parallel > 1:
        name += f", {'expert' if args.expert_parallel else 'tensor'} parallel over {args.tensor_parallel} ranks"
    prompt = np.random.default_rng(0).integers(3, engine.config.vocab_size, args.prompt_tokens).tolist()
    with engine:
        engine.generate(prompt[:8], max_tokens=2, temperature=0, ignore_eos=True)  # warm-up
        engine.clear_prefix_cache()
        result = engine.generate(prompt, max_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        device = engine.device
    layers = engine.config.num_layers
    ms_per_token = 1e3 / result.tokens_per_second
    report = dict(model=name, device=device, expert_dtype=args.expert_dtype, cuda_graphs=args.cuda_graphs,
                  tensor_parallel=args.tensor_parallel, expert_parallel=args.expert_parallel, layers=layers,
                  prompt_tokens=args.prompt_tokens,
                  new_tokens=len(result.token_ids), time_to_first_token_ms=1e3 * result.time_to_first_token,
                  prefill_tokens_per_s=args.prompt_tokens / result.time_to_first_token,
                  decode_tokens_per_s=result.tokens_per_second, decode_ms_per_token=ms_per_token,
                  decode_ms_per_layer=ms_per_token / layers)
    graphs = " with CUDA graphs" if args.cuda_graphs and device == "cuda" else ""
    print(f"{name} on {device}{graphs}: first token after {report['time_to_first_token_ms']:.1f} ms "
          f"({report['prefill_tokens_per_s']:.0f} prompt tokens/s); decode {report['decode_tokens_per_s']:.1f} "
          f"tokens/s = {ms_per_token:.2f} ms/token, {report['decode_ms_per_layer']:.3f} ms per layer")
    return report


def serve_http(args: argparse.Namespace) -> int:
    """Runs the OpenAI-compatible server until Ctrl-C or SIGTERM."""
    try:
        import uvicorn

        from .server import ServerSettings, create_app
    except ImportError as e:
        raise SettingError(f"serve needs the server extra: pip install 'mixtral_ext[server]' ({e})") from None
    if not 1 <= args.max_queue:
        raise SettingError(f"--max-queue must be >= 1, got {args.max_queue}")
    demo_dir = None if args.model else tempfile.TemporaryDirectory()

    def load() -> Engine:
        path = args.model or write_random_checkpoint(demo_dir.name)
        engine = Engine.from_pretrained(path, device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                                        max_context=args.max_context, cuda_graphs=args.cuda_graphs,
                                        num_threads=args.num_threads, progress=False,
                                        tensor_parallel=args.tensor_parallel, expert_parallel=args.expert_parallel)
        if demo_dir is not None:  # its weights are in the engine now and its tokenizer is mistral-common's
            engine.tokenizer_or_none()
            demo_dir.cleanup()
        return engine

    api_key = args.api_key if args.api_key is not None else os.environ.get("MIXTRAL_EXT_API_KEY")
    if api_key is not None and not api_key.strip():
        raise SettingError("--api-key (or MIXTRAL_EXT_API_KEY) must not be empty")
    settings = ServerSettings(model_name=args.served_model_name or args.model or "demo", api_key=api_key,
                              allowed_origins=[o.strip() for o in args.allowed_origins.split(",") if o.strip()],
                              max_queue=args.max_queue,
                              loopback_only=args.host in ("127.0.0.1", "localhost", "::1"))
    listener = listen(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"mixtral_ext: serving {settings.model_name!r} at http://{host}:{listener.getsockname()[1]}/v1 "
          f"(GET /health answers 200 once it has loaded)", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(uvicorn.Config(create_app(settings, load), log_level="warning")).run(sockets=[listener])
    finally:
        listener.close()
        if demo_dir is not None:
            demo_dir.cleanup()
    return 0


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on the first of the host's addresses that takes it (port 0: a free port)."""
    error = None
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, OverflowError) as e:
        raise SettingError(f"cannot listen on {host}:{port}: {e}") from None
    for family, kind, protocol, _, address in addresses:
        # The protocol named (IPPROTO_TCP), so that asyncio turns Nagle off on its connections: small
        # server-sent events would otherwise wait for the client's delayed ACK (40 ms).
        listener = socket.socket(family, kind, protocol)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(2048)  # connections wait in the backlog until the server has started
            return listener
        except OSError as e:
            listener.close()
            error = e
    raise SettingError(f"cannot listen on {host}:{port}: {error}")


def print_memory(args: argparse.Namespace) -> None:
    """The memory table of `memory`, and its JSON and plot when asked."""
    model = pathlib.Path(args.model) if args.model else args.shape  # a directory named like a shape is a directory
    memory_bytes = parse_memory(args.gpu_memory) if args.gpu_memory else None
    try:
        contexts = sorted({int(tokens) for tokens in args.contexts.split(",")})
    except ValueError:
        raise SettingError(f"--contexts must be token counts separated by commas, got {args.contexts!r}") from None
    rows = memory_table(model, memory_bytes=memory_bytes, contexts=contexts)
    config = model_config(model)
    title = f"{model}: {config.num_layers} layers, {config.num_experts} experts, on one GPU"
    print(f"{title} (bytes the engine allocates: weights, workspace, runtime reserve, KV cache for one sequence of "
          f"the context; the CUDA context itself comes on top)\n")
    print(format_table(rows, memory_bytes))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(model=str(model), gpu_memory_bytes=memory_bytes, rows=rows), f, indent=2)
    if args.plot:
        plot_table(rows, args.plot, title, memory_bytes)


def open_model(args: argparse.Namespace) -> Engine:
    """The model directory of `generate` and `chat`, with their settings."""
    return Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, expert_dtype=args.expert_dtype,
                                  max_context=args.max_context, num_threads=args.num_threads,
                                  tensor_parallel=args.tensor_parallel, expert_parallel=args.expert_parallel)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default in --help (unless its help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.required or action.default is None or "(default:" in text
        return text if shown else super()._get_help_string(action)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixtral-ext", description=__doc__, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)

    demo = command("demo", "stream from a random-weight model made on the spot")
    generate = command("generate", "stream a completion from a model directory")
    generate.add_argument("--prompt", required=True, help="the text to continue")
    chat = command("chat", "chat with a model directory, multi-turn")
    chat.add_argument("--system", default=None, help="a system prompt")
    for parser_ in (generate, chat):
        parser_.add_argument("--model", required=True, help="a Hugging Face or consolidated Mistral model directory")
        parser_.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
        parser_.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                             help="weight dtype (default: float32 on the CPU, bfloat16 on the GPU)")
        parser_.add_argument("--max-context", type=int, default=None,
                             help="tokens one conversation may hold (default: the model's)")
    serve = command("serve", "an OpenAI-compatible HTTP server (pip install 'mixtral_ext[server]')")
    serve.add_argument("--model", default=None, help="a model directory (default: the demo model, random weights)")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="the port to listen on (0: a free one)")
    serve.add_argument("--served-model-name", default=None, help="the model's id in the API (default: --model as given)")
    serve.add_argument("--api-key", default=None, help="require this key (Authorization: Bearer KEY) on every path "
                                                       "but /health and the page (default: $MIXTRAL_EXT_API_KEY)")
    serve.add_argument("--allowed-origins", default="", help="browser origins allowed to call the server, "
                                                             "comma-separated (default: none but its own)")
    serve.add_argument("--max-queue", type=int, default=64, help="requests that may wait for the stream; "
                                                                 "more are answered 429")
    serve.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    serve.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                       help="weight dtype (default: float32 on the CPU, bfloat16 on the GPU)")
    serve.add_argument("--max-context", type=int, default=None, help="tokens one request may hold (default: the model's)")
    serve.add_argument("--cuda-graphs", action="store_true", help="replay each decode step as a CUDA graph")
    timing = command("bench", "time to first token and tokens/s")
    source = timing.add_mutually_exclusive_group()
    source.add_argument("--model", default=None, help="a model directory")
    source.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="a synthetic model's shape")
    timing.add_argument("--layers", type=int, default=None, help="synthetic: this many layers (default: the shape's)")
    timing.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs")
    timing.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="weight dtype (default: float32 on the CPU, bfloat16 on the GPU)")
    for parser_ in (generate, chat, timing, serve):
        parser_.add_argument("--expert-dtype", default=None, choices=["float8_e4m3", "int4"],
                             help="store the experts' weights in FP8 or int4 (default: the dtype, or the checkpoint's "
                                  "FP8 or int4)")
        parser_.add_argument("--num-threads", type=int, default=None,
                             help="threads on the CPU (default: measured, the fastest count as other load comes and goes)")
        parser_.add_argument("--tensor-parallel", type=int, default=1,
                             help="split the model over this many ranks, one process each (under torchrun: its "
                                  "world size)")
        parser_.add_argument("--expert-parallel", action="store_true",
                             help="with --tensor-parallel: whole experts per rank instead of a slice of each "
                                  "(attention still split by heads)")
    timing.add_argument("--prompt-tokens", type=int, default=128, help="random prompt tokens to prefill")
    timing.add_argument("--new-tokens", type=int, default=32, help="tokens to decode greedily, past EOS")
    timing.add_argument("--cuda-graphs", action="store_true", help="replay each decode step as a CUDA graph")
    timing.add_argument("--json", default=None, help="also write the measurements to this file")
    memory = command("memory", "GPU memory by expert dtype and context, from the config alone (no weights read)")
    planned = memory.add_mutually_exclusive_group(required=True)
    planned.add_argument("--model", default=None, help="a model directory (its config.json or params.json)")
    planned.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a built-in model shape")
    memory.add_argument("--gpu-memory", default=None,
                        help="mark what fits in this memory (80GB, 80GiB, or a card: h100, h200) and give the "
                             "longest context that does")
    memory.add_argument("--contexts", default=",".join(str(t) for t in DEFAULT_CONTEXTS),
                        help="the contexts (tokens) of the table's columns, comma-separated")
    memory.add_argument("--json", default=None, help="also write the table's data to this file")
    memory.add_argument("--plot", default=None, help="also draw memory against context into this PNG (matplotlib)")
    for parser_ in (demo, generate, chat):
        parser_.add_argument("--max-tokens", type=int, default=48 if parser_ is not chat else 512,
                             help="most tokens to generate (per reply)")
        parser_.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy")
        parser_.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling: the smallest set of "
                                                                         "tokens holding this probability")
        parser_.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    args = parser.parse_args(argv)
    launched = torchrun_rank()
    if launched is not None and getattr(args, "tensor_parallel", 1) != launched[1]:  # said by every rank
        print(f"error: under torchrun, --tensor-parallel must equal its world size {launched[1]}", file=sys.stderr)
        return 1
    if launched is not None and launched[0] > 0:  # torchrun's other ranks follow rank 0's engine
        follow_torchrun()
        return 0
    try:
        if args.command == "bench":
            report = bench(args)
            if args.json:
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=2)
            return 0
        if args.command == "serve":
            return serve_http(args)
        if args.command == "memory":
            print_memory(args)
            return 0
        if args.command == "chat":
            with open_model(args) as engine:
                chat_loop(engine, args)
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
        else:
            with open_model(args) as engine:
                stream_to_stdout(engine, args.prompt, args)
    except (MixtralError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[interrupted]", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
