"""Sharded engines: one model over N ranks (tensor parallel; sharding.py says which slice each holds),
one process per rank.

Rank 0 is the caller's process and holds the API. It starts ranks 1..N-1 as worker processes
(running main() here), or finds them started by torchrun, and they follow it:
  - setup: rank 0 puts what to build (a checkpoint's path or random weights, the engine's options and
    context) in a torch.distributed TCPStore that it serves; each rank builds and loads its slice, in
    parallel, and says so in the store;
  - collectives: the ranks join a gloo group through the store, and a CPU engine's all-reduces call it
    (csrc/bindings/module.cpp's PythonCommunicator). GPU engines would join NCCL instead, through a
    communicator of the CUDA backend: not built yet, so sharded engines run on the CPU;
  - calls: every core call that changes state (sequences, prompts, samplers, decode steps) is put in
    the store, numbered, before rank 0 makes it, and every worker makes the same calls in the same
    order. The logits are the same bytes on every rank, so each rank's sampler draws the same token
    on its own device: nothing comes back to rank 0, and nothing waits for the host per token;
  - failures: a worker that dies breaks the next all-reduce (gloo sees the connection close; a rank
    that hangs runs into the group's timeout, COLLECTIVE_TIMEOUT). Rank 0 then raises WorkerError
    naming the rank and how it ended, and so does every later call until close(). A worker that fails
    a call in a way rank 0 cannot have (a device error) says so in the store and exits; a call that
    fails on its checks fails on every rank alike, and the workers go on. Workers exit when rank 0
    closes the engine or its store goes away with its process.
"""

from __future__ import annotations

import functools
import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

from . import errors
from .config import MixtralConfig
from .errors import DeviceError, MixtralError, SettingError, WorkerError

# How long a collective waits for a rank that does not come: a rank that hangs this long is reported.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)
# How long close() waits for the workers to leave before it kills them.
_CLOSE_WAIT = 10.0
# The core calls that change state: rank 0 sends each to the workers before making it.
FOLLOWED_CALLS = frozenset({"create_sequence", "release_sequence", "truncate_sequence", "append", "append_sample",
                            "create_sampler", "release_sampler", "decode_next", "set_backend_option"})


@dataclass(frozen=True)
class RankSetup:
    """What every rank builds: a checkpoint's slice, or random weights of a config."""

    world: int
    source: str | MixtralConfig  # a checkpoint directory, or the config of random weights
    seed: int  # of random weights (every rank draws the replicated tensors alike)
    options: object  # engine._EngineOptions, as rank 0 settled them (expert dtype, group size)
    max_context: int
    kv_cache_tokens: int


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world size) when torchrun started this process as one of several, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _wait_until_ready(store, workers: list[subprocess.Popen], world: int) -> None:
    """Waits for every worker's slice; a worker's failure is raised here as the error it hit."""
    waiting = set(range(1, world))
    while waiting:
        for rank in sorted(waiting):
            if store.check([f"failed/{rank}"]):
                kind, message = pickle.loads(store.get(f"failed/{rank}"))
                cls = getattr(errors, kind, None)
                raise (cls if isinstance(cls, type) and issubclass(cls, MixtralError) else WorkerError)(
                    f"rank {rank}: {message}")
            if store.check([f"ready/{rank}"]):
                waiting.discard(rank)
            elif workers and workers[rank - 1].poll() is not None:
                raise WorkerError(f"rank {rank} {_ending(workers[rank - 1].returncode)} while it loaded its slice")
        time.sleep(0.02)


def _join(store, core, rank: int, world: int):
    """Joins this rank's core to the collectives of the group; returns what keeps them open."""
    import torch
    import torch.distributed as dist

    group = dist.ProcessGroupGloo(dist.PrefixStore("gloo", store), rank, world, COLLECTIVE_TIMEOUT)

    def all_reduce(array) -> None:
        group.allreduce([torch.from_numpy(array)]).wait()

    core.set_communicator(rank, world, all_reduce)
    return group


def _ending(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _stop(workers: list[subprocess.Popen], patience: float = _CLOSE_WAIT) -> None:
    """Waits up to `patience` seconds for the workers to exit, then kills those left."""
    deadline = time.monotonic() + patience
    for worker in workers:
        try:
            worker.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


class ShardedCore:
    """Rank 0's core of a sharded engine, in place of the core of a one-rank engine: every state
    changing call goes to the workers first (FOLLOWED_CALLS), everything else is rank 0's own."""

    def __init__(self, local, store, world: int, workers: list[subprocess.Popen], group) -> None:
        self._local, self._store, self._world, self._workers, self._group = local, store, world, workers, group
        self._commands = 0
        self._failure: str | None = None

    @classmethod
    def start(cls, setup: RankSetup, progress) -> "ShardedCore":
        """Rank 0's core of a sharded engine: starts (or, under torchrun, reaches) the other ranks, builds
        its own slice, waits for theirs and joins the collectives."""
        from . import engine  # engine imports this module

        try:
            import torch.distributed as dist
        except ImportError as e:
            raise SettingError(f"tensor_parallel > 1 needs torch: pip install 'mixtral_ext[parallel]' ({e})") from None

        launched = torchrun_rank()
        if launched is not None and launched[1] != setup.world:
            raise SettingError(f"tensor_parallel {setup.world} must equal torchrun's world size {launched[1]}")
        host = os.environ.get("MASTER_ADDR", "127.0.0.1") if launched else "127.0.0.1"
        store = dist.TCPStore(host, 0, setup.world, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
        store.set("setup", pickle.dumps(setup))
        workers: list[subprocess.Popen] = []
        if launched:  # the other ranks wait in follow_torchrun() for the store's address
            if dist.is_initialized():
                raise SettingError("under torchrun the ranks follow one sharded engine, and this process made it")
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
            dist.broadcast_object_list([host, store.port], src=0)
        else:
            environment = dict(os.environ, TORCH_CPP_LOG_LEVEL=os.environ.get("TORCH_CPP_LOG_LEVEL", "ERROR"))
            command = [sys.executable, "-c", "import sys; from mixtral_ext.parallel import main; main(sys.argv[1:])"]
            workers = [subprocess.Popen(command + [host, str(store.port), str(rank)], env=environment)
                       for rank in range(1, setup.world)]
        try:
            core = engine.build_rank(setup, 0, progress)
            _wait_until_ready(store, workers, setup.world)
            group = _join(store, core, 0, setup.world)
        except BaseException:
            _stop(workers, patience=0.0)
            raise
        return cls(core, store, setup.world, workers, group)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not a core attribute (and not yet set, in a failed __init__)
            raise AttributeError(name)
        value = getattr(self._local, name)
        return functools.partial(self._followed, name, value) if name in FOLLOWED_CALLS else value

    def _followed(self, name: str, call, *args):
        if self._failure is None:
            self._check_workers()
        if self._failure is not None:
            if name.startswith("release_"):  # rank 0 frees its own part (closing the engine does)
                return call(*args)
            raise WorkerError(self._failure)
        self._send(name, args)
        try:
            return call(*args)
        except WorkerError as e:  # an all-reduce failed: a rank is gone or stuck
            self._check_workers()
            self._failure = self._failure or str(e)
            raise WorkerError(self._failure) from None

    def _send(self, name: str, args: tuple) -> None:
        self._store.set(f"command/{self._commands}", pickle.dumps((name, args)))
        self._commands += 1

    def _check_workers(self) -> None:
        """Records the first worker that has reported a failure or (one started here) ended."""
        for rank in range(1, self._world):
            worker = self._workers[rank - 1] if self._workers else None  # None: torchrun's
            if self._store.check([f"failed/{rank}"]):
                kind, message = pickle.loads(self._store.get(f"failed/{rank}"))
                self._failure = f"rank {rank} failed: {kind}: {message}; close the engine"
            elif worker is not None and worker.poll() is not None:
                self._failure = f"rank {rank} {_ending(worker.returncode)}; close the engine"
            if self._failure:
                return

    def close(self) -> None:
        """Asks the workers to leave, waits for them (killing those that do not go), frees rank 0's core."""
        if self._local is None:
            return
        try:
            self._send("close", ())
        except Exception:  # the store is gone: the workers go with it
            pass
        _stop(self._workers)
        self._local = self._group = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def follow(store, rank: int) -> None:
    """A worker's life: builds rank `rank`'s slice from the setup in the store, joins the collectives,
    then makes rank 0's calls in order until it closes the engine or goes away."""
    from . import engine

    setup: RankSetup = pickle.loads(store.get("setup"))
    try:
        core = engine.build_rank(setup, rank, progress=False)
        store.set(f"ready/{rank}", b"")
        group = _join(store, core, rank, setup.world)
        _make_calls(store, core, setup.world)
    except BaseException as e:
        store.set(f"failed/{rank}", pickle.dumps((type(e).__name__, str(e))))
        raise
    del core, group


def _make_calls(store, core, world: int) -> None:
    import torch.distributed as dist

    for command in range(sys.maxsize):
        key = f"command/{command}"
        while True:
            try:
                store.wait([key], timedelta(days=1))
                break
            except dist.DistStoreError:  # a day without a call: wait on
                continue
            except dist.DistError:  # rank 0's store is gone, and rank 0 with it
                return
        name, args = pickle.loads(store.get(key))
        if store.add(f"read/{command}", 1) == world - 1:  # the last worker to read it clears it away
            store.delete_key(key)
            store.delete_key(f"read/{command}")
        if name == "close":
            return
        try:
            getattr(core, name)(*args)
        except (DeviceError, WorkerError):
            raise
        except MixtralError:  # its checks failed here as they did on rank 0
            pass


def follow_torchrun() -> None:
    """A rank above 0 that torchrun started: gets rank 0's store and follows it (see start())."""
    import torch.distributed as dist

    rank, world = torchrun_rank()
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    address = [None, None]
    dist.broadcast_object_list(address, src=0)
    follow(dist.TCPStore(address[0], address[1], world, is_master=False, timeout=COLLECTIVE_TIMEOUT), rank)


def main(argv: list[str]) -> None:
    """A worker that rank 0 started, with arguments HOST PORT RANK (its store and its rank)."""
    import torch.distributed as dist

    host, port, rank = argv
    try:
        follow(dist.TCPStore(host, int(port), is_master=False, timeout=COLLECTIVE_TIMEOUT), int(rank))
    except MixtralError:  # reported to rank 0, which raises it
        sys.exit(1)

