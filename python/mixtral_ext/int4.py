"""int4 checkpoints: the weight-only, group-quantized 4-bit formats of the published Mixtral
checkpoints (AWQ, GPTQ, compressed-tensors pack-quantized), read as they are stored, for the
engine to keep as int4 or to widen (dequantized on the host).

A quantized projection w [out, in] (nn.Linear's layout) is read as
  packed  uint8 [out, ceil(in / 2)]  its 4-bit codes 0..15 two a byte along the input, column 2b in
                                     the low nibble of byte b (the engine's layout, csrc/core/int4.h)
  scales  float32 [out, groups]
  zeros   float32 [out, groups]      in code units
  groups  int32 [in]                 the group of each input column (act order: any order)
and w[o, i] = (code[o, i] - zeros[o, g]) * scales[o, g] with g = groups[i]. Every packed int32
word holds 8 codes, the lowest nibble first, so GPTQ's words (along the input) transposed, and
compressed-tensors' as they are, are already the engine's bytes; AWQ's (along the output) are
regrouped. Per format, beside module M (e.g.
model.layers.0.self_attn.q_proj):
  AWQ GEMM   M.qweight I32 [in, out/8], packed along the output, output column 8j + o of word j
             in nibble (0, 4, 1, 5, 2, 6, 3, 7)[o] (AWQ's order 0, 2, 4, 6, 1, 3, 5, 7);
             M.qzeros I32 [in/group, out/8] alike; M.scales F16 [in/group, out]
  GPTQ       M.qweight I32 [in/8, out], packed along the input; M.qzeros I32 [groups, out/8],
             along the output, each zero stored minus one; M.scales F16 [groups, out];
             M.g_idx I32 [in] (act order; without it, group i // group_size)
  compressed-tensors pack-quantized
             M.weight_packed I32 [out, in/8], along the input, signed codes plus 8;
             M.weight_scale [out, groups]; M.weight_zero_point I32 [out/8, groups], along the
             output, plus 8, when asymmetric (else zero 0: 8 here); M.weight_shape [2];
             M.weight_g_idx I32 [in] (act order "group")
The engine keeps the experts' bytes as they are, and widens the other projections (weights.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ModelLoadError

# The nibble that holds output column 8j + o of AWQ's word j, and the column that nibble n holds.
_AWQ_NIBBLE_OF_COLUMN = np.array([0, 4, 1, 5, 2, 6, 3, 7])
_AWQ_COLUMN_OF_NIBBLE = np.argsort(_AWQ_NIBBLE_OF_COLUMN)


@dataclass(frozen=True)
class Int4Format:
    """The int4 scheme of a checkpoint's quantization_config."""

    method: str  # "awq", "gptq" or "compressed-tensors"
    group_size: int  # input columns per group; 0: one group per output row (channel)
    symmetric: bool
    act_order: bool = False  # the groups come per input column (g_idx), which the checkpoint must hold

    def packed_name(self, module: str) -> str:
        """The tensor that holds module's codes. A module without it (the router, and whatever
        modules_to_not_convert or ignore lists) is stored as a float .weight and read as one."""
        return module + (".weight_packed" if self.method == "compressed-tensors" else ".qweight")


def parse_int4_format(quantization: dict, path: str) -> Int4Format | None:
    """The int4 format of a quantization_config, or None when it is not int4 (FP8: weights.py reads
    those by their dtype). Raises ModelLoadError for a quantization that cannot be read."""
    method = quantization.get("quant_method")

    def fail(what: str):
        raise ModelLoadError(f"{path}: {method} quantization with {what} is not supported")

    def flag(key: str, default: bool, scheme: dict = quantization) -> bool:
        value = scheme.get(key, default)
        if not isinstance(value, bool):
            fail(f"{key} {value!r} (true or false expected)")
        return value

    def group_size(value, channel_value=None) -> int:
        if value == channel_value and channel_value is not None:
            return 0
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            fail(f"group_size {value!r} (a positive integer expected)")
        return value

    if method == "awq":
        bits = quantization.get("bits", quantization.get("w_bit"))
        version = str(quantization.get("version", "gemm")).lower()
        if bits != 4:
            fail(f"{bits!r} bits (4 are)")
        if version != "gemm":
            fail(f"version {version!r} (gemm is)")
        if not flag("zero_point", True):
            fail("zero_point false (zero points are expected)")
        size = group_size(quantization.get("group_size", quantization.get("q_group_size")))
        return Int4Format("awq", size, False)
    if method == "gptq":
        bits = quantization.get("bits")
        packing = quantization.get("checkpoint_format", "gptq")
        if bits != 4:
            fail(f"{bits!r} bits (4 are)")
        if packing != "gptq" or quantization.get("is_marlin_format"):
            fail(f"checkpoint_format {packing!r}{' (Marlin-repacked)' if quantization.get('is_marlin_format') else ''}"
                 " (gptq is; exllama v2 and Marlin repacks are not)")
        size = group_size(quantization.get("group_size", 128), -1)
        return Int4Format("gptq", size, flag("sym", True), flag("desc_act", False))
    if method == "compressed-tensors":
        return _compressed_tensors_format(quantization, path, group_size, flag, fail)
    return None


def _compressed_tensors_format(quantization: dict, path: str, group_size, flag, fail) -> Int4Format | None:
    if quantization.get("transform_config"):
        fail("a transform_config (rotations the engine does not apply)")
    groups = quantization.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return None  # no scheme stated: FP8 weights are still found by their dtype
    schemes = set()
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise ModelLoadError(f"{path}: compressed-tensors config group {name!r} is not an object")
        weights = group.get("weights")
        if weights is None:
            continue  # quantizes no weights (activation scales are not used: activations stay in the dtype)
        if not isinstance(weights, dict):
            raise ModelLoadError(f"{path}: compressed-tensors config group {name!r}: weights must be an object")
        if weights.get("type") == "float" and weights.get("num_bits") == 8:
            schemes.add(None)  # FP8: read by its dtype
            continue
        packing = group.get("format") or quantization.get("format")
        if weights.get("type") != "int" or weights.get("num_bits") != 4 or packing != "pack-quantized":
            fail(f"{weights.get('type')} weights of {weights.get('num_bits')} bits in format {packing!r} "
                 "(4-bit int weights in pack-quantized are)")
        if group.get("input_activations"):
            fail("quantized input activations (weight-only w4a16 is)")
        if quantization.get("quantization_status", "compressed") != "compressed":
            fail(f"quantization_status {quantization.get('quantization_status')!r} (compressed is)")
        strategy = weights.get("strategy")
        if strategy is None:  # as compressed-tensors infers it from the group size
            strategy = "channel" if weights.get("group_size") == -1 else "group"
        strategy = str(strategy).lower()
        if strategy not in ("group", "channel"):
            fail(f"strategy {strategy!r} (group or channel is)")
        size = group_size(weights.get("group_size")) if strategy == "group" else 0
        # act order "group" stores each column's group (weight_g_idx); "weight" and "static" only change
        # the order of calibration and store none.
        act_order = str(weights.get("actorder")).lower() in ("group", "dynamic", "true")
        schemes.add((size, flag("symmetric", True, weights), act_order))
    if not schemes or schemes == {None}:
        return None
    if len(schemes) != 1:
        fail("several schemes at once (one int4 scheme for all quantized layers is)")
    return Int4Format("compressed-tensors", *schemes.pop())


def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 words [..., n] -> their 8 codes each [..., n, 8], the lowest nibble first, as uint8."""
    unsigned = np.ascontiguousarray(words).view(np.uint32)
    return ((unsigned[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF).astype(np.uint8)


def _word_bytes(words: np.ndarray, inp: int) -> np.ndarray:
    """int32 words [out, n] packed along the input, lowest nibble first -> the engine's bytes
    [out, ceil(inp / 2)]: a word's 4 bytes in memory order (little-endian, as safetensors stores them
    and x86 and ARM hold them) hold its codes 2b, 2b + 1 in byte b."""
    return np.ascontiguousarray(words).view(np.uint8)[:, :(inp + 1) // 2]


@dataclass
class Int4Weight:
    """One projection's int4 weight (layouts in this module's docstring)."""

    packed: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    groups: np.ndarray

    @property
    def codes(self) -> np.ndarray:
        """uint8 [out, in]: one code a byte."""
        codes = np.empty((self.packed.shape[0], 2 * self.packed.shape[1]), np.uint8)
        codes[:, 0::2], codes[:, 1::2] = self.packed & 0xF, self.packed >> 4
        return codes[:, :len(self.groups)]

    def dequantized(self) -> np.ndarray:
        """w [out, in] float32: (code - zero) * scale of each element's group."""
        return (self.codes.astype(np.float32) - self.zeros[:, self.groups]) * self.scales[:, self.groups]

    def rows(self, first: int, stop: int) -> "Int4Weight":
        """Output rows [first, stop): a rank's slice of w1 or w3 (sharding.py)."""
        return Int4Weight(self.packed[first:stop], self.scales[first:stop], self.zeros[first:stop], self.groups)

    def columns(self, first: int, stop: int, group_size: int, name: str) -> "Int4Weight":
        """Input columns [first, stop) as a weight of their own, in groups of group_size (0: one a row)
        from its first column: a rank's slice of w2 (sharding.py). ModelLoadError when the slice does not
        start on a code pair and a group of the checkpoint, or its columns are in act order."""
        local = self.groups[first:stop]
        expected = np.arange(stop - first) // group_size if group_size > 0 else np.zeros(stop - first, np.int64)
        if first % 2 or not np.array_equal(local - local[0], expected):
            raise ModelLoadError(f"'{name}': int4 input columns [{first}, {stop}) of one rank do not start a group of "
                                 f"{group_size or 'one row'} in column order; such a checkpoint cannot be split along "
                                 f"the expert width over this many ranks")
        groups = slice(int(local[0]), int(local[-1]) + 1)
        return Int4Weight(np.ascontiguousarray(self.packed[:, first // 2:(stop + 1) // 2]),
                          np.ascontiguousarray(self.scales[:, groups]), np.ascontiguousarray(self.zeros[:, groups]),
                          expected.astype(self.groups.dtype))


_INTEGERS, _FLOATS = ("I32",), ("F16", "BF16", "F32")


class Int4Reader:
    """Reads module M's int4 tensors from a checkpoint (tensor name -> SafetensorsFile) for a weight
    [out, in]: check() checks every tensor's dtype and shape without reading data, read() unpacks
    (after check()). Every error names the tensor."""

    def __init__(self, fmt: Int4Format, files: dict) -> None:
        self.format, self.files = fmt, files

    def check(self, module: str, out: int, inp: int) -> int:
        """Checks module M's tensors; returns their bytes."""
        total = 0
        for name, dtypes, shape, required in self._expected(module, out, inp):
            if name not in self.files:
                if required:
                    raise ModelLoadError(f"missing tensor '{name}' in the {self.format.method} checkpoint")
                continue
            st = self.files[name]
            if st.dtype(name) not in dtypes or st.shape(name) != shape:
                raise ModelLoadError(f"{st.path}: tensor '{name}' is {st.dtype(name)}{list(st.shape(name))}, expected "
                                     f"{' or '.join(dtypes)} {list(shape)}")
            total += st.nbytes(name)
        return total

    def read(self, module: str, out: int, inp: int) -> Int4Weight:
        groups = self._group_count(module, inp)
        if self.format.method == "awq":
            return self._awq(module, out, inp, groups)
        if self.format.method == "gptq":
            return self._gptq(module, out, inp, groups)
        return self._compressed_tensors(module, out, inp, groups)

    def _expected(self, module: str, out: int, inp: int) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
        """(name, dtypes, shape, required) of each tensor of module M."""
        groups, m = self._group_count(module, inp), module
        if self.format.method == "awq":
            words = self._words(f"{m}.qweight", out, "output width")
            return [(f"{m}.qweight", _INTEGERS, (inp, words), True), (f"{m}.qzeros", _INTEGERS, (groups, words), True),
                    (f"{m}.scales", _FLOATS, (groups, out), True)]
        if self.format.method == "gptq":
            return [(f"{m}.qweight", _INTEGERS, (self._words(f"{m}.qweight", inp, "input width"), out), True),
                    (f"{m}.qzeros", _INTEGERS, (groups, self._words(f"{m}.qzeros", out, "output width")), True),
                    (f"{m}.scales", _FLOATS, (groups, out), True),
                    (f"{m}.g_idx", _INTEGERS, (inp,), self.format.act_order)]
        return [(f"{m}.weight_packed", _INTEGERS, (out, -(-inp // 8)), True),
                (f"{m}.weight_scale", _FLOATS, (out, groups), True),
                (f"{m}.weight_zero_point", _INTEGERS, (-(-out // 8), groups), not self.format.symmetric),
                (f"{m}.weight_g_idx", _INTEGERS, (inp,), self.format.act_order),
                (f"{m}.weight_shape", ("I32", "I64"), (2,), False)]

    def _group_count(self, module: str, inp: int) -> int:
        size = self.format.group_size
        if size == 0:
            return 1
        if inp % size:
            raise ModelLoadError(f"'{self.format.packed_name(module)}': group_size {size} does not divide the input "
                                 f"width {inp}")
        return inp // size

    @staticmethod
    def _words(name: str, count: int, what: str) -> int:
        if count % 8:
            raise ModelLoadError(f"'{name}': the {what} {count} is not a multiple of 8 (8 codes per int32)")
        return count // 8

    def _integers(self, name: str) -> np.ndarray:
        return self.files[name].integers(name)

    def _floats(self, name: str) -> np.ndarray:
        array, dtype = self.files[name].tensor(name)
        if dtype == "bfloat16":
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32)

    def _group_index(self, name: str, inp: int, groups: int) -> np.ndarray:
        """g_idx when the checkpoint has it (act order), else contiguous groups."""
        if name not in self.files:
            return (np.arange(inp) // (inp // groups)).astype(np.int32)
        index = self._integers(name)
        if index.min() < 0 or index.max() >= groups:
            raise ModelLoadError(f"'{name}': group indices must lie in [0, {groups})")
        # Act order is planned for from the config (the engine's workspace holds its column orders).
        if not self.format.act_order and not np.array_equal(index, np.arange(inp) // (self.format.group_size or inp)):
            raise ModelLoadError(f"'{name}' puts the columns' groups out of column order (act order), which the "
                                 f"quantization_config does not declare (GPTQ desc_act, compressed-tensors actorder)")
        return index.astype(np.int32)

    def _awq(self, module: str, out: int, inp: int, groups: int) -> Int4Weight:
        # Words along the output: nibble n of word (i, j) is column 8j + _AWQ_COLUMN_OF_NIBBLE[n] of input
        # row i. Each nibble plane [inp, out/8] is paired along the input into bytes, then transposed.
        words = np.ascontiguousarray(self._integers(f"{module}.qweight")).view(np.uint32)
        packed = np.zeros(((inp + 1) // 2, out), np.uint8)  # [in/2, out] first, transposed at the end
        for nibble, column in enumerate(_AWQ_COLUMN_OF_NIBBLE):
            plane = ((words >> np.uint32(4 * nibble)) & 0xF).astype(np.uint8)
            packed[:, column::8] = plane[0::2]
            packed[:inp // 2, column::8] |= plane[1::2] << 4
        zeros = _nibbles(self._integers(f"{module}.qzeros"))[..., _AWQ_NIBBLE_OF_COLUMN].reshape(groups, out)
        return Int4Weight(np.ascontiguousarray(packed.T), self._floats(f"{module}.scales").T,
                          zeros.T.astype(np.float32), (np.arange(inp) // (inp // groups)).astype(np.int32))

    def _gptq(self, module: str, out: int, inp: int, groups: int) -> Int4Weight:
        packed = _word_bytes(self._integers(f"{module}.qweight").T, inp)  # [in/8, out] words, along the input
        zeros = _nibbles(self._integers(f"{module}.qzeros")).reshape(groups, out) + 1.0  # stored minus one
        return Int4Weight(packed, self._floats(f"{module}.scales").T, zeros.T.astype(np.float32),
                          self._group_index(f"{module}.g_idx", inp, groups))

    def _compressed_tensors(self, module: str, out: int, inp: int, groups: int) -> Int4Weight:
        shape_name = f"{module}.weight_shape"
        if shape_name in self.files and [int(d) for d in self._integers(shape_name)] != [out, inp]:
            raise ModelLoadError(f"'{shape_name}' holds {self._integers(shape_name).tolist()}, expected [{out}, {inp}]")
        packed = _word_bytes(self._integers(f"{module}.weight_packed"), inp)
        if self.format.symmetric:
            zeros = np.full((out, groups), 8.0, np.float32)
        else:
            zero_words = self._integers(f"{module}.weight_zero_point")
            zeros = _nibbles(zero_words).transpose(0, 2, 1).reshape(-1, groups)[:out].astype(np.float32)
        return Int4Weight(packed, self._floats(f"{module}.weight_scale"), zeros,
                          self._group_index(f"{module}.weight_g_idx", inp, groups))
