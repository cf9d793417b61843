"""Which private Ray symbols this project touches, and whether the installed Ray has them.

Ray has no public API for two things the project needs: finding the cluster this machine belongs to
(``--ray-address auto``) without connecting to it, and checking a cluster-launcher file the way
``ray up`` does without contacting the cloud. Both live under ``ray._private`` / ``ray.autoscaler._private``.
Every such name is listed in :data:`PRIVATE_SYMBOLS` with where it is used and why; code reaches them only
through :func:`private` (or the wrappers below), which checks the Ray version against
:data:`TESTED_VERSIONS` first. ``tests/test_ray_cluster_file.py`` checks each entry against the installed Ray.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prag.errors import PragError
from prag.versions import in_range, lost_parameters, package_version

# Ray versions the private symbols below were tested with: [low, high). requirements/*.lock pin ray==2.60.0.
TESTED_VERSIONS = ((2, 60, 0), (2, 61, 0))


@dataclass(frozen=True)
class PrivateSymbol:
    """One private Ray name: ``module``.``qualname``, where the project uses it and why."""

    module: str
    qualname: str
    used_in: str
    why: str
    params: tuple[str, ...] = ()  # parameters the project passes (checked against the signature)


PRIVATE_SYMBOLS: tuple[PrivateSymbol, ...] = (
    PrivateSymbol("ray._private.services", "canonicalize_bootstrap_address",
                  "offline_encode/ray_jobs.py: resolve_address (--ray-address auto)",
                  "what ray.init(address='auto') does to find this machine's cluster (RAY_ADDRESS, the "
                  "session file of a running `ray start`), without connecting: we probe the port first, "
                  "because ray.init retries an unreachable address for minutes", params=("addr",)),
    PrivateSymbol("ray.autoscaler._private.util", "prepare_config",
                  "validate_cluster_config (tests/test_ray_cluster_file.py)",
                  "`ray up` step 1: merges the provider's defaults.yaml, the setup commands and each node "
                  "type's min/max workers into the file", params=("config",)),
    PrivateSymbol("ray.autoscaler._private.util", "validate_config",
                  "validate_cluster_config (tests/test_ray_cluster_file.py)",
                  "`ray up` step 2: ray-schema.json plus Ray's cross-field checks (head_node_type, "
                  "min_workers against max_workers)", params=("config",)),
    PrivateSymbol("ray.autoscaler._private.commands", "create_or_update_cluster",
                  "contract test only (tests/test_ray_cluster_file.py)",
                  "what `ray up` runs; the contract test reads that it still goes through _bootstrap_config",
                  params=("config_file", "no_config_cache")),
    PrivateSymbol("ray.autoscaler._private.commands", "_bootstrap_config",
                  "contract test only (tests/test_ray_cluster_file.py)",
                  "where `ray up` checks the file: the contract test reads that it still calls prepare_config, "
                  "then validate_config (between them it asks the cloud for instance resources, which we skip)",
                  params=("config",)),
)


def ray_version() -> tuple[str, tuple[int, ...]]:
    """(version string, its numeric (major, minor, patch)) of the installed Ray."""
    import ray

    return package_version(ray)


def version_in_range(version: tuple[int, ...] | None = None) -> bool:
    return in_range(ray_version()[1] if version is None else version, TESTED_VERSIONS)


def check_ray_version() -> None:
    """``PragError`` when the installed Ray is outside the range the private symbols were tested with."""
    text, version = ray_version()
    if not version_in_range(version):
        low, high = (".".join(map(str, v)) for v in TESTED_VERSIONS)
        raise PragError(f"Ray {text} is installed, but prag uses private Ray functions tested only with Ray "
                        f">= {low}, < {high} (prag/ray_compat.py lists them); install the pinned version "
                        f"(`make install`, requirements/*.lock pin ray==2.60.0)")


def _listed(module: str, qualname: str) -> PrivateSymbol:
    for sym in PRIVATE_SYMBOLS:
        if (sym.module, sym.qualname) == (module, qualname):
            return sym
    raise PragError(f"internal error: {module}.{qualname} is not listed in prag.ray_compat.PRIVATE_SYMBOLS")


def resolve(sym: PrivateSymbol) -> Any:
    """The object ``sym`` names; raises ImportError/AttributeError when Ray no longer has it."""
    obj: Any = importlib.import_module(sym.module)
    for part in sym.qualname.split("."):
        obj = getattr(obj, part)
    return obj


def private(module: str, qualname: str) -> Any:
    """A listed private Ray symbol, after the version check; a clear ``PragError`` if it is gone."""
    sym = _listed(module, qualname)
    check_ray_version()
    try:
        return resolve(sym)
    except (ImportError, AttributeError) as exc:
        raise PragError(f"the installed Ray has no {module}.{qualname} ({exc}); prag/ray_compat.py "
                        f"says where it is used") from None


def symbol_problems() -> list[str]:
    """One line per listed symbol that is missing or whose parameters changed; empty when all match."""
    problems = []
    for sym in PRIVATE_SYMBOLS:
        try:
            obj = resolve(sym)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{sym.module}.{sym.qualname}: missing ({exc})")
            continue
        lost = lost_parameters(obj, sym.params)
        if lost:
            problems.append(f"{sym.module}.{sym.qualname}: parameters {lost} are gone")
    return problems


# --------------------------------------------------------------------------------------------
# Wrappers the project calls


def canonicalize_bootstrap_address(address: str) -> str | None:
    """``host:port`` of the cluster ``address`` (e.g. ``auto``) names, or None; Ray raises ConnectionError
    when ``auto`` finds nothing."""
    return private("ray._private.services", "canonicalize_bootstrap_address")(address)


def validate_cluster_config(config: dict, source: str | Path = "cluster config") -> dict:
    """Check a cluster-launcher config as ``ray up`` does and return it with Ray's defaults filled in.

    ``ray up`` runs ``prepare_config`` (provider defaults, merged setup commands, per-type worker
    counts), asks the cloud for each instance type's CPUs/GPUs (skipped here: no cloud access; the
    file states its node types' resources), then ``validate_config`` (the JSON schema and Ray's cross-field
    checks). A rejected file raises ``PragError`` naming ``source`` and the offending field."""
    import jsonschema

    if not isinstance(config, dict):
        raise PragError(f"{source}: a cluster config must be a YAML mapping, got {type(config).__name__}")
    provider = config.get("provider")
    if not isinstance(provider, dict) or "type" not in provider:
        raise PragError(f"{source}: 'provider' with a 'type' (e.g. aws) is required")
    prepare = private("ray.autoscaler._private.util", "prepare_config")
    validate = private("ray.autoscaler._private.util", "validate_config")
    try:
        filled = prepare(copy.deepcopy(config))
        validate(filled)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise PragError(f"{source}: invalid at {where}: {exc.message}") from None
    except (ValueError, KeyError, AssertionError, NotImplementedError) as exc:
        raise PragError(f"{source}: rejected by Ray's cluster checks: {exc}") from None
    return filled


def load_cluster_file(path: str | Path) -> dict:
    """Read a ``ray up`` YAML file and validate it (:func:`validate_cluster_config`); returns the filled config."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PragError(f"cannot read cluster file {path}: {exc.strerror or exc}") from None
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PragError(f"{path}: not valid YAML ({exc})") from None
    return validate_cluster_config(config, path)
