"""Run a function on W fresh processes joined in a process group on this machine (``launch``).

For tests, benchmarks and notebooks: torchrun is the tool for scripts. What can go wrong is
reported rank by rank, so a failure is never a bare "Connection reset by peer":

- start-up: the processes meet through a TCPStore that this process opens on a port the OS picks
  (and keeps: no other program can take it between choosing and binding). A rank that dies before
  every rank has joined (a busy machine can abort one) restarts the whole group, up to
  ``STARTUP_ATTEMPTS`` times; spawning and joining have their own allowance, ``STARTUP_TIMEOUT_S``;
- running: a watchdog kills every rank ``timeout`` seconds after they all joined;
- the end: every rank's fate (returned, raised, died by a signal, exited without a result, killed)
  is in the error; the error raised is the first rank's own exception that is not a broken
  connection, with the rank in its message and its traceback as ``__cause__``.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STARTUP_ATTEMPTS = 3  # a group whose rank dies while joining is started again, this many times
STARTUP_TIMEOUT_S = 180.0  # spawn (import torch), join; on top of launch's timeout
FAILURE_GRACE_S = 5.0  # after a rank fails, how long launch waits for the others to report

# a rank whose peer failed or left sees the broken connection: the peer's fate is the one to report
_COMMUNICATION_ERRORS = getattr(dist, "DistError", ())  # gloo raises plain RuntimeErrors too
_COMMUNICATION_MESSAGES = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _worker(
    rank: int,
    world_size: int,
    port: int,
    backend: str,
    timeout: float,
    results,
    fn: Callable,
    args: tuple,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # one core per process
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        wait = timedelta(seconds=STARTUP_TIMEOUT_S)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, False, timeout=wait)
        dist.init_process_group(
            backend,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
    except Exception as err:  # noqa: BLE001  (reported; launch decides whether to start again)
        results.put((rank, "startup", _failure(err)))
        return
    results.put((rank, "ready", None))
    try:
        value = fn(*args)
        pickle.dumps(value)  # fails here, reported, rather than in the queue's feeder
        results.put((rank, "returned", value))
    except BaseException as err:  # noqa: BLE001  (SystemExit too: no rank ends without a word)
        results.put((rank, "raised", _failure(err)))
    finally:
        dist.destroy_process_group()


def _failure(err: BaseException) -> dict:
    """A worker's exception as plain data: its class (if it pickles), message and traceback."""
    try:
        cls = pickle.dumps(type(err))  # by reference: a class defined inside a function fails
    except Exception:
        cls = None
    communication = isinstance(err, _COMMUNICATION_ERRORS) or any(
        m in str(err) for m in _COMMUNICATION_MESSAGES
    )
    return {
        "cls": cls,
        "name": type(err).__qualname__,
        "message": str(err),
        "traceback": traceback.format_exc(),
        "communication": communication,
    }


class _RemoteTraceback(Exception):
    """A worker's traceback, as text: the ``__cause__`` of the error that ``launch`` raises."""

    def __str__(self) -> str:
        return self.args[0]


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running: killed"
    if code < 0:
        try:
            return f"died by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"died by signal {-code}"
    return f"exited with status {code}"


class _Group:
    """One start of W processes, and what each has reported."""

    def __init__(self, fn: Callable, world_size: int, args: tuple, timeout: float, backend: str):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        # the store holds its port from here on: no race for a free port
        self.store = dist.TCPStore(
            "127.0.0.1",
            0,
            world_size + 1,
            True,
            timeout=timedelta(seconds=STARTUP_TIMEOUT_S),
            wait_for_workers=False,
        )
        self.results = ctx.SimpleQueue()
        worker_args = (world_size, self.store.port, backend, timeout, self.results, fn, args)
        self.procs = [
            ctx.Process(target=_worker, args=(r, *worker_args)) for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self.ready: set[int] = set()
        self.returned: dict[int, object] = {}
        self.failures: dict[int, dict] = {}  # in order of arrival
        self.startup: dict[int, dict] = {}

    def receive(self) -> None:
        while not self.results.empty():
            rank, kind, value = self.results.get()
            if kind == "ready":
                self.ready.add(rank)
            elif kind == "returned":
                self.returned[rank] = value
            elif kind == "startup":
                self.startup[rank] = value
            else:
                self.failures[rank] = value

    def reported(self, rank: int) -> bool:
        return rank in self.returned or rank in self.failures or rank in self.startup

    def dead_before_joining(self) -> list[int]:
        """Ranks that failed or died before every rank joined: the group never started."""
        if len(self.ready) == self.world_size:
            return []
        died = [r for r, p in enumerate(self.procs) if p.exitcode is not None]
        return sorted(set(self.startup) | {r for r in died if r not in self.ready})

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)

    def fate(self, rank: int) -> str:
        if rank in self.returned:
            return "returned"
        for failures in (self.failures, self.startup):
            if rank in failures:
                f = failures[rank]
                when = "at start-up " if failures is self.startup else ""
                return f"raised {when}{f['name']}: {f['message'].splitlines()[0][:200]}"
        code = self.procs[rank].exitcode
        if code == 0:
            return "exited with status 0 without returning a result"
        return _exit_text(code) + ("" if rank in self.ready else " before joining the group")

    def fates(self) -> str:
        return "; ".join(f"rank {r} {self.fate(r)}" for r in range(self.world_size))


def _run(group: _Group, timeout: float) -> None:
    """Wait until every rank has ended, one failed (and the grace passed), or time is up."""
    start = time.monotonic()
    joined_at = None
    failed_at = None
    while True:
        group.receive()
        if group.dead_before_joining():
            return
        if joined_at is None and len(group.ready) == group.world_size:
            joined_at = time.monotonic()
        if all(p.exitcode is not None for p in group.procs):
            group.receive()
            return
        group.receive()  # what a rank sent before it ended is in the pipe by now
        died = [r for r, p in enumerate(group.procs) if p.exitcode not in (None, 0)]
        # a rank that returned its result and then died tearing down is no failure
        if failed_at is None and (group.failures or set(died) - set(group.returned)):
            failed_at = time.monotonic()  # the others may wait on the failed one
        now = time.monotonic()
        if failed_at is not None and now - failed_at > FAILURE_GRACE_S:
            return
        if joined_at is None and now - start > STARTUP_TIMEOUT_S:
            raise TimeoutError(
                f"{group.world_size} workers did not all join within {STARTUP_TIMEOUT_S:.0f} s: "
                f"killed ({group.fates()})"
            )
        if joined_at is not None and now - joined_at > timeout:
            raise TimeoutError(
                f"{group.world_size} workers still running after {timeout:.0f} s: killed "
                f"({group.fates()})"
            )
        time.sleep(0.05)


def _rank_error(group: _Group) -> Exception:
    """The first failure that is not a broken connection (else the first), as an exception of
    its own class whose message names the rank; every rank's fate follows."""
    fates = group.fates()
    if not group.failures:  # no Python exception: a rank died, or ended without a result
        return RuntimeError(f"expert-parallel workers failed: {fates}")
    rank, failure = next(
        ((r, f) for r, f in group.failures.items() if not f["communication"]),
        next(iter(group.failures.items())),
    )
    hint = ""
    if failure["communication"] and group.returned:
        hint = (
            " (a peer had returned: every rank must run the same collectives, e.g. forward and "
            "backward, the same number of times)"
        )
    message = f"rank {rank} of {group.world_size} failed: {failure['message']}{hint} [{fates}]"
    try:
        err = pickle.loads(failure["cls"])(message)
    except Exception:  # no class, or one that is not built from a message
        err = None
    if not isinstance(err, Exception):
        err = RuntimeError(
            f"rank {rank} of {group.world_size} raised {failure['name']}: {failure['message']}"
            f"{hint} [{fates}]"
        )
    err.__cause__ = _RemoteTraceback(f"rank {rank}:\n{failure['traceback']}")
    return err


def launch(
    fn: Callable,
    world_size: int = 2,
    args: tuple = (),
    timeout: float = 60.0,
    backend: str = "gloo",
) -> list:
    """Run ``fn(*args)`` in ``world_size`` fresh processes joined on 127.0.0.1; return each rank's
    result. A watchdog kills them all ``timeout`` seconds after they joined, so a hung collective
    fails instead of blocking. If a worker raises, its exception is raised here: the same class,
    the message prefixed with the rank and followed by every rank's fate, the worker's traceback
    as ``__cause__`` (not the broken connections that the other ranks then see). A rank that
    dies or ends without a result is a RuntimeError naming it: never a None result."""
    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        group = _Group(fn, world_size, args, timeout, backend)
        try:
            _run(group, timeout)
        finally:
            group.kill()
            group.receive()
        dead = group.dead_before_joining()
        if not dead:
            break
        if attempt < STARTUP_ATTEMPTS:
            warnings.warn(
                f"launch: start-up failed ({group.fates()}); starting the {world_size} "
                f"processes again ({attempt + 1} of {STARTUP_ATTEMPTS})",
                RuntimeWarning,
                stacklevel=2,
            )
    if dead:
        startup = [group.startup[r] for r in dead if r in group.startup]
        if startup and not any(p.exitcode and p.exitcode < 0 for p in group.procs):
            group.failures.update({r: group.startup[r] for r in dead if r in group.startup})
            raise _rank_error(group)
        raise RuntimeError(
            f"the {world_size} processes failed to start {STARTUP_ATTEMPTS} times: {group.fates()}"
        )
    if group.failures or len(group.returned) < world_size:
        raise _rank_error(group)
    return [group.returned[r] for r in range(world_size)]
