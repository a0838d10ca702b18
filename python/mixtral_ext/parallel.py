"""Sharded engines: one model over N ranks (tensor or expert parallel; sharding.py says which slice
each holds), one process per rank.

Rank 0 is the caller's process and holds the API. It starts ranks 1..N-1 as worker processes
(running main() here), or finds them started by torchrun, and they follow it:
  - setup: rank 0 puts what to build (a checkpoint's path or random weights, the engine's options and
    context) in a torch.distributed TCPStore that it serves; each rank builds and loads its slice, in
    parallel, and says so in the store;
  - collectives: CPU ranks join a gloo group through the store, and their all-reduces call it
    (csrc/bindings/module.cpp's PythonCommunicator); GPU ranks, one GPU each, join an NCCL group whose id
    rank 0 puts in the store, and their all-reduces are NCCL's on the engine's stream
    (csrc/cuda/nccl_communicator.cu), recorded in CUDA graphs with the rest of a decode step;
  - calls: every core call that changes state (sequences, prompts, samplers, decode steps) is put in
    the store, numbered, before rank 0 makes it, and every worker makes the same calls in the same
    order. The logits are the same bytes on every rank, so each rank's sampler draws the same token
    on its own device: no rank waits for another's token. Per token, rank 0 puts one call in the store
    (microseconds, on its own host) and each worker takes it;
  - failures: a worker that dies breaks the next all-reduce on the CPU (gloo sees the connection close;
    a rank that hangs runs into the group's timeout, COLLECTIVE_TIMEOUT). On the GPU, where NCCL would
    wait for it forever, rank 0's watchdog thread sees the worker's process end within _WATCH_INTERVAL
    and aborts the group: the all-reduces under way return, and the call, whose results are garbage
    then, raises. Rank 0 joins the NCCL group watching the workers too. A GPU rank that hangs alive is
    not seen, nor the end of one of torchrun's (torchrun ends the job itself when a rank dies). Rank 0
    then raises WorkerError naming the rank and how it ended, and so does every later call until
    close(). A worker that fails a call in a way rank 0 cannot have (a device error) says so in the
    store and exits; a call that fails on its checks fails on every rank alike, and the workers go on.
    Workers exit when rank 0 closes the engine, and when rank 0's process is gone (its store goes with
    it; a worker that rank 0 started also watches its parent, as it may be waiting in an NCCL kernel).
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import signal
import subprocess
import sys
import threading
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
# How often the watchdog of a GPU engine looks at its workers' processes.
_WATCH_INTERVAL = 0.25
# The core calls that change state: rank 0 sends each to the workers before making it.
FOLLOWED_CALLS = frozenset({"create_sequence", "release_sequence", "truncate_sequence", "append", "append_sample",
                            "create_sampler", "release_sampler", "decode_next", "set_backend_option"})
# Calls that return a handle: rank 0 sends the one it got after them, and a worker that got another
# (the ranks out of step) fails loudly rather than going on with the wrong sequence or sampler.
_HANDLE_CALLS = frozenset({"create_sequence", "create_sampler"})


@dataclass(frozen=True)
class RankSetup:
    """What every rank builds: a checkpoint's slice, or random weights of a config."""

    sharding: object  # sharding.Sharding: the ranks, and how they split the model
    source: str | MixtralConfig  # a checkpoint directory, or the config of random weights
    seed: int  # of random weights (every rank draws the replicated tensors alike)
    options: object  # engine._EngineOptions, as rank 0 settled them (expert dtype, group size)
    max_context: int
    kv_cache_tokens: int
    nccl_library: str = ""  # on the GPU: NCCL's library (cuda.nccl_library()); "" on the CPU
    # On the GPU, each rank's GPU as CUDA_VISIBLE_DEVICES names it; () under torchrun, whose ranks take
    # the GPU of their LOCAL_RANK on their node.
    gpus: tuple[str, ...] = ()

    @property
    def world(self) -> int:
        return self.sharding.world


def visible_gpus(world: int, device_count: int) -> tuple[str, ...]:
    """The GPU of each of `world` ranks, as CUDA_VISIBLE_DEVICES names them; SettingError when this
    process sees fewer."""
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    gpus = named[:device_count] if "CUDA_VISIBLE_DEVICES" in os.environ else [str(i) for i in range(device_count)]
    if world > len(gpus):
        raise SettingError(f"tensor_parallel {world} exceeds the {len(gpus)} GPUs this process sees")
    return tuple(gpus[:world])


def _gpu_of(setup: RankSetup, rank: int) -> str:
    """The CUDA_VISIBLE_DEVICES of rank `rank`'s process: its GPU of the setup, or under torchrun the
    LOCAL_RANK-th GPU its node shows it."""
    if setup.gpus:
        return setup.gpus[rank]
    local = int(os.environ.get("LOCAL_RANK", "0"))
    named = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return named[local] if local < len(named) else str(local)


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


def _join(store, core, rank: int, setup: RankSetup, group_id: bytes, workers: list[subprocess.Popen]):
    """Joins this rank's core to the collectives (on the GPU the NCCL group of group_id, else a gloo
    group), once every rank has; returns what keeps them open."""
    if setup.nccl_library and rank == 0 and workers:
        _join_watching(store, core, setup, group_id, workers)
        return None
    if setup.nccl_library:
        core.join_communicator(setup.nccl_library, group_id, rank, setup.world)
        return None
    import torch
    import torch.distributed as dist

    world = setup.world
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
        # A call made while another is under way on this thread (a finaliser run by the garbage collector
        # releasing a sequence) waits for it, so that every rank sees the calls in one order.
        self._calling = False
        self._deferred: list[tuple[str, tuple]] = []
        self._closing, self._aborted = threading.Event(), threading.Event()
        self._watchdog = None
        if group is None and workers:  # NCCL: a dead rank would leave the others' all-reduces waiting
            self._watchdog = threading.Thread(target=_watch, args=(workers, local, self._closing, self._aborted),
                                              name="mixtral_ext rank watchdog", daemon=True)
            self._watchdog.start()

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
            if not setup.nccl_library:  # the host's cores shared among the ranks (rank 0's tuner finds its own share)
                environment.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // setup.world)))
            command = [sys.executable, "-c", "import sys; from mixtral_ext.parallel import main; main(sys.argv[1:])"]
            # A session of their own: a Ctrl-C at the terminal interrupts rank 0, which decides, not the workers.
            workers = [subprocess.Popen(command + [host, str(store.port), str(rank)], env=environment,
                                        start_new_session=True) for rank in range(1, setup.world)]
        try:
            core = engine.build_rank(setup, 0, progress)
            _wait_until_ready(store, workers, setup.world)
            # Every rank has its slice: they may join the collectives (on the GPU, NCCL's group of this id).
            group_id = core.new_communicator_id(setup.nccl_library) if setup.nccl_library else b""
            store.set("go", group_id)
            group = _join(store, core, 0, setup, group_id, workers)
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
        if self._calling and name.startswith("release_"):
            self._deferred.append((name, args))
            return None
        if self._failure is None:
            self._check_workers()
        if self._failure is not None:
            if name.startswith("release_"):  # rank 0 frees its own part (closing the engine does), as it can
                with contextlib.suppress(MixtralError):  # a device lost with the group, on the GPU
                    call(*args)
                return None
            raise WorkerError(self._failure)
        self._calling = True
        try:
            self._send(name, args)
            result = call(*args)
            if self._aborted.is_set():  # NCCL's kernels returned early: what they computed is garbage
                raise WorkerError("a rank ended during the call")
            if name in _HANDLE_CALLS:
                self._send("expect_handle", (result,))
            return result
        except (WorkerError, DeviceError) as e:  # a collective failed (or was aborted): a rank is gone or stuck
            self._check_workers()
            if self._failure is None and not isinstance(e, WorkerError):
                raise  # this rank's own device error
            self._failure = self._failure or str(e)
            raise WorkerError(self._failure) from None
        except MixtralError:  # the call's checks failed, on every rank alike
            raise
        except BaseException as e:  # interrupted (Ctrl-C) mid-call: rank 0 may no longer match the others
            self._failure = self._failure or (f"rank 0 was interrupted ({type(e).__name__}) in {name}, so the "
                                              f"ranks may be out of step; close the engine")
            raise
        finally:
            self._calling = False
            while self._deferred and self._failure is None:
                deferred_name, deferred_args = self._deferred.pop(0)
                self._followed(deferred_name, getattr(self._local, deferred_name), *deferred_args)

    def _send(self, name: str, args: tuple) -> None:
        payload = pickle.dumps((name, args))
        index, self._commands = self._commands, self._commands + 1
        self._store.set(f"command/{index}", payload)

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
        self._closing.set()  # first: workers leaving now are no failure
        if self._watchdog is not None:
            self._watchdog.join()
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


def _watch(workers: list[subprocess.Popen], core, closing: threading.Event, aborted: threading.Event) -> None:
    """Rank 0's watchdog of a GPU engine: aborts the NCCL group when a worker's process ends, so that
    rank 0's waits on its all-reduces end (its calls then raise WorkerError). It holds the core, not
    the ShardedCore, so that an engine nobody closes is still collected (and closed)."""
    while not closing.wait(_WATCH_INTERVAL):
        if any(worker.poll() is not None for worker in workers):
            aborted.set()
            core.abort_communicator()
            return


def _join_watching(store, core, setup: RankSetup, group_id: bytes, workers: list[subprocess.Popen]) -> None:
    """Rank 0's join of the NCCL group, which returns once every rank has joined: on a thread of its
    own, while this one watches the workers; a worker that ends meanwhile is a WorkerError (the thread
    then stays blocked in NCCL until the process exits)."""
    failures: list[BaseException] = []

    def join() -> None:
        try:
            core.join_communicator(setup.nccl_library, group_id, 0, setup.world)
        except BaseException as e:  # handed to the caller
            failures.append(e)

    joining = threading.Thread(target=join, name="mixtral_ext NCCL join", daemon=True)
    joining.start()
    while joining.is_alive():
        joining.join(_WATCH_INTERVAL)
        for rank, worker in enumerate(workers, 1):
            if worker.poll() is not None or store.check([f"failed/{rank}"]):
                raise WorkerError(f"rank {rank} ended before it joined the NCCL group")
    if failures:
        raise failures[0]


def follow(store, rank: int) -> None:
    """A worker's life: builds rank `rank`'s slice from the setup in the store, joins the collectives,
    then makes rank 0's calls in order until it closes the engine or goes away."""
    from . import engine

    setup: RankSetup = pickle.loads(store.get("setup"))
    try:
        if setup.nccl_library:  # before the CUDA runtime starts in this process
            os.environ["CUDA_VISIBLE_DEVICES"] = _gpu_of(setup, rank)
        core = engine.build_rank(setup, rank, progress=False)
        store.set(f"ready/{rank}", b"")
        group_id = _wait_for(store, "go")  # the slowest rank may load for minutes
        if group_id is None:
            return
        group = _join(store, core, rank, setup, group_id, [])
        _make_calls(store, core, setup.world)
    except BaseException as e:
        store.set(f"failed/{rank}", pickle.dumps((type(e).__name__, str(e))))
        raise
    del core, group


def _wait_for(store, key: str) -> bytes | None:
    """The value of `key` once rank 0 has set it, however long that takes; None when rank 0's store
    (and so rank 0) is gone."""
    import torch.distributed as dist

    while True:
        try:
            store.wait([key], timedelta(days=1))
            return store.get(key)
        except dist.DistStoreError:  # a day without it: wait on
            continue
        except dist.DistError:
            return None


def _make_calls(store, core, world: int) -> None:
    result = None  # of the last call
    for command in range(sys.maxsize):
        key = f"command/{command}"
        value = _wait_for(store, key)
        if value is None:
            return
        name, args = pickle.loads(value)
        if store.add(f"read/{command}", 1) == world - 1:  # the last worker to read it clears it away
            store.delete_key(key)
            store.delete_key(f"read/{command}")
        if name == "close":
            return
        if name == "expect_handle":
            if args[0] != result:
                raise WorkerError(f"this rank's handle {result} is not rank 0's {args[0]}: the ranks are out of step")
            continue
        result = None
        try:
            result = getattr(core, name)(*args)
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
    rank_0 = os.getppid()

    def exit_without_rank_0() -> None:  # a GPU worker may be waiting in an NCCL kernel for a dead rank 0
        while os.getppid() == rank_0:
            time.sleep(_WATCH_INTERVAL)
        os._exit(1)

    threading.Thread(target=exit_without_rank_0, name="mixtral_ext rank 0 watch", daemon=True).start()
    try:
        follow(dist.TCPStore(host, int(port), is_master=False, timeout=COLLECTIVE_TIMEOUT), int(rank))
    except MixtralError:  # reported to rank 0, which raises it
        sys.exit(1)

