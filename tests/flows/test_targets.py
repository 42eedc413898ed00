"""One run over two targets on two work pools, each with its own process worker in its own folder.

Real parts only: the session's ``prefect server start``, moto's S3 server (the real S3 HTTP API) as the
one store, two ``process`` work pools with the repo's locked template, one ``prefect worker start`` per
pool started from a different working folder with its own local cache (two "machines"), the
deployments made with ``prefect deploy`` as docs/targets.md says, and the parent started by
``trtflow run`` with the targets in its config file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_env import REPO, Api, Server, prefect_bin, stop

POOLS = {"cpu-a": "trtflow-target-a", "cpu-b": "trtflow-target-b"}
TINY = ["--epochs", "1", "--min-batch", "1", "--opt-batch", "8", "--max-batch", "32", "--calibration-samples", "64", "--no-profile"]


@pytest.fixture(scope="module")
def s3(s3_endpoint: str) -> dict[str, str]:
    """A bucket on the session's S3 server; returns the AWS variables every "machine" sets, and the bucket."""
    from _s3_kit import S3_CREDENTIALS, new_bucket

    return {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint, "BUCKET": new_bucket(s3_endpoint)[1]}


@pytest.fixture(scope="module")
def two_pools(prefect_server: Server, s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Two pools, a deployment of the flow on each (trtflow/target-NAME), a worker per pool in its own folder."""
    folders: dict[str, Path] = {}
    workers = []
    for name, pool in POOLS.items():
        prefect_server.cli("work-pool", "create", pool, "--type", "process", "--base-job-template", str(REPO / "work-pool-template.json"))
        prefect_server.cli("--no-prompt", "deploy", "flows/pipeline.py:pipeline", "--name", f"target-{name}", "--pool", pool)
        folders[name] = tmp_path_factory.mktemp(f"machine-{name}")
        workers.append(prefect_server.start([prefect_bin(), "worker", "start", "--pool", pool, "--type", "process", "--limit", "1"],
                                            f"worker-{name}.log", cwd=folders[name], extra_env=s3))
    try:
        yield folders
    finally:
        for w in workers:
            stop(w)


def trtflow(server: Server, *argv: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "flows.cli", "run", *argv], cwd=cwd, env={**server.env, **(env or {}), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_one_parent_run_over_two_targets_writes_one_report_and_reruns_cached(prefect_server: Server, s3: dict[str, str], two_pools: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    # Each target's machine keeps its own local cache; all three share the bucket.
    config = tmp_path / "targets.json"
    config.write_text(json.dumps({"targets": [
        {"name": "cpu-a", "pool": POOLS["cpu-a"], "backend": "onnxruntime", "precisions": ["fp32"], "artifacts_dir": str(two_pools["cpu-a"] / "cache")},
        {"name": "cpu-b", "pool": POOLS["cpu-b"], "backend": "onnxruntime", "precisions": ["fp32", "int8"], "artifacts_dir": str(two_pools["cpu-b"] / "cache")},
    ]}))
    store = f"s3://{s3['BUCKET']}/team"
    argv = ["--config", str(config), "--store", store, "--artifacts-dir", str(root), *TINY]
    first = trtflow(prefect_server, *argv, cwd=tmp_path, env=s3)
    logs = "\n".join((prefect_server.home / f"worker-{n}.log").read_text(errors="replace")[-3000:] for n in POOLS)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:] + logs
    report = json.loads((root / "report.json").read_text())
    # One report, a row per target and precision, each verified where its target ran.
    assert set(report["precisions"]) == {"cpu-a/fp32", "cpu-b/fp32", "cpu-b/int8"}
    assert report["passed"] and all(r["passed"] and r["samples"] > 0 for r in report["precisions"].values())
    assert report["precisions"]["cpu-b/int8"]["compute"]["precision"] == "int8"
    assert {n: t["state"] for n, t in report["targets"].items()} == {"cpu-a": "Completed", "cpu-b": "Completed"}
    assert {n: t["pool"] for n, t in report["targets"].items()} == POOLS
    # The parent made only what no machine changes: nothing of an engine.
    assert {t.split("-")[0] for t in report["tasks"]} == {"data", "train", "export", "validate", "precision"}
    assert "cpu-b/int8" in first.stdout and "target cpu-b: pool trtflow-target-b, Completed" in first.stdout

    with Api(prefect_server) as api:
        built = []
        # Each target run found the parent's shared artifacts: its data, train and export came back Cached.
        for name, t in report["targets"].items():
            states = api.task_states(t["flow_run"])
            assert {s for stage in ("data", "train", "export") for s in states[stage]} == {"Cached"}, (name, states)
            assert len(states["build"]) == len(states["verify"]) == {"cpu-a": 1, "cpu-b": 2}[name], (name, states)
            built += states["build"]
            # ... and ran on its own pool's worker
            fr = api.client.read_flow_run(t["flow_run"])
            assert fr.work_pool_name == POOLS[name]
        # The engines were built by the targets. Both "machines" here have the same CPU and ONNX Runtime,
        # so their fp32 engines have one key (the backend's environment is in it): the second finds the first's.
        assert built.count("Completed") >= 2
        # The artifacts are in the bucket, the parent's and the targets' reports too; each machine has its own local folder.
        from _s3_kit import client_of

        client = client_of(s3["AWS_ENDPOINT_URL"])
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3["BUCKET"], Prefix="team/") for o in page.get("Contents", [])]
        for stage in ("train", "export", "precision", "build", "verify"):
            assert any(k.startswith(f"team/{stage}/") and k.endswith("manifest.json") for k in keys), stage
        assert {f"team/reports/targets/{t['flow_run']}.json" for t in report["targets"].values()} <= set(keys)
        assert all((two_pools[name] / "cache" / "report.json").is_file() for name in POOLS)

        again = trtflow(prefect_server, *argv, cwd=tmp_path, env=s3)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        rerun = json.loads((root / "report.json").read_text())
        assert rerun["report"] != report["report"] and set(rerun["tasks"].values()) == {"Cached"}
        for name, t in rerun["targets"].items():
            assert t["flow_run"] != report["targets"][name]["flow_run"]
            states = api.task_states(t["flow_run"])
            assert {s for v in states.values() for s in v} == {"Cached"}, (name, states)


@pytest.mark.slow
def test_a_target_without_its_deployment_fails_in_one_line_naming_the_command(prefect_server: Server, two_pools: dict[str, Path], tmp_path: Path) -> None:
    res = trtflow(prefect_server, "--targets", "gpu-x=nowhere:onnxruntime:fp32", "--artifacts-dir", str(tmp_path / "a"), *TINY, cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-2000:]
    line = next((ln for ln in res.stderr.splitlines() if "ConfigError" in ln), res.stderr[-3000:])
    assert "target gpu-x: no deployment trtflow/target-gpu-x" in line and "Traceback" not in res.stderr
    assert "prefect deploy flows/pipeline.py:pipeline --name target-gpu-x --pool nowhere" in res.stderr
    # before any work: nothing was trained
    assert not (tmp_path / "a" / "train").exists()


def test_the_portable_graph_is_everything_no_machine_changes() -> None:
    from flows.pipeline import GRAPH
    from tasks.graph import Config, Derived, Graph, Node

    # Derived from the declarations: build reads config.backend; verify, repair, profile and package follow it.
    assert GRAPH.device_bound() == {("build", True), ("verify", True), ("repair", True), ("profile", True), ("package", False)}
    assert [n.name for n in GRAPH.portable().nodes] == ["data", "train", "export", "validate", "precision", "validate"]

    def fn(**_: object) -> None: ...

    toy = Graph(
        Node("a", fn, {}),
        Node("b", fn, {"x": Derived(lambda b: b, (Config("backend"),))}),  # reads the backend through a Derived
        Node("c", fn, {"a": "a"}),
        Node("d", fn, {"a": "a"}, after=("b",)),  # only waits for a device-bound node: bound too
        Node("e", fn, {"c": "c", "o": Config("engine")}),
    )
    assert toy.device_bound() == {("b", False), ("d", False)}
    assert [n.name for n in toy.portable().nodes] == ["a", "c", "e"]


def test_targets_parse_from_the_command_line_form() -> None:
    from tasks.config import PipelineConfig, Precision, parse_targets
    from tasks.errors import ConfigError

    cfg = PipelineConfig(targets=parse_targets("gpu-h100=h100:tensorrt:fp16,int8; cpu=cpu-pool::fp32,int8"))
    assert [(t.name, t.pool, t.backend.value, [p.value for p in t.precisions]) for t in cfg.targets] == [
        ("gpu-h100", "h100", "tensorrt", ["fp16", "int8"]), ("cpu", "cpu-pool", "auto", ["fp32", "int8"])]
    assert cfg.targets[0].deployment_name == "trtflow/target-gpu-h100"
    # the parent makes the variants of every target's precisions, once each
    assert cfg.target_precisions == [Precision.fp16, Precision.int8, Precision.fp32]
    for bad, says in (("gpu=h100:tensorrt", "NAME=POOL:BACKEND:PRECISIONS"), ("gpu=h100:cuda:fp16", "backend 'cuda'"), ("gpu=h100:tensorrt:fp64", "fp64")):
        with pytest.raises(ConfigError, match=says):
            parse_targets(bad)
    with pytest.raises(ValueError, match="each name once"):
        PipelineConfig(targets=parse_targets("a=p:onnxruntime:fp32 a=q:onnxruntime:int8"))
    with pytest.raises(ValueError, match="target name"):
        PipelineConfig(targets=[{"name": "GPU H100", "pool": "p", "precisions": ["fp32"]}])


def test_a_target_that_left_no_report_is_a_failed_row_per_precision_never_a_gap(tmp_path: Path, trained) -> None:  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    from flows.targets import failed_targets, target_config, targets_report
    from tasks.config import PipelineConfig, parse_targets
    from tasks.store import store_for

    cfg = PipelineConfig(artifacts_dir=tmp_path, targets=parse_targets("a=pa:onnxruntime:fp32 b=pb:onnxruntime:fp32,int8"))
    ok = SimpleNamespace(id="1111", state=SimpleNamespace(name="Completed", message=None))
    crashed = SimpleNamespace(id="2222", state=SimpleNamespace(name="Crashed", message="worker lost"))
    verified = {"passed": True, "backend": "onnxruntime", "report": "reports/run-x.json", "precisions": {"fp32": {"passed": True, "samples": 9}}}
    shared = {"data": trained.data, "train": trained.checkpoint, "export": trained.onnx}
    report, error = targets_report(cfg, store_for(None, tmp_path), shared, {"a": ok, "b": crashed}, {"a": verified, "b": None}, {"data": "Cached"})
    assert report["model"]["factory"] == trained.config.train.model and report["data"]["sizes"] == trained.data.meta["sizes"]
    assert report["precisions"]["a/fp32"] == {"passed": True, "samples": 9}
    assert {k: r["passed"] for k, r in report["precisions"].items()} == {"a/fp32": True, "b/fp32": False, "b/int8": False}
    assert "Crashed: worker lost" in report["precisions"]["b/int8"]["error"] and report["passed"] is False
    assert report["targets"]["b"] == {"pool": "pb", "deployment": "trtflow/target-b", "flow_run": "2222", "state": "Crashed", "passed": False, "error": "Crashed: worker lost"}
    assert json.loads((tmp_path / "report.json").read_text()) == report
    err = failed_targets(report)
    assert err is not None and "b/fp32, b/int8" in str(err) and "b: Crashed" in str(err) and str(error) == str(err)
    assert failed_targets({**report, "precisions": {"a/fp32": {"passed": True}}, "targets": {"a": {"state": "Completed", "passed": True}}}) is None

    # A target's run: its backend and precisions, absolute paths (its worker starts elsewhere), no targets of its own.
    child = target_config(PipelineConfig(**{**cfg.model_dump(), "artifacts_dir": Path("rel"), "refresh": ["train", "build"]}), cfg.targets[1], Path("rel"), frozenset({"build", "verify"}))
    assert (child.target, child.backend.value, [p.value for p in child.precisions], child.targets) == ("b", "onnxruntime", ["fp32", "int8"], [])
    assert child.artifacts_dir.is_absolute()
    # --refresh train is the parent's to redo (once for all targets); build is each target's
    assert [s.value for s in child.refresh] == ["build"]


def test_a_target_with_its_own_folder_reads_the_parents_local_store(tmp_path: Path) -> None:
    from flows.targets import read_target_report, target_config, target_report_name
    from tasks.config import PipelineConfig, parse_targets
    from tasks.stores.local import LocalStore

    cfg = PipelineConfig(artifacts_dir=tmp_path / "parent", targets=parse_targets("a=pa:onnxruntime:fp32"))
    own = cfg.model_copy(update={"targets": [cfg.targets[0].model_copy(update={"artifacts_dir": tmp_path / "machine-a"})]})
    child = target_config(own, own.targets[0], tmp_path / "parent")
    assert child.artifacts_dir == tmp_path / "machine-a" and child.store == str(tmp_path / "parent")
    assert target_config(cfg, cfg.targets[0], tmp_path / "parent").store is None  # the same folder: the local store there
    bucket = own.model_copy(update={"store": "s3://bucket/team"})
    assert target_config(bucket, bucket.targets[0], tmp_path / "parent").store == "s3://bucket/team"
    # The report a target leaves is a side file of that store, where the parent reads it.
    LocalStore(tmp_path / "parent", tmp_path / "machine-a").put(target_report_name("r1"), b'{"passed": true}')
    assert read_target_report(LocalStore(tmp_path / "parent"), "r1") == {"passed": True}
    assert read_target_report(LocalStore(tmp_path / "parent"), "r2") is None
