"""``prag index build --ray-address``: embed the corpus on a Ray cluster, build the index on the driver.

Why Ray Data: embedding is a stateless map over shards of passages, which is what ``map_batches``
with an actor pool does. Each actor (``ShardEmbedder``) loads the sentence-transformers model once
and then embeds shard after shard; Ray schedules the actors on GPUs when the cluster has them, streams
the results back with backpressure, and ``preserve_order`` returns them in corpus order, which the
driver checks row by row (corpus row i must be FAISS id i). Everything else (the doc store, FAISS
training and adding, BM25, manifest, atomic output) is ``retrieval.index.write_index_dir``, the same
code as the single-process build, so both give the same index.

The actors read their passages from the doc store the driver has just written inside ``--out``, so
``--out`` must be on a filesystem every node mounts at the same path (``ray_cluster.yaml``'s
/mnt/prag); only the row numbers travel through Ray. On a one-machine cluster (``local``) that holds
trivially.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Iterator

import numpy as np

from prag.errors import PragError
from retrieval.docstore import DocStore
from retrieval.embed import Embedder, passage_text
from retrieval.index import BuildResult, EmbedShards, IndexConfig, prepare_build, write_index_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayIndexOptions:
    """Where to embed, and how wide. ``None`` fields follow the cluster's resources."""

    address: str                          # host:port, ray://host:port, 'auto', or 'local' (start one here)
    embed_actors: int | None = None       # None: one per GPU-per-actor on a GPU cluster, else one per 4 CPUs
    gpus_per_actor: float | None = None   # None: 1 when the cluster has GPUs, else 0 (CPU actors)
    num_cpus: int | None = None           # 'local' only: CPUs of the cluster started here (default: all)

    def validate(self) -> None:
        if not isinstance(self.address, str) or not self.address.strip():
            raise PragError("--ray-address must be a cluster address, 'auto' or 'local'")
        if self.embed_actors is not None and (not isinstance(self.embed_actors, int) or self.embed_actors <= 0):
            raise PragError(f"--ray-embed-actors must be a positive integer, got {self.embed_actors!r}")
        if self.gpus_per_actor is not None and not (isinstance(self.gpus_per_actor, (int, float))
                                                    and math.isfinite(self.gpus_per_actor) and self.gpus_per_actor >= 0):
            raise PragError(f"--ray-gpus-per-actor must be a number >= 0, got {self.gpus_per_actor!r}")
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus <= 0):
            raise PragError(f"--ray-num-cpus must be a positive integer, got {self.num_cpus!r}")


def plan_embed_actors(opts: RayIndexOptions, resources: dict[str, float]) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for the cluster's total ``resources``.

    The same rule as the encode workers (``offline_encode.ray_jobs.plan_actors``): one actor per GPU,
    or per 4 CPUs. ``--ray-embed-actors N`` with GPUs asked for starts N GPU actors even before the
    GPUs are up (an autoscaling cluster adds nodes for them); with CPU actors it splits the CPUs N ways.
    """
    from offline_encode.ray_jobs import RayOptions, plan_actors

    resources = dict(resources)
    cpus = resources.get("CPU", 1.0)
    want_gpus = opts.gpus_per_actor > 0 if opts.gpus_per_actor is not None else resources.get("GPU", 0.0) >= 1
    if not want_gpus:
        resources.pop("GPU", None)
    elif resources.get("GPU", 0.0) < (opts.gpus_per_actor or 1.0) and opts.embed_actors is None:
        raise PragError(f"--ray-gpus-per-actor {opts.gpus_per_actor:g}: the cluster has "
                        f"{resources.get('GPU', 0.0):g} GPU(s); pass --ray-embed-actors N to have an autoscaling "
                        "cluster start GPU nodes for N actors, or --ray-gpus-per-actor 0 to embed on CPUs")
    per_actor_cpus = None
    if opts.embed_actors is not None and not want_gpus:
        per_actor_cpus = max(1, int(cpus // opts.embed_actors))
    plan = RayOptions(address=opts.address, cpus_per_actor=per_actor_cpus, gpus_per_actor=opts.gpus_per_actor or 1.0,
                      max_actors=opts.embed_actors, gpu_actors=opts.embed_actors if want_gpus else None)
    n, cpu_each, gpu_each = plan_actors(plan, resources)
    if opts.embed_actors is not None and n < opts.embed_actors:
        raise PragError(f"--ray-embed-actors {opts.embed_actors}: the cluster's {cpus:g} CPU(s) hold only {n} "
                        "embedder actor(s) of at least one CPU each")
    return n, cpu_each, gpu_each


class ShardEmbedder:
    """A Ray Data actor: loads the embedder once, then turns batches of doc-store rows into vectors."""

    def __init__(self, store_path: str, embedder: str, device: str, batch_size: int, allow_download: bool) -> None:
        if not Path(store_path).exists():
            raise PragError(f"the doc store {store_path} is not visible on node {socket.gethostname()}: with a "
                            "multi-node Ray cluster, --out must be on a filesystem every node mounts at the same "
                            "path (see ray_cluster.yaml)")
        self.store = DocStore(store_path)
        self.embedder = Embedder(embedder, device=device, batch_size=batch_size, allow_download=allow_download)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = batch["data"]
        docs = self.store.get_by_rows(rows)
        return {"row": rows, "vector": self.embedder.encode([passage_text(d.title, d.text) for d in docs])}


def _user_error(exc: BaseException) -> BaseException:
    """The ``PragError`` an actor raised, out of Ray's wrapping; else ``exc`` itself."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, PragError):
            return cur
        seen.add(id(cur))
        cur = getattr(cur, "cause", None) or cur.__cause__ or cur.__context__
    return exc


def ray_embed_shards(embedder: str, cfg: IndexConfig, plan: tuple[int, float, float]) -> EmbedShards:
    """``EmbedShards`` on Ray Data: each shard of rows is one block, mapped by an actor pool of ``plan``."""
    n_actors, cpu_each, gpu_each = plan
    device = cfg.device or ("cuda" if gpu_each > 0 else "cpu")

    def embed(store: DocStore, shards: Iterator[np.ndarray]) -> Generator[np.ndarray, None, None]:
        import ray.data

        shards = list(shards)  # row numbers only: 8 bytes a passage in the object store
        if not shards:
            return
        ctx = ray.data.DataContext.get_current()
        saved = (ctx.execution_options.preserve_order, ctx.enable_progress_bars)
        ctx.execution_options.preserve_order = True  # corpus order == FAISS ids
        ctx.enable_progress_bars = False  # the driver's own bar counts passages
        try:
            ds = ray.data.from_numpy(shards).map_batches(
                ShardEmbedder, batch_size=None, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpu_each, num_gpus=gpu_each,
                fn_constructor_kwargs={"store_path": str(store.path.resolve()), "embedder": embedder,
                                       "device": device, "batch_size": cfg.batch_size,
                                       "allow_download": cfg.allow_download})
            expected = iter(shards)
            want = np.empty(0, dtype=np.int64)
            batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1))
            try:
                for batch in batches:
                    rows = batch["row"]
                    while len(want) < len(rows):
                        nxt = next(expected, None)
                        if nxt is None:
                            break
                        want = np.concatenate([want, nxt])
                    if not np.array_equal(rows, want[:len(rows)]):
                        raise PragError("internal error: Ray returned embeddings out of corpus order "
                                        f"(rows {rows[:3].tolist()}..., expected {want[:3].tolist()}...)")
                    want = want[len(rows):]
                    yield np.ascontiguousarray(batch["vector"], dtype=np.float32)
            except Exception as exc:  # noqa: BLE001 - re-raised, unwrapped when it is ours
                err = _user_error(exc)
                if err is exc:
                    raise
                raise err from None
            finally:
                close = getattr(batches, "close", None)
                if close is not None:  # a build that stops early (an error on the driver) stops the actors too
                    close()
        finally:
            ctx.execution_options.preserve_order, ctx.enable_progress_bars = saved

    return embed


class _DropProgressBarNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Progress bars disabled")


def _quiet_ray_data() -> None:
    """Ray Data's own INFO lines (one per dataset run) and its note that we turned its bars off, unless --verbose.

    Importing ``ray.data`` configures its logger, so this runs after the import."""
    import ray.data  # noqa: F401

    from prag.logs import is_verbose

    if not is_verbose():
        logger = logging.getLogger("ray.data")
        logger.setLevel(logging.WARNING)
        for handler in logger.handlers:  # the note comes from a child logger: a logger's own filter would miss it
            if not any(isinstance(f, _DropProgressBarNote) for f in handler.filters):
                handler.addFilter(_DropProgressBarNote())


def build_index_ray(corpus: str | Path, out: str | Path, cfg: IndexConfig | None, ray_opts: RayIndexOptions,
                    progress: bool = True, overwrite: bool = False) -> BuildResult:
    """Like ``build_index``, with the embedding done by a Ray Data actor pool (see the module docstring)."""
    from offline_encode.ray_jobs import RayOptions, ray_session

    cfg = cfg or IndexConfig()
    ray_opts.validate()
    corpus, out = prepare_build(corpus, out, cfg, overwrite)
    with ray_session(RayOptions(address=ray_opts.address, num_cpus=ray_opts.num_cpus)) as ray:  # fails fast
        # The embedder's name and dimension, read on the driver before the corpus is; on the CPU, so the
        # driver never takes a GPU the actors need.
        probe = Embedder(cfg.embedder, device="cpu", batch_size=cfg.batch_size, allow_download=cfg.allow_download)
        name, dim = probe.name, probe.dim
        del probe
        _quiet_ray_data()
        plan = plan_embed_actors(ray_opts, ray.cluster_resources())
        log.info("embedding on Ray: %d actor(s) of %g CPU, %g GPU each", *plan)
        return write_index_dir(corpus, out, cfg, name, dim, ray_embed_shards(name, cfg, plan),
                               progress=progress, overwrite=overwrite)
