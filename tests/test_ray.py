"""``tierkv.ray``: the Ray Data callable class and ``tierkv batch --ray`` give the local mode's results.

Default suite (no Ray needed): the predictor called on a batch of rows equals ``run_batch`` on the
same lines, a request survives the driver -> worker round trip, node environment fills unset budgets,
and the CLI's refusals. Slow (Ray Data installed, ``pip install 'tierkv[ray]'``): a real local Ray
cluster, a head and a second node with their own CPUs and environment, runs jobs on the demo model
and a tiny random model equal to the local output row for row; a worker process killed by its PID
mid-job loses and duplicates no row; a bad prompt is an error row, not a failed job.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from typer.testing import CliRunner

from tierkv.batch import BatchJob, parse_request, read_requests, run_batch
from tierkv.cli import app
from tierkv.ray import TierkvPredictor, _as_line, worker_load_kwargs

pytestmark = pytest.mark.usefixtures("torch_kernels_one_thread")
HAS_RAY = importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.data") is not None
NO_RAY = "Ray Data is not installed (pip install 'tierkv[ray]')"
DEMO = {"dtype": "float32", "kv": "exact", "device": "cpu"}
CHAT = [{"role": "user", "content": "Name a colour."}]
# demo-model lines: text, ids, a chat, a sampled one, a bad JSON line, ids outside the vocabulary
LINES = [json.dumps({"id": "text", "prompt": "Once upon a time there was", "max_tokens": 6}),
         json.dumps({"prompt": [11, 12, 13, 14, 15], "max_tokens": 9}),
         json.dumps({"id": 7, "messages": CHAT, "max_tokens": 5, "stop": ["\n"]}),
         json.dumps({"id": "sampled", "prompt": "The cat", "temperature": 0.9, "top_k": 20, "seed": 5,
                     "max_tokens": 8}),
         "{not json",
         json.dumps({"id": "vocab", "prompt": [5, 999999], "max_tokens": 3})]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _untimed(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "timing"} for line in path.read_text().splitlines()]


def _local(model: str, load_kwargs: dict[str, Any], lines: list[str], tmp: Path) -> list[dict[str, Any]]:
    import tierkv

    out = tmp / "local.jsonl"
    with tierkv.load(model, **load_kwargs) as eng:
        run_batch(eng, _write(tmp / "local-in.jsonl", lines), out, batch=3)
    return _untimed(out)


# -- without Ray ------------------------------------------------------------------------------------
def test_predictor_rows_equal_the_local_job(tmp_path: Path) -> None:
    want = _local("demo", DEMO, LINES, tmp_path)
    pred = TierkvPredictor("demo", DEMO, batch=2)
    try:
        rows = {"line": np.arange(1, len(LINES) + 1), "request": np.array(LINES, dtype=object)}
        out = pred(rows)
    finally:
        pred.close()
    got = [{k: v for k, v in json.loads(r).items() if k != "timing"} for r in out["result"]]
    assert got == want
    assert [r["id"] for r in got] == ["text", 2, 7, "sampled", 5, "vocab"]
    assert out["error"][4].startswith("line 5: not valid JSON") and "vocabulary" in out["error"][5]
    assert out["text"][0] == got[0]["text"] and out["text"][5] is None and out["error"][0] is None
    assert list(out["generated_tokens"]) == [len(r.get("tokens", ())) for r in got]
    assert set(out["worker"]) == {pred.worker} and out["busy_s"].sum() > 0
    assert list(out["request"]) == LINES                       # the input columns pass through


def test_a_request_survives_the_trip_to_a_worker(tmp_path: Path) -> None:
    defaults = {"max_new_tokens": 4, "temperature": 0.0, "top_k": None, "top_p": None, "seed": None, "stop": ()}
    for req in read_requests(_write(tmp_path / "in.jsonl", LINES), defaults):
        if req.error is None:
            assert parse_request(req.line, _as_line(req).encode(), {}) == \
                parse_request(req.line, _as_line(req).encode(), defaults)
            back = parse_request(req.line, _as_line(req).encode(), {})
            assert (back.id, back.prompt, back.messages) == (req.id, req.prompt, req.messages)
            assert {k: list(v) if isinstance(v, tuple) else v for k, v in req.sampling.items()} == back.sampling


def test_node_environment_fills_unset_budgets() -> None:
    env = {"TIERKV_DEVICE_MEM": "6GiB", "TIERKV_HOST_MEM": "20GiB", "TIERKV_DEVICE": "cuda:1"}
    assert worker_load_kwargs({"device_mem": None, "host_mem": "1GiB", "kv": "exact"}, env) == \
        {"device_mem": "6GiB", "host_mem": "1GiB", "kv": "exact", "device": "cuda:1"}
    assert worker_load_kwargs({"device_mem": None}, {}) == {"device_mem": None}


def test_cli_refusals(tmp_path: Path) -> None:
    path = _write(tmp_path / "in.jsonl", LINES[:1])
    res = CliRunner().invoke(app, ["batch", "demo", str(path), "-o", str(tmp_path / "o.jsonl"), "--workers", "2"])
    assert res.exit_code == 2 and "give --ray auto" in res.output
    if not HAS_RAY:
        res = CliRunner().invoke(app, ["batch", "demo", str(path), "-o", str(tmp_path / "o.jsonl"), "--ray", "auto"])
        assert res.exit_code == 2 and "pip install 'tierkv[ray]'" in res.output


# -- a real local Ray cluster -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A head and a second node, 1 CPU each (one 1-CPU worker fits on each), the second with its
    own TIERKV_* environment (budgets that stream the demo model's layers from its offload dir)."""
    if not HAS_RAY:
        pytest.skip(NO_RAY)
    import ray
    from ray.cluster_utils import Cluster

    offload = tmp_path_factory.mktemp("node2-offload")
    small = {"object_store_memory": 80 * 1024 ** 2, "include_dashboard": False}
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **small})
    c.add_node(num_cpus=1, env_vars={"TIERKV_DEVICE_MEM": "12MiB", "TIERKV_HOST_MEM": "4MiB",
                                        "TIERKV_OFFLOAD_DIR": str(offload), "TIERKV_KERNELS": "torch"}, **small)
    ray.init(address=c.address, logging_level="WARNING")
    c.offload = offload
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _ray_job(lines: list[str], tmp: Path, model: str, load_kwargs: dict[str, Any], **kw: Any) -> tuple[Any, Path]:
    from tierkv.ray import run_ray_job

    out = tmp / "ray.jsonl"
    with BatchJob(_write(tmp / "in.jsonl", lines), out) as job:
        summary = run_ray_job(job, model, load_kwargs, workers=2, batch=3, **kw)
    return summary, out


@pytest.mark.slow
def test_demo_job_on_two_nodes_equals_local(cluster: Any, tmp_path: Path) -> None:
    lines = LINES + [json.dumps({"id": f"ids-{n}", "prompt": [(7 * i + n) % 4000 + 10 for i in range(n)],
                                 "max_tokens": 7}) for n in (3, 40, 17, 64)]
    want = _local("demo", DEMO, lines, tmp_path)
    summary, out = _ray_job(lines, tmp_path, "demo", {"dtype": "float32", "kv": "exact", "device": "cpu"})
    assert _untimed(out) == want
    assert (summary.ok, summary.errors, summary.skipped, summary.unfinished) == (8, 2, 0, 0)
    # both workers (one per node) took batches; the bad JSON line never left the driver
    assert len(summary.workers) == 2 and sum(w.rows for w in summary.workers.values()) == 9
    assert summary.generated_tokens == sum(w.generated_tokens for w in summary.workers.values()) > 0
    assert any(cluster.offload.iterdir())           # the second node's worker streamed from its own offload dir
    again, _ = _ray_job(lines, tmp_path, "demo", DEMO)    # resumed: everything is there already
    assert (again.skipped, again.ok) == (len(lines), 0) and _untimed(out) == want


@pytest.mark.slow
def test_tiny_random_model_job_and_cli_equal_local(cluster: Any, tiny_llama_dir: Path, tmp_path: Path) -> None:
    kwargs = {"dtype": "float32", "kv": "exact", "device": "cpu"}
    lines = [json.dumps({"id": i, "prompt": [(3 * j + i) % 200 + 1 for j in range(5 + 9 * i)], "max_tokens": 6})
             for i in range(7)] + [json.dumps({"id": "long", "prompt": [1] * 300, "max_tokens": 2}),
                                   json.dumps({"id": "text", "prompt": "no tokenizer", "max_tokens": 2})]
    want = _local(str(tiny_llama_dir), kwargs, lines, tmp_path)
    assert [r["id"] for r in want if "error" in r] == ["long", "text"]       # bad prompts: error rows
    out = tmp_path / "cli.jsonl"
    cmd = [sys.executable, "-m", "tierkv", "batch", str(tiny_llama_dir), str(_write(tmp_path / "in.jsonl", lines)),
           "-o", str(out), "--ray", cluster.address, "--workers", "2", "--batch", "2", "--dtype", "float32",
           "--kv", "exact", "--device", "cpu", "--json"]                 # a process of its own joins the cluster
    res = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["errors"], summary["actors"]) == (7, 2, 2)
    assert _untimed(out) == want


def _worker_pids(cluster: Any) -> list[int]:
    """PIDs of this cluster's tierkv workers (descendants of its raylets, Ray's title on them)."""
    import psutil

    raylets = {p.process.pid for node in cluster.list_all_nodes() for p in node.all_processes["raylet"]}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if "TierkvPredictor" in " ".join(proc.info["cmdline"] or ()) and \
                    raylets & {p.pid for p in proc.parents()}:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_killed_worker_loses_and_duplicates_no_row(cluster: Any, tmp_path: Path) -> None:
    lines = [json.dumps({"id": f"r{i}", "prompt": [(11 * j + i) % 4000 + 10 for j in range(4 + i)],
                         "max_tokens": 24}) for i in range(18)]
    want = _local("demo", DEMO, lines, tmp_path)
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.setdefault("run", _ray_job(lines, tmp_path, "demo", DEMO)))
    job.start()
    out, deadline, killed = tmp_path / "ray.jsonl", time.monotonic() + 240, None
    while killed is None and job.is_alive() and time.monotonic() < deadline:
        if out.exists() and out.read_text().count("\n") >= 1 and (pids := _worker_pids(cluster)):
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)                  # mid-job: 1 of 18 rows written
        time.sleep(0.2)
    job.join(timeout=300)
    assert killed is not None and not job.is_alive()
    summary, _ = result["run"]
    assert _untimed(out) == want and summary.unfinished == 0       # every row once, in order, as local
    assert killed not in _worker_pids(cluster)                     # a new process replaced it


@pytest.mark.slow
def test_a_cluster_without_room_for_the_workers_is_an_error(cluster: Any, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.data

    from tierkv.batch import BatchError
    from tierkv.ray import run_ray_job

    monkeypatch.setenv("RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S", "5")         # the user's own start timeout
    monkeypatch.setattr(ray.data.DataContext.get_current(), "wait_for_min_actors_s", 5)
    with BatchJob(_write(tmp_path / "in.jsonl", LINES[:2]), tmp_path / "out.jsonl") as job:
        with pytest.raises(BatchError, match="did not start 3 workers of 1 CPUs each within 5 s: give fewer"):
            run_ray_job(job, "demo", DEMO, workers=3)
    assert (tmp_path / "out.jsonl").read_text() == ""
