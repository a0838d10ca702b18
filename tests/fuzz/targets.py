"""Fuzz targets: each takes arbitrary bytes, turns them into one kind of input
the package reads (model files, tokenizer files, token ids, sampling settings,
chat messages and tools) and feeds it in. The contract under test: a bad input
raises a MixtralError (or nothing) and never anything else, and the engine
stays usable. Used by run_fuzz.py (coverage-guided, atheris) and replayed by
tests/test_fuzz.py on the kept corpus without atheris.

Input layouts:
  model_files: byte 0 picks the file and the mutation, bytes 1-2 an offset
               (little-endian), the rest is the payload.
  tokenizer_file: byte 0 picks the file name, the rest is its content.
  token_ids, sampling, chat: UTF-8 JSON (token_ids also reads non-JSON bytes as int32 ids).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

import mixtral_ext
from mixtral_ext.chat import parse_tool_calls
from mixtral_ext.config import MixtralConfig
from mixtral_ext.synthetic import write_random_checkpoint
from mixtral_ext.tokenizer import Tokenizer

TINY = MixtralConfig(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4, intermediate_size=6,
                     num_experts=3, experts_per_token=2, vocab_size=32768, rope_theta=1e4, rms_norm_eps=1e-5,
                     max_position_embeddings=64)
_state: dict = {}


def _workdir() -> str:
    if "dir" not in _state:
        _state["dir"] = tempfile.mkdtemp(prefix="mixtral_ext_fuzz_")
    return _state["dir"]


def _pristine_model() -> str:
    """A valid tiny checkpoint (vocab 32768, so the shipped v3 tokenizer applies)."""
    if "model" not in _state:
        _state["model"] = write_random_checkpoint(os.path.join(_workdir(), "pristine"), TINY, seed=1)
    return _state["model"]


def engine() -> mixtral_ext.Engine:
    """One engine shared by the runs of a process, max_context 32 so any generation ends quickly."""
    if "engine" not in _state:
        _state["engine"] = mixtral_ext.Engine.from_pretrained(_pristine_model(), max_context=32)
    return _state["engine"]


def _json(data: bytes):
    """The JSON value in data, or None when it is not UTF-8 JSON."""
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def _check_engine_still_works() -> None:
    assert engine().logits([1, 2, 3]).shape == (3, TINY.vocab_size)


# ---- model files --------------------------------------------------------------

_MODEL_FILES = ("config.json", "model.safetensors", "header", "params.json", "model.safetensors.index.json")


def model_files(data: bytes) -> None:
    if len(data) < 3:
        return
    choice, offset, payload = data[0], int.from_bytes(data[1:3], "little"), data[3:]
    target = _MODEL_FILES[choice % len(_MODEL_FILES)]
    splice = choice // len(_MODEL_FILES) % 2 == 1  # else: replace the whole file
    model = os.path.join(_workdir(), "mutated")
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(_pristine_model(), model)
    if target == "params.json":  # a consolidated directory instead: params.json and no config.json
        os.remove(os.path.join(model, "config.json"))
        os.rename(os.path.join(model, "model.safetensors"), os.path.join(model, "consolidated.safetensors"))
    if target == "header":  # a new JSON header with a consistent length prefix, the old data after it
        with open(os.path.join(model, "model.safetensors"), "rb") as f:
            blob = f.read()
        old_len = int.from_bytes(blob[:8], "little")
        content = len(payload).to_bytes(8, "little") + payload + blob[8 + old_len :]
        path = os.path.join(model, "model.safetensors")
    else:
        path = os.path.join(model, target)
        content = b""
        if splice and os.path.exists(path):
            with open(path, "rb") as f:
                content = f.read()
            at = offset % (len(content) + 1)
            content = content[:at] + payload + content[at + len(payload) :]
        else:
            content = payload
    with open(path, "wb") as f:
        f.write(content)
    try:
        loaded = mixtral_ext.Engine.from_pretrained(model, max_context=16, progress=False)
    except mixtral_ext.MixtralError:
        return
    loaded.logits([0, 1])


# ---- tokenizer files ----------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.model.v3", "tekken.json", "tokenizer.model.v1")


def tokenizer_file(data: bytes) -> None:
    if not data:
        return
    folder = os.path.join(_workdir(), "tokenizer")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(folder, _TOKENIZER_FILES[data[0] % len(_TOKENIZER_FILES)]), "wb") as f:
        f.write(data[1:])
    try:
        tokenizer = Tokenizer.for_model(folder, TINY.vocab_size)
    except mixtral_ext.MixtralError:
        return
    ids = tokenizer.encode("Grüße, 世界 🤖")
    tokenizer.decode(ids)


# ---- token ids ----------------------------------------------------------------


def token_ids(data: bytes) -> None:
    value = _json(data)
    if value is None:
        value = np.frombuffer(data[: len(data) // 4 * 4], dtype=np.int32).tolist()
    e = engine()
    for call in (e.logits, lambda v: e.generate(v, max_tokens=2, temperature=0)):
        try:
            call(value)
        except mixtral_ext.MixtralError:
            pass
    with e.new_sequence() as seq:
        try:
            seq.append(value)
        except mixtral_ext.MixtralError:
            pass
    _check_engine_still_works()


# ---- sampling settings ----------------------------------------------------------

_SETTINGS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "seed", "stop", "stop_token_ids", "logprobs")


def sampling(data: bytes) -> None:
    value = _json(data)
    if not isinstance(value, dict):
        return
    settings = {k: v for k, v in value.items() if k in _SETTINGS}
    prompt = value.get("prompt", [1, 2, 3])
    try:
        engine().generate(prompt, **settings)
    except mixtral_ext.MixtralError:
        pass
    _check_engine_still_works()


# ---- chat messages and tools ------------------------------------------------------


def chat(data: bytes) -> None:
    parse_tool_calls(data.decode("utf-8", errors="replace"), {"f", "get_weather"})
    value = _json(data)
    if isinstance(value, dict):
        messages, tools = value.get("messages"), value.get("tools")
    else:
        messages, tools = value, None
    try:
        engine().chat_prompt(messages, tools)
    except mixtral_ext.MixtralError:
        pass


TARGETS = {f.__name__: f for f in (model_files, tokenizer_file, token_ids, sampling, chat)}
