"""Where an experiment's trials run: in this process, in a local process pool, or on Ray (local or a cluster).

Every executor keeps its workers for the whole experiment (started on first use, stopped by ``close``), so the
cost of starting a worker and giving it the data is paid once, not once per batch of trials. Workers get the
experiment's splits once: the process pool with its initialiser, Ray through its object store, from where every
actor on every node reads them (numpy arrays without a copy on the same node). Results come back as trials finish,
so each is saved at once and an interrupted run loses at most the running ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import numba
import torch
from threadpoolctl import threadpool_limits

from recforge.core.device import DEVICE_ENV, torch_threads
from recforge.core.gpu_environment import CUBLAS_WORKSPACE_ENV
from recforge.core.threads import resolve_threads
from recforge.data import split as S
from recforge.errors import DataError, UnknownNameError
from recforge.experiments.trials import Trial, TrialResult, run_trial

log = logging.getLogger(__name__)

BACKENDS = ("auto", "serial", "process", "ray")


def ray_available() -> bool:
    """True when Ray can be imported."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, workers: int, ray_address: str | None) -> str:
    """The backend to use: ``auto`` means Ray when it is installed (or an address is given), the process pool
    when it is not, and this process when one worker is asked for; a cluster address forces Ray."""
    name = (backend or "auto").strip().lower()
    if name not in BACKENDS:
        raise UnknownNameError(f"unknown backend {backend!r}; available backends: {', '.join(BACKENDS)}")
    if ray_address and name not in ("auto", "ray"):
        raise DataError(f"--ray-address needs the ray backend, not {name!r}")
    if name == "ray" or (name == "auto" and ray_address):
        if not ray_available():
            raise DataError("the ray backend needs Ray: pip install 'recforge[ray]' (or pip install ray)")
        return "ray"
    if name == "auto":
        if workers <= 1:
            return "serial"
        return "ray" if ray_available() else "process"
    return name


def within_cores(workers: int, threads: int) -> int:
    """``workers`` of ``threads`` threads each on this machine, capped at what its cores hold (those this process
    may use), with one warning when that cuts them: every worker is a process with its own copy of the data (a
    thousand of them would exhaust the memory, not speed anything up), and more of them than cores would only
    take turns on the cores."""
    cores = resolve_threads(None)
    workers = max(1, workers)
    cap = max(1, cores // max(1, threads))
    if workers > cap:
        log.warning("%d workers of %d thread(s) each asked for, but this machine has %d cores: starting %d", workers,
                    threads, cores, cap)
        return cap
    return workers


def limit_threads(threads: int = 1) -> None:
    """Cap BLAS, numba and torch threads in a worker: the workers are the parallelism, and N workers each
    starting one thread per core would oversubscribe the machine."""
    threadpool_limits(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    torch.set_num_threads(threads)


class SerialExecutor:
    """Runs trials one after another in this process (all cores to each trial's BLAS/numba/torch)."""

    name = "serial"
    workers = 1

    def __init__(self, splits: list[S.Split], threads: int | None = None) -> None:
        self._splits = splits
        self._threads = threads

    def map(self, tasks: list[Trial]) -> Iterator[TrialResult]:
        """Results in task order, each as soon as it is computed."""
        if not self._threads:
            for task in tasks:
                yield run_trial(task, self._splits, None)
            return
        for task in tasks:  # the cap also reaches BLAS calls of models without a num_threads parameter
            with threadpool_limits(self._threads), torch_threads(self._threads):
                result = run_trial(task, self._splits, self._threads)
            yield result

    def close(self) -> None:
        """Nothing to stop."""


_WORKER: dict[str, Any] = {}


def _init_process_worker(splits: list[S.Split], threads: int) -> None:
    limit_threads(threads)
    _WORKER["splits"] = splits
    _WORKER["threads"] = threads


def _run_in_process_worker(task: Trial) -> TrialResult:
    return run_trial(task, _WORKER["splits"], _WORKER["threads"])


class ProcessExecutor:
    """A local pool of ``workers`` spawned processes, started once per experiment, one thread each; every worker
    receives the splits once, when it starts. Several threads may ``map`` at once (side-by-side searches): their
    trials share the pool's queue."""

    name = "process"

    def __init__(self, splits: list[S.Split], workers: int, threads_per_worker: int = 1) -> None:
        self.workers = workers
        self._splits = splits
        self._threads = threads_per_worker
        self._pool: ProcessPoolExecutor | None = None
        self._starting = threading.Lock()
        self._closed = False

    def map(self, tasks: list[Trial]) -> Iterator[TrialResult]:
        """Results in completion order."""
        with self._starting:
            if self._closed:
                raise RuntimeError("the process pool of this run was stopped")
            if self._pool is None:
                # spawn, not fork: forking a process whose OpenMP/BLAS threads are running can deadlock the child
                self._pool = ProcessPoolExecutor(
                    max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_process_worker, initargs=(self._splits, self._threads))
            pool = self._pool
        pending: set[Future[TrialResult]] = {pool.submit(_run_in_process_worker, t) for t in tasks}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()

    def close(self) -> None:
        """Stop the pool's processes (trials not started are dropped); a closed pool takes no more trials."""
        with self._starting:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(cancel_futures=True)


class _RayTrialWorker:
    """A Ray actor holding the splits; its ``run`` fits and scores one trial."""

    def __init__(self, splits: list[S.Split], threads: int) -> None:
        limit_threads(threads)
        self._splits = splits
        self._threads = threads

    def run(self, task: Trial) -> TrialResult:
        """Fit and score one trial."""
        return run_trial(task, self._splits, self._threads)


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when a Ray cluster address cannot be reached: ``ray.init`` itself keeps
    retrying an unreachable head for minutes. ``auto`` (the cluster of this machine) is left to Ray."""
    if address == "auto":
        return
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        raise DataError(f"Ray address {address!r} is not 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise DataError(f"cannot reach the Ray cluster at {address!r} ({exc}); is 'ray start --head' running "
                        "there, and is the port open?") from None


class RayExecutor:
    """Trials on Ray actors: a local Ray started for this run by default, or the cluster at ``address``
    (``"auto"`` = the one this machine belongs to, ``ray://host:10001`` = a remote one). ``workers`` actors of
    ``threads_per_worker`` CPUs each; without ``workers`` on a cluster, one actor per CPU of the cluster."""

    name = "ray"

    def __init__(self, splits: list[S.Split], workers: int | None, address: str | None = None,
                 threads_per_worker: int = 1) -> None:
        import ray

        self._ray = ray
        self._started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING}
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                check_ray_address(address)
                kwargs["address"] = address
            else:  # a private local instance sized to the workers asked for
                workers = within_cores(workers or resolve_threads(None), threads_per_worker)
                kwargs["num_cpus"] = workers * threads_per_worker
                # Ray turns token auth on for new local instances (the safe default, kept) and warns that it did
                # on every start; for an instance private to this run that warning is only noise
                logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            try:
                ray.init(**kwargs)
            except ConnectionError as exc:  # e.g. address "auto" with no cluster on this machine
                raise DataError(f"could not connect to a Ray cluster at {address!r}: {exc}") from None
            self._started = True
        if not workers:  # a cluster's size is its own (it may grow): asked for, workers are left to its scheduler
            workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // threads_per_worker)
        self.workers = workers
        # Ray hid every GPU from an actor that asks for none (CUDA_VISIBLE_DEVICES="", its default until April 2026,
        # ray-project/ray#62492): trial workers see their machine's GPUs as a process pool's do; the device choice
        # and cuBLAS's setting travel with them, as a cluster's workers do not inherit this process's environment
        env = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
        env.update({key: os.environ[key] for key in (DEVICE_ENV, CUBLAS_WORKSPACE_ENV) if key in os.environ})
        actor = ray.remote(num_cpus=threads_per_worker, runtime_env={"env_vars": env})(_RayTrialWorker)
        ref = ray.put(splits)
        self._actors = [actor.remote(ref, threads_per_worker) for _ in range(workers)]
        # the actors without a trial, shared by every thread that maps (side-by-side searches)
        self._idle = list(self._actors)
        self._freed = threading.Condition()
        self._closed = False
        log.info("ray: %d trial workers on %s", workers, ray.get_runtime_context().gcs_address)

    def map(self, tasks: list[Trial]) -> Iterator[TrialResult]:
        """Results in completion order; every actor has at most one trial in flight, the next goes to whichever
        frees, whichever thread's trials it ran."""
        ray = self._ray
        queue = list(reversed(tasks))
        running: dict[Any, Any] = {}
        try:
            while queue or running:
                with self._freed:
                    while queue and not running and not self._idle and not self._closed:
                        self._freed.wait()
                    if self._closed:
                        raise RuntimeError("the Ray workers of this run were stopped")
                    while queue and self._idle:
                        actor = self._idle.pop()
                        running[actor.run.remote(queue.pop())] = actor
                done, _ = ray.wait(list(running), num_returns=1)
                for ref in done:
                    self._release([running.pop(ref)])
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        # the trial's own error, as the other backends raise it: Ray's wrapper puts the remote
                        # traceback in the message, and a one-line error (a refused parameter) would lose its line
                        cause = getattr(exc, "cause", None)
                        raise (cause if isinstance(cause, Exception) else exc) from exc
                    yield result
        finally:  # abandoned mid-way: the actors still running a trial of this call queue the next ones behind it
            self._release(list(running.values()))

    def _release(self, actors: list[Any]) -> None:
        with self._freed:
            self._idle.extend(actors)
            self._freed.notify_all()

    def close(self) -> None:
        """Stop the actors (and the local Ray instance this executor started); the running trials are abandoned
        and a closed executor takes no more."""
        with self._freed:
            self._closed = True
            actors, self._actors, self._idle = self._actors, [], []
            self._freed.notify_all()
        for actor in actors:
            self._ray.kill(actor)
        if self._started:
            self._started = False
            self._ray.shutdown()


def make_executor(backend: str, workers: int, splits: list[S.Split], ray_address: str | None = None,
                  threads_per_worker: int | None = None) -> SerialExecutor | ProcessExecutor | RayExecutor:
    """The executor for ``backend`` (see :func:`resolve_backend`). ``threads_per_worker``: BLAS/numba/torch
    threads of each trial (default: all cores in this process, 1 per pool or Ray worker)."""
    name = resolve_backend(backend, workers, ray_address)
    if name == "serial":
        return SerialExecutor(splits, threads_per_worker)
    threads = threads_per_worker or 1
    if name == "process":
        return ProcessExecutor(splits, within_cores(workers, threads), threads)
    try:
        return RayExecutor(splits, workers if workers > 1 or not ray_address else None, ray_address, threads)
    except Exception as exc:  # Ray start-up failures come in many types
        if backend != "auto" or ray_address:
            raise
        log.warning("could not start a local Ray (%s); running the trials in a process pool instead", exc)
        return ProcessExecutor(splits, within_cores(workers, threads), threads)
