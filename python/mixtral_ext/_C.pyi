"""
mixtral_ext core (C++): engine, operations, KV cache manager
"""
from __future__ import annotations
import collections.abc
import numpy
import numpy.typing
import typing
import typing_extensions
__all__: list[str] = ['Engine', 'ModelConfig', 'Ops', 'SamplingParams', 'ThreadTuner', 'device_memory', 'probe_cuda', 'quantize_fp8', 'quantize_int4']
class ModelConfig:
    def __init__(self) -> None:
        ...
    def validate(self) -> None:
        ...
    @property
    def experts_per_token(self) -> int:
        ...
    @experts_per_token.setter
    def experts_per_token(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def head_dim(self) -> int:
        ...
    @head_dim.setter
    def head_dim(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def hidden_size(self) -> int:
        ...
    @hidden_size.setter
    def hidden_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def intermediate_size(self) -> int:
        ...
    @intermediate_size.setter
    def intermediate_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def max_position_embeddings(self) -> int:
        ...
    @max_position_embeddings.setter
    def max_position_embeddings(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_experts(self) -> int:
        ...
    @num_experts.setter
    def num_experts(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_heads(self) -> int:
        ...
    @num_heads.setter
    def num_heads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_kv_heads(self) -> int:
        ...
    @num_kv_heads.setter
    def num_kv_heads(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def num_layers(self) -> int:
        ...
    @num_layers.setter
    def num_layers(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def rms_norm_eps(self) -> float:
        ...
    @rms_norm_eps.setter
    def rms_norm_eps(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def rope_theta(self) -> float:
        ...
    @rope_theta.setter
    def rope_theta(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def vocab_size(self) -> int:
        ...
    @vocab_size.setter
    def vocab_size(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
class SamplingParams:
    def __getstate__(self) -> tuple[float, int, float, float, float, float, float, int]:
        ...
    def __init__(self) -> None:
        ...
    def __setstate__(self, arg0: tuple) -> None:
        ...
    def validate(self) -> None:
        ...
    @property
    def frequency_penalty(self) -> float:
        ...
    @frequency_penalty.setter
    def frequency_penalty(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def logprobs(self) -> int:
        ...
    @logprobs.setter
    def logprobs(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def min_p(self) -> float:
        ...
    @min_p.setter
    def min_p(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def presence_penalty(self) -> float:
        ...
    @presence_penalty.setter
    def presence_penalty(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def repetition_penalty(self) -> float:
        ...
    @repetition_penalty.setter
    def repetition_penalty(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def temperature(self) -> float:
        ...
    @temperature.setter
    def temperature(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
    @property
    def top_k(self) -> int:
        ...
    @top_k.setter
    def top_k(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def top_p(self) -> float:
        ...
    @top_p.setter
    def top_p(self, arg0: typing.SupportsFloat | typing.SupportsIndex) -> None:
        ...
class ThreadTuner:
    """
    The CPU's thread count chosen by timing decode steps (cpu/thread_tuner.h).
    """
    available_threads: typing.ClassVar[int] = 2
    max_wait: typing.ClassVar[int] = 4096
    def __init__(self, max_threads: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def other_work_ran(self) -> None:
        """
        work other than a decode step ran, at `best` threads
        """
    def record(self, seconds: typing.SupportsFloat | typing.SupportsIndex) -> None:
        """
        the step just run at `threads` took this long
        """
    @property
    def best(self) -> int:
        """
        for other work
        """
    @property
    def threads(self) -> int:
        """
        for the next decode step
        """
class Engine:
    @staticmethod
    def memory_plan(config: ModelConfig, weight_dtype: str, activation_dtype: str, max_context: typing.SupportsInt | typing.SupportsIndex, page_size: typing.SupportsInt | typing.SupportsIndex, max_batch_tokens: typing.SupportsInt | typing.SupportsIndex, expert_dtype: str = '', int4_group_size: typing.SupportsInt | typing.SupportsIndex = 128, held_experts: typing.SupportsInt | typing.SupportsIndex = 0, int4_act_order: bool = False) -> tuple[int, int, int]:
        """
        (weight bytes, workspace bytes, KV cache bytes per token) of an engine with these settings.
        """
    def __init__(self, config: ModelConfig, device: str, weight_dtype: str, activation_dtype: str, max_context: typing.SupportsInt | typing.SupportsIndex, kv_cache_tokens: typing.SupportsInt | typing.SupportsIndex, page_size: typing.SupportsInt | typing.SupportsIndex, max_batch_tokens: typing.SupportsInt | typing.SupportsIndex, cuda_library: str = '', graphs: bool = False, expert_dtype: str = '', num_threads: typing.SupportsInt | typing.SupportsIndex = 0, int4_group_size: typing.SupportsInt | typing.SupportsIndex = 128, first_expert: typing.SupportsInt | typing.SupportsIndex = 0, held_experts: typing.SupportsInt | typing.SupportsIndex = 0, int4_act_order: bool = False) -> None:
        """
        held_experts > 0: the engine holds experts [first_expert, first_expert + held_experts) only (an
        expert-parallel rank); load_weight takes the model's expert ids. int4_act_order: int4 blocks
        may come with act order (the workspace holds inputs in column order).
        """
    def abort_communicator(self) -> None:
        """
        From any thread, when a rank is gone: the collectives waiting for it fail instead of hanging.
        """
    def append(self, sequence: typing.SupportsInt | typing.SupportsIndex, tokens: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], all_logits: bool) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def append_sample(self, sequence: typing.SupportsInt | typing.SupportsIndex, tokens: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], sampler: typing.SupportsInt | typing.SupportsIndex) -> tuple[int, float, list[int], list[float]]:
        """
        Runs the tokens, then samples the next one on the device: (token, logprob, top_ids, top_logprobs).
        """
    def create_sampler(self, params: SamplingParams, seed: typing.SupportsInt | typing.SupportsIndex, prompt: typing.Annotated[numpy.typing.ArrayLike, numpy.int32]) -> int:
        ...
    def create_sequence(self) -> int:
        ...
    def decode_next(self, sequence: typing.SupportsInt | typing.SupportsIndex, sampler: typing.SupportsInt | typing.SupportsIndex, queue_ahead: bool) -> tuple[int, float, list[int], list[float]]:
        """
        The next decode step of the sampler's last token (pipelined; see engine.h): the tuple of append_sample.
        """
    def init_random(self, seed: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def join_communicator(self, nccl_library: str, id: bytes, rank: typing.SupportsInt | typing.SupportsIndex, world_size: typing.SupportsInt | typing.SupportsIndex) -> None:
        """
        Makes this GPU engine rank `rank` of a sharded model in the group of `id`; returns once all ranks joined.
        """
    def load_weight(self, slot: str, layer: typing.SupportsInt | typing.SupportsIndex, expert: typing.SupportsInt | typing.SupportsIndex, row_offset: typing.SupportsInt | typing.SupportsIndex, source: typing_extensions.Buffer, source_dtype: str, row_scales: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None = None) -> None:
        ...
    def load_weight_int4(self, slot: str, layer: typing.SupportsInt | typing.SupportsIndex, expert: typing.SupportsInt | typing.SupportsIndex, row_offset: typing.SupportsInt | typing.SupportsIndex, packed: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], scales: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], zeros: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], column_groups: typing.Annotated[numpy.typing.ArrayLike, numpy.int32] | None = None) -> None:
        """
        An int4 block as it is stored (core/int4.h): packed codes uint8 [rows, cols / 2], scales and zeros [rows, groups], each input column's group (act order) or None.
        """
    def memory_info(self) -> tuple[int, int]:
        """
        (free, total) bytes of the engine's device now
        """
    def missing_weights(self) -> list[str]:
        ...
    def new_communicator_id(self, nccl_library: str) -> bytes:
        """
        A new group id of the backend's collectives (NCCL's), made by rank 0.
        """
    def release_sampler(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def release_sequence(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    def sequence_length(self, arg0: typing.SupportsInt | typing.SupportsIndex) -> int:
        ...
    def set_backend_option(self, arg0: str, arg1: str) -> None:
        ...
    def set_communicator(self, rank: typing.SupportsInt | typing.SupportsIndex, world_size: typing.SupportsInt | typing.SupportsIndex, all_reduce: typing.Any) -> None:
        """
        Makes this CPU engine rank `rank` of a sharded model: all_reduce(float32 array) sums the array over the ranks in place.
        """
    def truncate_sequence(self, arg0: typing.SupportsInt | typing.SupportsIndex, arg1: typing.SupportsInt | typing.SupportsIndex) -> None:
        ...
    @property
    def device(self) -> str:
        ...
    @property
    def expert_dtype(self) -> str:
        ...
    @property
    def free_pages(self) -> int:
        ...
    @property
    def kv_cache_bytes(self) -> int:
        ...
    @property
    def num_pages(self) -> int:
        ...
    @property
    def num_samplers(self) -> int:
        ...
    @property
    def num_sequences(self) -> int:
        ...
    @property
    def num_threads(self) -> int:
        ...
    @property
    def page_size(self) -> int:
        ...
    @property
    def weight_bytes(self) -> int:
        ...
    @property
    def workspace_bytes(self) -> int:
        ...
class Ops:
    """
    Single operations on one backend, for testing the CUDA ops against their CPU twins.
    """
    def __init__(self, device: str, cuda_library: str = '') -> None:
        ...
    def add_rmsnorm(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.Annotated[numpy.typing.ArrayLike, numpy.float32] | None, arg2: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg3: typing.SupportsFloat | typing.SupportsIndex, arg4: str) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
        ...
    def add_rmsnorm_moe(self, residual: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], delta: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], norm_weight: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], eps: typing.SupportsFloat | typing.SupportsIndex, router: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w13: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w2: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], k: typing.SupportsInt | typing.SupportsIndex, dtype: str, expert_dtype: str = '', first_expert: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32], tuple, numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
        ...
    def attention(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.SupportsInt | typing.SupportsIndex, arg2: typing.SupportsInt | typing.SupportsIndex, arg3: typing.SupportsInt | typing.SupportsIndex, arg4: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg5: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg6: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg7: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg8: str) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def embedding(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg2: str) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def expert_matmul(self, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], dtype: str, out_dtype: str, expert_dtype: str = '') -> numpy.typing.NDArray[numpy.float32]:
        ...
    def expert_matmul_int4(self, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], packed: typing.Annotated[numpy.typing.ArrayLike, numpy.uint8], scales: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], zeros: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], input_order: typing.Annotated[numpy.typing.ArrayLike, numpy.int32] | None, group_size: typing.SupportsInt | typing.SupportsIndex, offsets: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], dtype: str) -> numpy.typing.NDArray[numpy.float32]:
        """
        expert_matmul of int4 weights given by their parts (core/int4.h): packed codes [E, N, K / 2], scales (rounded to float16) and zeros [E, N, groups], input_order [E, segments, K] or None.
        """
    def fill_uniform(self, arg0: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], arg1: typing.SupportsInt | typing.SupportsIndex, arg2: typing.SupportsFloat | typing.SupportsIndex, arg3: typing.SupportsFloat | typing.SupportsIndex, arg4: str) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def matmul(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg2: str, arg3: str) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def moe(self, x: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], router: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w13: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], w2: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], k: typing.SupportsInt | typing.SupportsIndex, dtype: str, expert_dtype: str = '', first_expert: typing.SupportsInt | typing.SupportsIndex = 0) -> tuple[tuple, numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
        """
        w13 and w2 may hold a slice of the router's experts, from first_expert (an expert-parallel rank's)
        """
    def moe_gather(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg2: typing.SupportsInt | typing.SupportsIndex, arg3: str) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def moe_permute(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg1: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.int32]]:
        ...
    def moe_unpermute(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg2: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg3: str) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def moe_unpermute_add_rmsnorm(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg2: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg3: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg4: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg5: typing.SupportsFloat | typing.SupportsIndex, arg6: str) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
        ...
    def rope_attention(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.SupportsInt | typing.SupportsIndex, arg2: typing.SupportsInt | typing.SupportsIndex, arg3: typing.SupportsInt | typing.SupportsIndex, arg4: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg5: typing.SupportsFloat | typing.SupportsIndex, arg6: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg7: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg8: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg9: str) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
        ...
    def rope_kv_append(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.SupportsInt | typing.SupportsIndex, arg2: typing.SupportsInt | typing.SupportsIndex, arg3: typing.SupportsInt | typing.SupportsIndex, arg4: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg5: typing.SupportsFloat | typing.SupportsIndex, arg6: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg7: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg8: typing.Annotated[numpy.typing.ArrayLike, numpy.int32], arg9: str) -> tuple[numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
        ...
    def route(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg2: typing.SupportsInt | typing.SupportsIndex, arg3: str) -> tuple:
        ...
    def router_topk(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: typing.SupportsInt | typing.SupportsIndex) -> tuple[numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.float32]]:
        ...
    def sample(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: SamplingParams, arg2: typing.SupportsInt | typing.SupportsIndex, arg3: typing.Annotated[numpy.typing.ArrayLike, numpy.int32]) -> tuple[int, float, numpy.typing.NDArray[numpy.int32], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.int32]]:
        """
        One draw; state [2V + 1] int32 is seen, counts, step. Returns (token, logprob, top_ids, top_logprobs, state after).
        """
    def set_option(self, arg0: str, arg1: str) -> None:
        ...
    def silu_mul(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: str) -> numpy.typing.NDArray[numpy.float32]:
        ...
    def time_attention(self, arg0: typing.SupportsInt | typing.SupportsIndex, arg1: typing.SupportsInt | typing.SupportsIndex, arg2: typing.SupportsInt | typing.SupportsIndex, arg3: typing.SupportsInt | typing.SupportsIndex, arg4: typing.SupportsInt | typing.SupportsIndex, arg5: typing.SupportsInt | typing.SupportsIndex, arg6: str, arg7: typing.SupportsInt | typing.SupportsIndex) -> float:
        ...
    def time_expert_matmul(self, rows_per_expert: collections.abc.Sequence[typing.SupportsInt | typing.SupportsIndex], n: typing.SupportsInt | typing.SupportsIndex, k: typing.SupportsInt | typing.SupportsIndex, dtype: str, iters: typing.SupportsInt | typing.SupportsIndex, expert_dtype: str = '') -> float:
        ...
    def time_matmul(self, arg0: typing.SupportsInt | typing.SupportsIndex, arg1: typing.SupportsInt | typing.SupportsIndex, arg2: typing.SupportsInt | typing.SupportsIndex, arg3: str, arg4: str, arg5: typing.SupportsInt | typing.SupportsIndex) -> float:
        ...
    def time_sample(self, arg0: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], arg1: SamplingParams, arg2: typing.SupportsInt | typing.SupportsIndex) -> float:
        """
        Mean seconds of one draw from the given logits [V] (the state starts empty).
        """
def device_memory(device: str, cuda_library: str = '') -> tuple[int, int]:
    """
    (free, total) bytes of a device, before any engine is made
    """
def probe_cuda(library_path: str) -> tuple[int, str]:
    """
    Loads the CUDA backend library and returns (device_count, summary); -1 when unusable.
    """
def quantize_fp8(w: typing.Annotated[numpy.typing.ArrayLike, numpy.float32]) -> tuple[numpy.typing.NDArray[numpy.uint8], numpy.typing.NDArray[numpy.float32]]:
    """
    The engine's FP8 quantization of expert weights (core/fp8.h): (E4M3 bytes, row scales).
    """
def quantize_int4(w: typing.Annotated[numpy.typing.ArrayLike, numpy.float32], group_size: typing.SupportsInt | typing.SupportsIndex = 128) -> tuple[numpy.typing.NDArray[numpy.uint8], numpy.typing.NDArray[numpy.float32], numpy.typing.NDArray[numpy.float32]]:
    """
    The engine's int4 quantization of expert weights (core/int4.h): (codes uint8 [rows, cols], scales (float16 values) and zeros [rows, groups]).
    """
