"""Tokenizers from mistral-common (imported lazily, so the engine runs without
it): the one in the model directory (tekken.json, tokenizer.model.v*, or the
bare tokenizer.model that the published repositories hold, read as v1 or v3 by
the vocabulary size), else the one mistral-common ships for the vocabulary size
(32000: tokenizer.model.v1, Mixtral-8x22B-v0.1; 32768: the v3 instruct
tokenizer with tool calls, Mixtral-8x22B-Instruct-v0.1).
StreamDecoder turns token ids into text deltas that never split a UTF-8
character and keep every leading space."""

from __future__ import annotations

import glob
import os
import tempfile

from .errors import ModelLoadError, TokenError

_SHIPPED_BY_VOCAB = {32000: "tokenizer.model.v1", 32768: "mistral_instruct_tokenizer_240323.model.v3"}
# The version of a bare tokenizer.model (mistral-common would read every one as v1) by vocabulary size.
_BARE_VERSION_BY_VOCAB = {32000: "v1", 32768: "v3"}
# The files a model directory may hold, most specific first.
TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v*", "tokenizer.model")


class NoTokenizerError(ModelLoadError):
    """No tokenizer is to be had (no file, none shipped, or no mistral-common): token ids still work.
    A tokenizer file that is there but unreadable is a plain ModelLoadError."""


def _shipped_path(file_name: str) -> str:
    try:
        import mistral_common
    except ImportError as e:  # token ids need no tokenizer: Engine.tokenizer_or_none() gives None
        raise NoTokenizerError("text input needs mistral-common: pip install mistral-common[sentencepiece]") from e
    return os.path.join(os.path.dirname(mistral_common.__file__), "data", file_name)


class Tokenizer:
    """encode/decode text, the special ids, and the chat format of one Mistral tokenizer."""

    def __init__(self, path: str, version: str | None = None) -> None:
        """path: a tokenizer file; version ("v1", "v3"): how to read a bare tokenizer.model."""
        try:
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError as e:
            raise NoTokenizerError("text input needs mistral-common: pip install mistral-common[sentencepiece]") from e
        try:
            if version is None:
                self.mistral = MistralTokenizer.from_file(path)
            else:  # mistral-common takes the version from the file name: a link that says it, kept while
                # the tokenizer lives (mistral-common pickles a tokenizer by its file's path)
                self._named = tempfile.TemporaryDirectory(prefix="mixtral_ext_tokenizer_")
                named = os.path.join(self._named.name, f"tokenizer.model.{version}")
                os.symlink(os.path.abspath(path), named)
                self.mistral = MistralTokenizer.from_file(named)
        except Exception as e:  # mistral-common raises several types for unreadable files
            raise ModelLoadError(f"cannot load the tokenizer {path}: {e}") from e
        self.path = path
        self._raw = self.mistral.instruct_tokenizer.tokenizer

    @classmethod
    def for_model(cls, model_dir: str | None, vocab_size: int) -> "Tokenizer":
        """The tokenizer file in model_dir (TOKENIZER_FILES, the first name found), else the one
        mistral-common ships for vocab_size (model_dir None: no directory). A file that cannot be
        read, or that has more words than the model's vocabulary, is a ModelLoadError naming it;
        NoTokenizerError when there is no tokenizer at all."""
        for pattern in TOKENIZER_FILES if model_dir is not None else ():
            found = sorted(glob.glob(os.path.join(glob.escape(model_dir), pattern)))
            if found:
                version = _BARE_VERSION_BY_VOCAB.get(vocab_size, "v1") if pattern == "tokenizer.model" else None
                tokenizer = cls(found[-1], version)
                if tokenizer.vocab_size > vocab_size:
                    raise ModelLoadError(f"the tokenizer {found[-1]} has {tokenizer.vocab_size} words, more than the "
                                         f"model's vocabulary of {vocab_size}")
                return tokenizer
        if vocab_size in _SHIPPED_BY_VOCAB:
            return cls(_shipped_path(_SHIPPED_BY_VOCAB[vocab_size]))
        where = f"{model_dir} has no tokenizer file ({', '.join(TOKENIZER_FILES)})" if model_dir else "no model directory"
        raise NoTokenizerError(f"{where}, and mistral-common ships none for vocabulary size {vocab_size}: "
                               f"text needs a tokenizer; token ids work without one")

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, {self.vocab_size} words)"

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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenError(f"text is not valid Unicode: {e.reason} at index {e.start}") from None
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
