"""Run offline work (encoding, augmentation) as Ray actors over shards of the corpus.

``WorkerPool`` is the one place that knows about Ray: the same worker class runs in-process
(no ``--ray-address``) or as N Ray actors, each of which loads its model once and then handles
many shards. Results stream back as shards finish, with a bounded number in flight, so the
driver can commit them (the adapter store has a single writer) and the corpus never has to fit
in memory.

Addresses: a cluster address (``host:port`` or ``ray://host:port``), ``auto`` (the cluster this
machine belongs to, e.g. under ``ray job submit``), or ``local`` (start a cluster in-process with
``ray.init(num_cpus=...)``). ``ray.init`` on an unreachable address retries for minutes, so we
probe the port first and fail within seconds.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from prag.errors import PragError

T = TypeVar("T")
R = TypeVar("R")

LOCAL = "local"
_GCS_PORT = 6379
_CLIENT_PORT = 10001


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide to run. ``None`` fields are derived from the cluster's resources."""

    address: str
    num_cpus: int | None = None  # ``local`` only: CPUs of the in-process cluster (default: all)
    cpus_per_actor: int | None = None  # CPU clusters: one actor per this many CPUs (default: min(4, all))
    gpus_per_actor: float = 1.0  # GPU clusters: one actor per GPU by default
    max_actors: int | None = None
    gpu_actors: int | None = None  # this many GPU actors even if the GPUs are not up yet (autoscaling)
    connect_timeout_s: float = 5.0


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep:
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise PragError(f"--ray-address {address!r}: port {port!r} is not a number") from None


def resolve_address(address: str) -> str:
    """``auto`` -> the running cluster's ``host:port`` (or a clear error); other values unchanged."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    try:
        from prag.ray_compat import canonicalize_bootstrap_address  # a private Ray function, listed there

        found = canonicalize_bootstrap_address("auto")
    except PragError:  # Ray outside the tested range: say so, not "no cluster found"
        raise
    except Exception as exc:  # ray raises ConnectionError when it finds nothing
        found = None
        detail = f" ({exc})"
    else:
        detail = ""
    if not found:
        raise PragError("--ray-address auto: no running Ray cluster found on this machine"
                        f"{detail}; start one with `ray start --head`, pass its address, or use --ray-address local")
    return found


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (``PragError``) if nothing listens at a Ray address; ``ray.init`` itself would hang."""
    if address.startswith("ray://"):
        host, port = _split_host_port(address[len("ray://"):].split("/")[0], _CLIENT_PORT)
    else:
        host, port = _split_host_port(address.split("://")[-1], _GCS_PORT)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise PragError(f"cannot reach the Ray cluster at --ray-address {address!r} ({host}:{port}: "
                        f"{exc.strerror or exc}); is it running (`ray status`) and is the port reachable?") from None
    _handshake(address, host, port, timeout_s)


def _handshake(address: str, host: str, port: int, timeout_s: float) -> None:
    """One Ray RPC with a deadline: something else listening on the port (a proxy, another service)
    would otherwise make ``ray.init`` retry for half a minute or more."""
    import grpc

    channel = grpc.insecure_channel(f"{host}:{port}")
    try:
        if address.startswith("ray://"):
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

            ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=timeout_s)
        else:
            from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s)
    except grpc.RpcError as exc:
        # A Ray server with token authentication answers, but refuses us: it is there; ray.init authenticates.
        if exc.code() not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            what = "Ray client server" if address.startswith("ray://") else "Ray cluster (GCS)"
            raise PragError(f"cannot reach the Ray cluster at --ray-address {address!r}: {host}:{port} answered, "
                            f"but not as a {what} ({exc.code().name}: {(exc.details() or '')[:120]}); "
                            f"check the address and port (GCS default {_GCS_PORT}, "
                            f"ray:// client default {_CLIENT_PORT})") from None
    finally:
        channel.close()


@contextlib.contextmanager
def ray_session(opts: RayOptions) -> Iterator[Any]:
    """Connect to (or start) Ray for the block; disconnect afterwards if we connected."""
    import ray

    from prag.logs import is_verbose

    if ray.is_initialized():  # e.g. a caller (or a test) already connected
        yield ray
        return
    if opts.address == LOCAL:
        ray.init(num_cpus=opts.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=is_verbose(),
                 configure_logging=False)
    else:
        address = resolve_address(opts.address)
        probe_address(address, opts.connect_timeout_s)
        try:
            ray.init(address=address, log_to_driver=is_verbose(), configure_logging=False)
        except ConnectionError as exc:
            raise PragError(f"cannot connect to the Ray cluster at --ray-address {opts.address!r}: {exc}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def plan_actors(opts: RayOptions, resources: dict[str, float]) -> tuple[int, float, float]:
    """(number of actors, CPUs per actor, GPUs per actor) for a cluster's total resources."""
    gpus = resources.get("GPU", 0.0)
    cpus = resources.get("CPU", 1.0)
    if opts.gpu_actors:  # an autoscaling cluster adds GPU nodes when these actors are pending
        return opts.gpu_actors, 1.0, opts.gpus_per_actor or 1.0
    if gpus >= 1:
        per_gpu = opts.gpus_per_actor or 1.0
        n, cpu_each, gpu_each = int(gpus // per_gpu), 1.0, per_gpu
    else:
        cpu_each = float(min(opts.cpus_per_actor or 4, max(cpus, 1)))
        n, gpu_each = int(cpus // cpu_each), 0.0
    n = max(1, n if opts.max_actors is None else min(n, opts.max_actors))
    return n, cpu_each, gpu_each


def _unwrap(exc: BaseException) -> BaseException:
    """A worker's ``PragError`` reaches the user as itself, not wrapped in a Ray traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, PragError):
        return cause
    return exc


class WorkerPool:
    """N instances of ``worker_cls`` (Ray actors) or one in-process instance (``ray_opts=None``).

    Use inside ``ray_session`` when ``ray_opts`` is given. ``call_first`` runs a method on the
    first worker; ``map`` runs a method over items on all workers and yields ``(index, result)``
    as they finish (in order in-process, completion order with Ray).
    """

    def __init__(self, worker_cls: type, args: tuple = (), kwargs: dict | None = None,
                 ray_opts: RayOptions | None = None, concurrency: int = 1):
        """``concurrency`` > 1 lets one worker run that many calls at once (threads; the worker must be
        thread-safe), e.g. to write one shard while training the next."""
        kwargs = kwargs or {}
        self._local = None
        self._actors: list[Any] = []
        self.concurrency = max(1, concurrency)
        if ray_opts is None:
            self._local = worker_cls(*args, **kwargs)
            return
        import ray

        n, cpu_each, gpu_each = plan_actors(ray_opts, ray.cluster_resources())
        remote_cls = ray.remote(num_cpus=cpu_each, num_gpus=gpu_each, max_concurrency=self.concurrency)(worker_cls)
        self._actors = [remote_cls.remote(*args, **kwargs) for _ in range(n)]
        self.plan = (n, cpu_each, gpu_each)

    @property
    def local_worker(self) -> Any:
        """The in-process worker instance, or None when the workers are Ray actors."""
        return self._local

    @property
    def size(self) -> int:
        return 1 if self._local is not None else len(self._actors)

    def call_first(self, method: str, *args: Any) -> Any:
        if self._local is not None:
            return getattr(self._local, method)(*args)
        import ray

        try:
            return ray.get(getattr(self._actors[0], method).remote(*args))
        except ray.exceptions.RayError as exc:
            raise _unwrap(exc) from None

    def map(self, method: str, items: Iterable[Any], in_flight_per_worker: int = 2) -> Iterator[tuple[int, Any]]:
        if self._local is not None:
            yield from self._map_local(getattr(self._local, method), items)
            return
        import ray

        free = deque(self._actors * max(in_flight_per_worker, self.concurrency))
        pending: dict[Any, tuple[int, Any]] = {}
        source = enumerate(items)
        try:
            while True:
                while free:
                    nxt = next(source, None)
                    if nxt is None:
                        break
                    actor = free.popleft()
                    pending[getattr(actor, method).remote(nxt[1])] = (nxt[0], actor)
                if not pending:
                    return
                done, _ = ray.wait(list(pending), num_returns=1)
                index, actor = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayError as exc:
                    raise _unwrap(exc) from None
                free.append(actor)
                yield index, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=False)

    def _map_local(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[tuple[int, Any]]:
        if self.concurrency == 1:
            for i, item in enumerate(items):
                yield i, fn(item)
            return
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.concurrency) as pool:
            pending: deque = deque()
            try:
                for i, item in enumerate(items):
                    pending.append((i, pool.submit(fn, item)))
                    if len(pending) >= self.concurrency:
                        index, fut = pending.popleft()
                        yield index, fut.result()
                while pending:
                    index, fut = pending.popleft()
                    yield index, fut.result()
            finally:
                for _, fut in pending:
                    fut.cancel()

    def close(self) -> None:
        if self._actors:
            import ray

            for actor in self._actors:
                ray.kill(actor)
            self._actors = []
        self._local = None


class _CallFn:
    """Wraps a plain function as a worker, so ``run_sharded`` reuses ``WorkerPool``."""

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn

    def run(self, item: Any) -> Any:
        return self.fn(item)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of ``size`` items (the last may be shorter)."""
    it = iter(items)
    while chunk := list(itertools.islice(it, size)):
        yield chunk


def run_sharded(fn: Callable[[T], R], items: Iterable[T], ray_address: str | None,
                ray_opts: RayOptions | None = None) -> Iterator[tuple[int, R]]:
    """Apply ``fn`` to every item (typically a shard: a list of records), yielding ``(index, result)``.

    ``ray_address=None`` runs in-process, in order; otherwise ``fn`` runs on Ray workers (one
    per ``cpus_per_actor`` CPUs or per GPU) and results arrive in completion order. ``fn`` must
    be importable by the workers (a module-level function). For work that should load a model
    once per worker, use ``WorkerPool`` with a class instead.
    """
    if ray_address is None:
        yield from ((i, fn(item)) for i, item in enumerate(items))
        return
    opts = ray_opts or RayOptions(address=ray_address)
    with ray_session(opts):
        pool = WorkerPool(_CallFn, (fn,), ray_opts=opts)
        try:
            yield from pool.map("run", items)
        finally:
            pool.close()
