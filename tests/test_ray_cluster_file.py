"""ray_cluster.yaml validates as `ray up` validates it, and the private Ray symbols behind that check (and
behind --ray-address auto) still behave as prag/ray_compat.py says. No cloud is contacted."""

from __future__ import annotations

import copy
import inspect
import re
from pathlib import Path

import pytest
import yaml

from prag import ray_compat
from prag.errors import PragError

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = REPO / "ray_cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER_FILE.read_text())


# ---- the boundary module ------------------------------------------------------------------


def test_installed_ray_is_in_the_tested_range_and_has_every_listed_symbol():
    assert ray_compat.version_in_range(), ray_compat.ray_version()
    ray_compat.check_ray_version()
    assert ray_compat.symbol_problems() == []
    assert len({(s.module, s.qualname) for s in ray_compat.PRIVATE_SYMBOLS}) == len(ray_compat.PRIVATE_SYMBOLS)
    for sym in ray_compat.PRIVATE_SYMBOLS:
        assert sym.used_in and sym.why and ("._private" in sym.module or sym.qualname.startswith("_"))


def test_version_gate_names_the_version(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "__version__", "2.71.0")
    assert not ray_compat.version_in_range()
    with pytest.raises(PragError, match=r"Ray 2\.71\.0 is installed.*>= 2\.60\.0, < 2\.61\.0"):
        ray_compat.check_ray_version()
    with pytest.raises(PragError, match="2.71.0"):  # every private symbol goes through the gate
        ray_compat.private("ray.autoscaler._private.util", "prepare_config")
    monkeypatch.setattr(ray, "__version__", "2.60.1")
    assert ray_compat.version_in_range()
    assert not ray_compat.version_in_range((2, 59, 9))


def test_an_unlisted_symbol_is_refused():
    with pytest.raises(PragError, match="not listed"):
        ray_compat.private("ray._private.services", "get_node_ip_address")


def test_symbol_problems_reports_a_missing_or_changed_symbol(monkeypatch):
    gone = ray_compat.PrivateSymbol("ray._private.services", "no_such_function", "nowhere", "test")
    changed = ray_compat.PrivateSymbol("ray._private.services", "canonicalize_bootstrap_address", "nowhere",
                                       "test", params=("no_such_param",))
    monkeypatch.setattr(ray_compat, "PRIVATE_SYMBOLS", ray_compat.PRIVATE_SYMBOLS + (gone, changed))
    problems = ray_compat.symbol_problems()
    assert len(problems) == 2
    assert "no_such_function: missing" in problems[0] and "['no_such_param'] are gone" in problems[1]


# ---- one contract test per private symbol --------------------------------------------------


def test_contract_canonicalize_bootstrap_address(monkeypatch):
    """`auto` reads RAY_ADDRESS (what ray.init does); `local` means "start one" (None); host:port stays."""
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert ray_compat.canonicalize_bootstrap_address("auto") == "10.1.2.3:6379"
    assert ray_compat.canonicalize_bootstrap_address("local") is None
    assert ray_compat.canonicalize_bootstrap_address("10.9.8.7:1234") == "10.9.8.7:1234"


def test_contract_prepare_config(raw):
    """Fills the AWS defaults, merges setup commands into head/worker lists, sets per-type worker counts."""
    prepare = ray_compat.private("ray.autoscaler._private.util", "prepare_config")
    cfg = copy.deepcopy(raw)
    del cfg["available_node_types"]["worker.cpu"]["min_workers"]
    del cfg["available_node_types"]["worker.cpu"]["max_workers"]
    filled = prepare(copy.deepcopy(cfg))
    assert "cluster_synced_files" in filled and "cluster_synced_files" not in cfg  # a default, from Ray's file
    assert filled["head_setup_commands"] == cfg["setup_commands"] + cfg["head_setup_commands"]
    assert filled["worker_setup_commands"] == cfg["setup_commands"] + cfg["worker_setup_commands"]
    nodes = filled["available_node_types"]
    assert nodes["worker.cpu"]["min_workers"] == 0 and nodes["worker.cpu"]["max_workers"] == cfg["max_workers"]
    assert nodes["head.cpu"]["max_workers"] == 0


def test_contract_validate_config(raw):
    """Accepts a prepared config; rejects schema errors (jsonschema) and cross-field errors (ValueError)."""
    import jsonschema

    prepare = ray_compat.private("ray.autoscaler._private.util", "prepare_config")
    validate = ray_compat.private("ray.autoscaler._private.util", "validate_config")
    good = prepare(copy.deepcopy(raw))
    assert validate(good) is None
    with pytest.raises(jsonschema.ValidationError):
        validate({**good, "no_such_key": 1})
    with pytest.raises(ValueError, match="head_node_type"):
        validate({**good, "head_node_type": "no.such.type"})


def test_contract_bootstrap_config_calls_prepare_then_validate():
    """`ray up` (create_or_update_cluster -> _bootstrap_config) still runs the two checks we run, in order."""
    up = ray_compat.private("ray.autoscaler._private.commands", "create_or_update_cluster")
    bootstrap = ray_compat.private("ray.autoscaler._private.commands", "_bootstrap_config")
    source = inspect.getsource(bootstrap)
    prep, fill, val = (source.find(s) for s in ("prepare_config(config)", "fillout_available_node_types_resources",
                                                "validate_config(config)"))
    assert 0 <= prep < fill < val, "ray up's config checks changed: revisit prag/ray_compat.validate_cluster_config"
    assert "_bootstrap_config(config" in inspect.getsource(up)


# ---- the cluster file -----------------------------------------------------------------------


def test_cluster_file_is_valid_for_ray_up():
    cfg = ray_compat.load_cluster_file(CLUSTER_FILE)
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and "InstanceType" in head["node_config"]
    workers = {name: spec for name, spec in nodes.items() if name != cfg["head_node_type"]}
    gpus = {name: spec["resources"].get("GPU", 0) for name, spec in workers.items()}
    assert max(gpus.values()) >= 2  # an engine with --gpus-per-engine > 1 fits somewhere
    assert any(g >= 1 and workers[n]["max_workers"] >= 4 for n, g in gpus.items())
    assert any(g == 0 and spec["resources"].get("CPU", 0) > 0 for g, spec in zip(gpus.values(), workers.values()))
    assert sum(spec["max_workers"] for spec in workers.values()) <= cfg["max_workers"]
    # every node mounts the shared storage and installs this project (Ray merged setup_commands into both lists)
    for which in ("head_setup_commands", "worker_setup_commands"):
        cmds = " ; ".join(cfg[which])
        assert "mount -t nfs4" in cmds and "/mnt/prag" in cmds, which
        assert "make install" in cmds, which
    assert cfg["file_mounts"] == {"~/prag": "."}


def test_cluster_file_names_a_command_for_every_stage():
    text = CLUSTER_FILE.read_text()
    comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
    flat = re.sub(r"\\\n#\s*", " ", comments)  # join continued command lines
    jobs = [line.split("--", 1)[1] for line in flat.splitlines() if "ray job submit" in line]
    by_stage = {stage: [j for j in jobs if f"prag {stage}" in j] for stage in ("index build", "augment", "encode",
                                                                               "eval", "serve")}
    assert all(by_stage.values()), {k: len(v) for k, v in by_stage.items()}
    for stage in ("index build", "augment", "encode", "eval", "serve"):
        assert "--ray-address auto" in by_stage[stage][0], stage
    assert "--num-engines" in by_stage["eval"][0] and "--gpus-per-engine" in by_stage["eval"][0]
    serve = by_stage["serve"][0]
    assert "--replicas" in serve and "--host 0.0.0.0" in serve and "--port 8000" in serve
    # every path a stage reads or writes is on the shared mount
    paths = {p for j in jobs for p in re.findall(r"(?<=\s)/\S+", j)}
    assert paths and all(p.startswith("/mnt/prag/") for p in paths), paths
    assert "S3" in comments  # what object storage would need instead


@pytest.mark.parametrize("breakage, message", [
    (lambda c: c["available_node_types"]["worker.gpu"].pop("node_config"),
     r"available_node_types\.worker\.gpu: 'node_config' is a required property"),
    (lambda c: c.__setitem__("gpu_workers", 8), r"\(top level\).*'gpu_workers' was unexpected"),
    (lambda c: c["available_node_types"]["head.cpu"].__setitem__(
        "node_confg", c["available_node_types"]["head.cpu"].pop("node_config")),
     r"head\.cpu: 'node_config' is a required property"),  # a misspelt key
    (lambda c: c.__setitem__("head_node_type", "head.gpu"), "head_node_type"),
    (lambda c: c["available_node_types"]["worker.gpu"].__setitem__("min_workers", 99), "min_workers"),
    (lambda c: c["available_node_types"]["worker.gpu"].__setitem__("resources", {"GPU": 0.5}),
     r"resources\.GPU"),
    (lambda c: c["provider"].__setitem__("type", "no-such-cloud"), "no-such-cloud"),
])
def test_a_broken_copy_is_rejected(raw, tmp_path, breakage, message):
    broken = copy.deepcopy(raw)
    breakage(broken)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    with pytest.raises(PragError, match=message) as info:
        ray_compat.load_cluster_file(path)
    assert str(path) in str(info.value)


def test_unreadable_or_non_yaml_file_is_named(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(PragError, match=f"{re.escape(str(bad))}: not valid YAML"):
        ray_compat.load_cluster_file(bad)
    with pytest.raises(PragError, match="cannot read cluster file"):
        ray_compat.load_cluster_file(tmp_path / "missing.yaml")
    bad.write_text("- a\n- b\n")
    with pytest.raises(PragError, match="must be a YAML mapping"):
        ray_compat.load_cluster_file(bad)
