"""The processes of one run under ``torchrun`` (or ``srun`` with the same variables): rank and world from the
environment, the process group for data-parallel training, and a coordination channel for everything else --
barriers with an explicit timeout, small results passed to rank 0, and one rank's failure stopping the others.

Coordination goes through the c10d TCP store that torchrun already runs (``MASTER_ADDR:MASTER_PORT``; without
torchrun rank 0 hosts it), not through collectives, for three reasons that hold for gloo and NCCL alike:

- an NCCL ``barrier`` has no timeout of its own (the process group's, 10 minutes by default, after which NCCL
  aborts), so rank 0 preprocessing a large data set while the others wait outlasts it; a store barrier waits as long
  as its own timeout, which :func:`barrier_timeout_s` scales with the data;
- a collective cannot be interrupted, a store poll can: every wait checks, several times a second, whether another
  rank published a failure, and stops with that rank's message;
- a rank that was killed (``kill -9``, out of memory) publishes nothing, but it stops beating: a rank whose
  heartbeat counter has not moved for ``dead_after_s`` while the others wait for it is reported as gone.

A watchdog thread beats the heartbeat and, while the main thread works (trains a fold), watches for a published
failure; it then interrupts the main thread (``KeyboardInterrupt``, turned into :class:`PeerFailure` by
:meth:`Coordinator.guard`), and ends the process if the main thread is stuck in native code.
"""

from __future__ import annotations

import _thread
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from medseg.errors import MedsegError

__all__ = ["PeerFailure", "BarrierTimeout", "Coordinator", "coordinator", "env_world", "init_process_group",
           "barrier_timeout_s", "data_bytes", "folds_of_rank", "RunRanks"]

logger = logging.getLogger(__name__)

#: Seconds a waiting rank tolerates a peer whose heartbeat does not move before it calls that peer gone.
DEAD_AFTER_S = 120.0
#: Base of every barrier timeout (process start, imports, file-system latency), seconds.
BARRIER_BASE_S = 300.0


class PeerFailure(MedsegError):
    """Another rank of the run failed (its one-line message), died, or the run's coordination store is gone."""


class BarrierTimeout(MedsegError):
    """Ranks did not reach a barrier within its timeout; the message names them and the timeout."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a :meth:`Coordinator.guard` ran (the CLI reports it as interrupted)."""

    def __str__(self) -> str:
        return "terminated (SIGTERM)"


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def env_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment torchrun sets (``(0, 1)`` outside it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_process_group(store: Any = None, *, timeout_s: float | None = None) -> tuple[int, int]:
    """Join the torchrun process group (NCCL on CUDA, gloo on a CPU) unless it is joined or the world is one.

    Args:
        store: a c10d store to rendezvous on (the :class:`Coordinator`'s); default: ``env://`` (torchrun's).
        timeout_s: the process group's collective timeout (default torch's).

    Returns:
        ``(rank, world size)``.
    """
    rank, world = env_world()
    if world <= 1:
        return 0, 1
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        kw: dict[str, Any] = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        if store is not None:
            kw.update(store=dist.PrefixStore("default_pg", store), rank=rank, world_size=world)
        dist.init_process_group(backend=backend, **kw)
    return dist.get_rank(), dist.get_world_size()


def folds_of_rank(folds: Sequence[int], rank: int, world: int) -> list[int]:
    """The folds rank ``rank`` trains alone: ``folds[rank::world]`` (one each when there are as many as ranks)."""
    return list(folds)[rank::world]


def data_bytes(paths: Any) -> int:
    """Bytes on disk of files and folders (a DICOM series folder counts its files); missing paths count 0."""
    total = 0
    for p in paths:
        p = str(p)
        if os.path.isdir(p):
            for root, _, files in os.walk(p):
                total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        elif os.path.isfile(p):
            total += os.path.getsize(p)
    return total


def barrier_timeout_s(n_bytes: float, seconds_per_mb: float, *, base_s: float = BARRIER_BASE_S,
                      extra_s: float = 0.0) -> float:
    """A barrier's timeout from the data the slowest rank handles before it: ``base + bytes * rate + extra``.

    Args:
        n_bytes: bytes of input the slowest rank reads before the barrier (its share of the cases).
        seconds_per_mb: a slow worst case for the work per MB of input (e.g. 2 s/MB for preprocessing, far
            below what a CPU core does, so that a slow shared file system does not trip it).
        base_s: fixed part.
        extra_s: known time on top (e.g. the training budgets of the folds in between).
    """
    return float(base_s + seconds_per_mb * n_bytes / 2**20 + extra_s)


class Coordinator:
    """Barriers, small messages and failure propagation between the ranks of one run, over a c10d store.

    Args:
        store: the store of the main thread; ``watch_store``: a second client for the watchdog thread.
        rank, world: this process and the number of processes.
        prefix: key prefix unique to this run and restart.
        poll_s: how often waits look at the store.
        dead_after_s: heartbeat silence after which a waited-for rank is reported gone.
        ack_s: how long a failing rank waits for the others to take note of its failure before it exits.
    """

    def __init__(self, store: Any, watch_store: Any, rank: int, world: int, *, prefix: str = "medseg",
                 poll_s: float = 0.2, dead_after_s: float = DEAD_AFTER_S, ack_s: float = 15.0,
                 where: str = ""):
        self.store, self.rank, self.world, self.prefix = store, rank, world, prefix
        self.poll_s, self.dead_after_s, self.ack_s = poll_s, dead_after_s, ack_s
        self.where = where
        self._watch_store = watch_store
        self._failure: str | None = None  # a peer's failure noticed by the watchdog
        self._failed = False  # this rank published its failure
        self._interrupt_handled = threading.Event()  # guard turned the watchdog's interruption into PeerFailure
        self._guarding = 0
        self._stop = threading.Event()
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (last counter seen, when it last moved)
        self.hosting = False  # this process runs the store's server (see close)
        self.address: Any = None  # (host, port, timeout) of the store
        self._seq = 0  # barriers are numbered: every rank passes the same barriers in the same order
        self._thread = threading.Thread(target=self._watch, name="medseg-watchdog", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_env(cls, *, connect_timeout_s: float = 600.0, **kwargs: Any) -> Coordinator | None:
        """The coordinator of a torchrun/srun process (``None`` when ``WORLD_SIZE`` is 1).

        Connects to the store at ``MASTER_ADDR:MASTER_PORT``: torchrun's agent store when
        ``TORCHELASTIC_USE_AGENT_STORE`` is ``True`` (torchrun with the c10d rendezvous), else the one rank 0 hosts
        (as ``env://`` does). Keys are prefixed by ``TORCHELASTIC_RUN_ID`` and the restart count.

        Raises:
            PeerFailure: the store cannot be reached within ``connect_timeout_s``.
        """
        rank, world = env_world()
        if world <= 1:
            return None
        import torch.distributed as dist

        host = os.environ.get("MASTER_ADDR", "localhost")
        port = int(os.environ.get("MASTER_PORT", "29500"))
        host_store = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        timeout = timedelta(seconds=connect_timeout_s)
        try:
            store = dist.TCPStore(host, port, world_size=None, is_master=host_store, timeout=timeout,
                                  wait_for_workers=False, multi_tenant=host_store)
            watch = dist.TCPStore(host, port, world_size=None, is_master=False, timeout=timeout)
        except (RuntimeError, OSError) as exc:
            raise PeerFailure(f"rank {rank}: cannot reach the run's coordination store at {host}:{port} ({exc}); "
                              "check MASTER_ADDR/MASTER_PORT or torchrun's --rdzv-endpoint") from None
        prefix = (f"medseg/{os.environ.get('TORCHELASTIC_RUN_ID', 'none')}/"
                  f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
        coord = cls(store, watch, rank, world, prefix=prefix, where=f"{host}:{port}", **kwargs)
        coord.hosting = host_store
        coord.address = (host, port, timeout)
        return coord

    def new_client(self) -> Any:
        """Another client of the same store (for the process group, which must not share this one's socket)."""
        import torch.distributed as dist

        host, port, timeout = self.address
        return dist.TCPStore(host, port, world_size=None, is_master=False, timeout=timeout)

    def close(self, *, linger_s: float = 60.0) -> None:
        """Stop the watchdog and leave. The rank that hosts the store (no torchrun agent store) waits up to
        ``linger_s`` for the others to leave first, so that none of them loses the store mid-wait."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5 * self.poll_s + 1)
        try:
            self.store.set(self._key("left", self.rank), "1")
            deadline = time.monotonic() + linger_s
            others = [r for r in range(self.world) if r != self.rank] if self.hosting else []
            while others and time.monotonic() < deadline:
                others = [r for r in others if not self.store.check([self._key("left", r)])]
                time.sleep(self.poll_s / 2)
        except (RuntimeError, OSError):
            pass

    # ----------------------------------------------------------------------------------------------- store I/O
    def _key(self, *parts: object) -> str:
        return "/".join([self.prefix, *map(str, parts)])

    def _io(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except (RuntimeError, OSError) as exc:  # DistStoreError is a RuntimeError
            raise PeerFailure(f"rank {self.rank}: lost the run's coordination store {self.where} ({exc}); "
                              "the rank or node hosting it stopped -- see that node's log") from None

    def _has(self, key: str, store: Any = None) -> bool:
        return bool(self._io((store or self.store).check, [key]))

    def put(self, name: str, value: Any) -> None:
        """Publish a JSON-serialisable ``value`` under ``name`` (read with :meth:`get` on any rank)."""
        self._io(self.store.set, self._key("data", name), json.dumps(value))

    def get(self, name: str) -> Any:
        """A value published with :meth:`put` (which must have happened before a barrier both passed)."""
        key = self._key("data", name)
        if not self._has(key):
            raise KeyError(name)
        return json.loads(self._io(self.store.get, key))

    # ----------------------------------------------------------------------------------------------- failures
    def _published_failure(self, store: Any = None) -> str | None:
        key = self._key("error")
        if not self._has(key, store):
            return None
        value = json.loads(self._io((store or self.store).get, key))
        return str(value["message"])

    def fail(self, exc: BaseException) -> None:
        """Publish this rank's failure (first failure wins) and give the others ``ack_s`` to take note of it."""
        if self._failed:
            return  # an inner guard published it already
        self._failed = True
        text = " ".join(str(exc).split()) or type(exc).__name__
        if not isinstance(exc, (MedsegError, KeyboardInterrupt)):
            text = f"{type(exc).__name__}: {text}"
        message = f"rank {self.rank} ({socket.gethostname()}) failed: {text}"
        try:
            first = self.store.compare_set(self._key("error"), "", json.dumps({"rank": self.rank,
                                                                              "message": message}))
        except (RuntimeError, OSError):
            return  # the store is gone: nothing to tell anyone
        if json.loads(first).get("rank") != self.rank:
            return  # another rank failed first; this is a consequence
        logger.error("%s; stopping the other ranks", message)
        deadline = time.monotonic() + self.ack_s
        others = [r for r in range(self.world) if r != self.rank]
        while others and time.monotonic() < deadline:
            try:
                others = [r for r in others if not self.store.check([self._key("ack", r)])]
            except (RuntimeError, OSError):
                return
            time.sleep(self.poll_s / 2)

    def _acknowledge(self, message: str, store: Any = None) -> None:
        logger.info("rank %d stopping: %s", self.rank, message)
        try:
            (store or self.store).set(self._key("ack", self.rank), "1")
        except (RuntimeError, OSError):
            pass

    def check(self) -> None:
        """Raise :class:`PeerFailure` when another rank has published a failure."""
        message = self._failure or self._published_failure()
        if message is not None:
            self._acknowledge(message)
            raise PeerFailure(message)

    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run this rank's work: a failure is published to the others (then re-raised); a peer's failure noticed
        by the watchdog while the work runs interrupts it and surfaces as :class:`PeerFailure`.

        In the main thread, SIGTERM (``scancel``, a preemption, torchrun stopping a node's processes) raises
        :class:`Terminated` while the work runs, so that this rank too publishes why it stopped.
        """
        import signal

        outer = self._guarding == 0 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _raise_terminated) if outer else None
        self._guarding += 1
        try:
            yield
        except PeerFailure:
            raise
        except BaseException as exc:
            # a peer that failed first is the cause: the watchdog's interruption, or a collective that broke
            # because that peer left (gloo: "connection closed by peer"), is reported as that peer's failure
            message = self._failure or self._quiet_failure()
            if message is not None and not message.startswith(f"rank {self.rank} "):
                self._interrupt_handled.set()
                if not isinstance(exc, KeyboardInterrupt):
                    logger.info("rank %d: %s: %s (after the failure of another rank)", self.rank,
                                type(exc).__name__, exc)
                self._acknowledge(message)
                raise PeerFailure(message) from None
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Terminated):
                exc = KeyboardInterrupt("interrupted (SIGINT)")
            self.fail(exc)
            raise
        finally:
            self._guarding -= 1
            if outer:
                signal.signal(signal.SIGTERM, previous)

    def _quiet_failure(self) -> str | None:
        try:
            return self._published_failure()
        except PeerFailure:
            return None

    # ----------------------------------------------------------------------------------------------- barriers
    def barrier(self, name: str, timeout_s: float | None) -> None:
        """Wait until every rank reached barrier ``name``.

        Args:
            name: unique per barrier of the run.
            timeout_s: seconds to wait (``None``: as long as the missing ranks' heartbeats move).

        Raises:
            PeerFailure: a rank published a failure, or a missing rank stopped beating.
            BarrierTimeout: not every rank arrived within ``timeout_s``.
        """
        self._seq += 1
        name = f"{self._seq}-{name}"
        self._io(self.store.set, self._key("barrier", name, self.rank), "1")
        count = self._io(self.store.add, self._key("barrier", name, "n"), 1)
        t0 = time.monotonic()
        self._beats.clear()
        if count < self.world:
            for r in range(self.world):
                self._silent_for(r)  # heartbeats are judged from here on
        while count < self.world:
            self.check()
            waited = time.monotonic() - t0
            if timeout_s is not None and waited > timeout_s:
                missing = self._missing(name)
                raise BarrierTimeout(f"rank {self.rank}: ranks {missing} did not reach barrier {name} within the "
                                     f"barrier's {timeout_s:.0f} s (scaled with the data); a rank is stuck "
                                     "or much slower than the rest -- see its log")
            if waited > self.dead_after_s:
                missing = self._missing(name)
                gone = [r for r in missing if self._silent_for(r) > self.dead_after_s]
                if gone:
                    message = (f"rank {gone[0]} stopped (no heartbeat for {self.dead_after_s:.0f} s while the "
                               f"others waited at barrier {name}; killed or out of memory? see its log)")
                    self._acknowledge(message)
                    raise PeerFailure(message)
            time.sleep(self.poll_s)
            count = self._io(self.store.add, self._key("barrier", name, "n"), 0)

    def _missing(self, name: str) -> list[int]:
        return [r for r in range(self.world) if not self._has(self._key("barrier", name, r))]

    def _silent_for(self, rank: int) -> float:
        now = time.monotonic()
        key = self._key("beat", rank)
        value = int(self._io(self.store.add, key, 0))
        last = self._beats.get(rank)
        if last is None or last[0] != value:
            self._beats[rank] = (value, now)
            return 0.0
        return now - last[1]

    # ----------------------------------------------------------------------------------------------- watchdog
    def _watch(self) -> None:
        store = self._watch_store
        beat = self._key("beat", self.rank)
        while not self._stop.wait(self.poll_s):
            try:
                store.add(beat, 1)
                message = self._published_failure(store) if self._failure is None else None
            except (MedsegError, RuntimeError, OSError) as exc:
                # the store is gone with the node that hosted it: stop the work rather than train on for hours
                message = str(exc) if isinstance(exc, PeerFailure) else (
                    f"rank {self.rank}: lost the run's coordination store {self.where} ({exc}); the node hosting "
                    "it stopped -- see that node's log")
                if self._stop.is_set() or not self._guarding:
                    return
                self._failure = message
                self._interrupt(message, None)
                return
            if message is None or message.startswith(f"rank {self.rank} "):
                continue
            self._failure = message
            if self._guarding:
                self._interrupt(message, store)
                return

    def _interrupt(self, message: str, store: Any) -> None:
        """Interrupt the main thread's work with ``message``; end the process if it is stuck in native code."""
        if store is not None:
            self._acknowledge(message, store)
        _thread.interrupt_main()
        if not self._interrupt_handled.wait(max(30.0, 10 * self.poll_s)) and not self._stop.is_set():
            logger.error("rank %d: %s; the main thread (in native code) did not stop: exiting", self.rank, message)
            os._exit(1)


_CURRENT: list[Coordinator] = []


def coordinator() -> Coordinator | None:
    """This process's :class:`Coordinator` (made on the first call, closed at exit); ``None`` outside torchrun."""
    if not _CURRENT:
        coord = Coordinator.from_env()
        if coord is None:
            return None
        import atexit

        atexit.register(coord.close)
        _CURRENT.append(coord)
    return _CURRENT[0]


class RunRanks:
    """What :func:`medseg.training.crossval.run_crossval` (and ``medseg train``'s data preparation,
    :meth:`prepare`) does differently on the ranks of a torchrun job.

    Rank 0 plans and writes the run record while the others wait; every rank preprocesses its share of the cases;
    folds go one per rank (``folds[rank::world]``), or to all ranks together with ``ddp``; each rank predicts its
    folds' validation cases; rank 0 gathers the training results, writes the model record, scores and summarises.
    Each wait is a :meth:`Coordinator.barrier` whose timeout scales with the bytes the slowest rank handles first.
    """

    def __init__(self, coord: Coordinator):
        self.coord, self.rank, self.world = coord, coord.rank, coord.world
        self._bytes: dict[str, int] = {}  # case id -> bytes of its files
        self._ddp = False

    def prepare(self, pipeline: Any, device: str) -> Any:
        from medseg.data.loader import preprocess_dataset
        from medseg.training.fold import cache_root, prepare_run

        c = self.coord
        run = prepare_run(pipeline, device=device, write=True, preprocess=False) if self.rank == 0 else None
        # rank 0 may fingerprint every case (no plan yet): the timeout scales with the whole data set
        c.barrier("plan", barrier_timeout_s(data_bytes([pipeline.dataset]), 1.0))
        if run is None:
            run = prepare_run(pipeline, device=device, write=False, preprocess=False)
        cases = list(run.manifest.cases)
        self._bytes = {k.case_id: data_bytes([*k.images, *([k.label] if k.label else [])]) for k in cases}
        shares = [sum(self._bytes[k.case_id] for k in cases[i::self.world]) for i in range(self.world)]
        preprocess_dataset(run.manifest, run.plan, run.pipeline.configuration, cache_root(run.pipeline),
                           shard=(self.rank, self.world))
        c.barrier("cache", barrier_timeout_s(max(shares), 2.0))
        return run

    def start_ddp(self) -> None:
        init_process_group(store=self.coord.new_client())
        self._ddp = True

    def my_folds(self, folds: list[int], ddp: bool) -> list[int]:
        if ddp:
            return list(folds)
        mine = folds_of_rank(folds, self.rank, self.world)
        if not mine:
            logger.warning("rank %d of %d has no fold to train (%d folds); use --ddp to train each fold with "
                           "all ranks", self.rank, self.world, len(folds))
        else:
            logger.info("rank %d of %d trains folds %s", self.rank, self.world, mine)
        return mine

    def oof_folds(self, folds: list[int]) -> list[int]:
        return folds_of_rank(folds, self.rank, self.world)

    def _val_bytes(self, run: Any, folds: list[int]) -> int:
        return sum(self._bytes.get(cid, 0) for f in folds for cid in run.splits[f]["val"])

    def after_training(self, run: Any, folds: list[int],
                       results: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
        from medseg.training.fold import update_model_record

        c = self.coord
        for f, entry in results.items():
            c.put(f"{run.run_dir}:training:{f}", entry)
        budget = run.pipeline.train.max_minutes
        per_rank = len(folds) if self._ddp else len(folds_of_rank(folds, 0, self.world))
        # with a time budget a fold's length is known (1.5x for validation and checkpoints); without one, the
        # ranks wait for each other as long as their heartbeats move
        c.barrier("trained", None if not budget else barrier_timeout_s(0, 0, extra_s=90.0 * budget * per_rank))
        if self.rank == 0:
            update_model_record(run)
        c.barrier("record", BARRIER_BASE_S)
        if self.rank != 0:
            return {}
        training = {}
        for f in folds:
            try:
                training[f] = c.get(f"{run.run_dir}:training:{f}")
            except KeyError:  # reused, not trained in this run
                pass
        return training

    def after_predictions(self, run: Any, folds: list[int]) -> None:
        slowest = max(self._val_bytes(run, folds_of_rank(folds, r, self.world)) for r in range(self.world))
        self.coord.barrier("predicted", barrier_timeout_s(slowest, 5.0))

    def finish(self, run: Any, summary: dict[str, Any] | None) -> dict[str, Any]:
        c = self.coord
        if self.rank == 0:
            c.put(f"{run.run_dir}:summary", summary)
        c.barrier("done", barrier_timeout_s(self._val_bytes(run, list(range(len(run.splits)))), 5.0))
        return summary if summary is not None else c.get(f"{run.run_dir}:summary")
