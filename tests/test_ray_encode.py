"""Ray: a local 2-CPU cluster encodes the same store as the single-process run; unreachable addresses fail
fast. (ray_cluster.yaml is checked in tests/test_ray_cluster_file.py.)"""

from __future__ import annotations

import operator
import time

import pytest

from offline_encode.encode import encode_corpus
from offline_encode.ray_jobs import (LOCAL, RayOptions, WorkerPool, plan_actors, probe_address, ray_session,
                                     run_sharded)
from prag.errors import PragError
from prag.prompt import PromptConfig
from tests.test_encode import CFG, N_GOOD, assert_same_store, augmented_file, encoded  # noqa: F401 (shared fixtures)


def test_local_cluster_matches_single_process(encoded, augmented_file, tiny_model_dir, tmp_path):
    import ray

    from offline_encode.encode import EncodeWorker

    out = tmp_path / "store"
    opts = RayOptions(address=LOCAL, num_cpus=2, cpus_per_actor=1)
    with ray_session(opts):
        assert ray.cluster_resources()["CPU"] == 2
        probe_address(ray.get_runtime_context().gcs_address)  # a real GCS passes the fail-fast handshake
        summary = encode_corpus(augmented_file, tiny_model_dir, out, CFG, ray_address=LOCAL, ray_opts=opts,
                                progress=False, docs_per_shard=3)
        # the generic helper on the same cluster: results by index, whatever the completion order
        results = dict(run_sharded(sum, [[1, 2], [3, 4, 5], [6]], ray_address=LOCAL, ray_opts=opts))
        # a worker's PragError reaches the driver as itself, not wrapped in a Ray traceback
        pool = WorkerPool(EncodeWorker, (str(tiny_model_dir), CFG, str(out), PromptConfig()), ray_opts=opts)
        try:
            with pytest.raises(PragError, match="^augmented record 'x': no QA pairs"):
                list(pool.map("encode_shard", [[{"doc_id": "x", "passage": "p", "qa": []}]]))
        finally:
            pool.close()
    assert not ray.is_initialized()  # the session we started was shut down
    assert results == {0: 3, 1: 12, 2: 6}
    assert (summary.workers, summary.trained, summary.shards_written) == (2, N_GOOD, 4)
    assert_same_store(out, encoded[0])


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1"])
def test_unreachable_address_fails_fast(address, augmented_file, tiny_model_dir, tmp_path):
    start = time.monotonic()
    with pytest.raises(PragError, match=f"cannot reach the Ray cluster at --ray-address '{address}'"):
        encode_corpus(augmented_file, tiny_model_dir, tmp_path / "s", CFG, ray_address=address, progress=False)
    assert time.monotonic() - start < 15


def test_a_non_ray_listener_fails_fast():
    """Something else on the port (here an HTTP server) must not send ray.init into minutes of retries."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        with pytest.raises(PragError, match="answered, but not as a Ray cluster"):
            with ray_session(RayOptions(address=f"127.0.0.1:{srv.server_port}", connect_timeout_s=3)):
                pass
        assert time.monotonic() - start < 15
    finally:
        srv.shutdown()


def test_auto_resolves_ray_address_and_fails_fast(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # what `ray job submit` sets; here nothing listens
    start = time.monotonic()
    with pytest.raises(PragError, match="cannot reach the Ray cluster at --ray-address '127.0.0.1:1'"):
        with ray_session(RayOptions(address="auto")):
            pass
    assert time.monotonic() - start < 15


def test_actor_plan():
    assert plan_actors(RayOptions("x"), {"CPU": 16.0, "GPU": 4.0}) == (4, 1.0, 1.0)
    assert plan_actors(RayOptions("x"), {"CPU": 16.0}) == (4, 4.0, 0.0)
    assert plan_actors(RayOptions("x", cpus_per_actor=1, max_actors=3), {"CPU": 16.0}) == (3, 1.0, 0.0)
    assert plan_actors(RayOptions("x"), {"CPU": 2.0}) == (1, 2.0, 0.0)
    assert plan_actors(RayOptions("x", gpu_actors=8), {"CPU": 8.0}) == (8, 1.0, 1.0)  # autoscaling


def test_run_sharded_in_process():
    assert list(run_sharded(operator.neg, [1, 2, 3], ray_address=None)) == [(0, -1), (1, -2), (2, -3)]
