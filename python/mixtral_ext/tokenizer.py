"""Tokenizers from mistral-common (imported lazily, so the engine runs without
it): the one in the model directory, or the one mistral-common ships for the
vocabulary size (32000: tokenizer.model.v1, Mixtral-8x22B-v0.1; 32768: the v3
instruct tokenizer with tool calls, Mixtral-8x22B-Instruct-v0.1).
StreamDecoder turns token ids into text deltas that never split a UTF-8
character and keep every leading space."""

from __future__ import annotations

import glob
import os

from .errors import ModelLoadError, TokenError

_SHIPPED_BY_VOCAB = {32000: "tokenizer.model.v1", 32768: "mistral_instruct_tokenizer_240323.model.v3"}


def _shipped_path(file_name: str) -> str:
    try:
        import mistral_common
    except ImportError as e:  # token ids need no tokenizer: Engine.tokenizer_or_none() gives None
        raise ModelLoadError("text input needs mistral-common: pip install mistral-common[sentencepiece]") from e
    return os.path.join(os.path.dirname(mistral_common.__file__), "data", file_name)


class Tokenizer:
    """encode/decode text, the special ids, and the chat format of one Mistral tokenizer."""

    def __init__(self, path: str) -> None:
        try:
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError as e:
            raise ModelLoadError("text input needs mistral-common: pip install mistral-common[sentencepiece]") from e
        try:
            self.mistral = MistralTokenizer.from_file(path)
        except Exception as e:  # mistral-common raises several types for unreadable files
            raise ModelLoadError(f"cannot load the tokenizer {path}: {e}") from e
        self.path = path
        self._raw = self.mistral.instruct_tokenizer.tokenizer

    @classmethod
    def for_model(cls, model_dir: str | None, vocab_size: int) -> "Tokenizer":
        """The tokenizer file in model_dir, else the one shipped for vocab_size (model_dir None: no directory)."""
        found = [] if model_dir is None else sorted(
            glob.glob(os.path.join(model_dir, "tokenizer.model.v*")) + glob.glob(os.path.join(model_dir, "tekken.json")))
        if found:
            return cls(found[-1])
        if vocab_size in _SHIPPED_BY_VOCAB:
            return cls(_shipped_path(_SHIPPED_BY_VOCAB[vocab_size]))
        raise ModelLoadError(
            f"{model_dir}: no tokenizer.model.v* or tekken.json, and no shipped tokenizer for vocab size {vocab_size}"
        )

    @property
    def bos_id(self) -> int:
        return self._raw.bos_id

    @property
    def eos_id(self) -> int:
        return self._raw.eos_id

    @property
    def vocab_size(self) -> int:
        return self._raw.n_words

    def encode(self, text: str, bos: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenError(f"text must be a str, got {type(text).__name__}")
        return self._raw.encode(text, bos=bos, eos=False)

    def decode(self, ids: list[int]) -> str:
        return self._raw.decode(list(ids))

    def special_id(self, piece: str) -> int | None:
        """The id of a control token such as "[TOOL_CALLS]", or None if this tokenizer has none."""
        try:
            token = self._raw.get_special_token(piece)
        except Exception:  # tekken raises for unknown pieces
            return None
        return token if self._raw.id_to_piece(token) == piece else None  # sentencepiece maps unknowns to <unk>


class StreamDecoder:
    """Incremental detokenization over a sliding window: push() returns the new
    text once it is whole (no trailing U+FFFD of a partial UTF-8 character);
    the concatenated deltas equal decode() of all ids pushed."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # window start: decoding from here keeps leading spaces right
        self._read = 0  # ids up to here have been emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix : self._read])
        after = decode(self._ids[self._prefix :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""
