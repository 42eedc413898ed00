"""The whole flow against an S3 store (moto's server: the real S3 HTTP API): two runs, two machines.

A "machine" is an artifacts folder (its local read cache and report); both share one bucket.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

pytest.importorskip("obstore")
pytest.importorskip("moto.server")

from test_pipeline import task_states  # noqa: E402

from flows.pipeline import pipeline  # noqa: E402
from tasks.config import Precision  # noqa: E402

pytestmark = pytest.mark.usefixtures("prefect_harness")

@pytest.fixture
def bucket(s3_bucket):
    """A fresh bucket; the AWS variables point at the server. Returns (boto3 client, bucket name)."""
    return s3_bucket


def _run(config):
    state = pipeline(config, return_state=True)
    assert state.is_completed(), state.message
    report = json.loads((config.artifacts_dir / "report.json").read_text())
    return report, task_states(state, report)


def test_a_run_against_s3_is_cached_on_rerun_and_on_a_second_machine(bucket, tiny_config, tmp_path):
    client, name = bucket
    url = f"s3://{name}/team"

    def tiny_config_for(folder, **update):
        return tiny_config.model_copy(update={"artifacts_dir": folder, **update})
    first, states = _run(tiny_config_for(tmp_path / "a", store=url, precisions=[Precision.fp32, Precision.int8]))
    assert first["passed"] and first["store"] == url and all("Cached" not in c for c in states.values()), states
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=name)["Contents"]}
    # Artifacts, records and reports live in the bucket ...
    for stage in ("data", "train", "export", "precision", "build", "verify", "profile", "package"):
        assert any(k.startswith(f"team/{stage}/") and k.endswith("/manifest.json") for k in keys), stage
    assert {"team/report.json", f"team/{first['report']}", "team/reports/verify-int8.json", "team/train/.last-train.json"} <= keys
    stored = json.loads(client.get_object(Bucket=name, Key="team/report.json")["Body"].read())
    assert stored["report"] == first["report"]
    # ... and the local folder holds this run's report and the read cache, no artifact folders.
    local = tmp_path / "a"
    assert (local / first["report"]).is_file() and (local / first["precisions"]["fp32"]["engine"]).is_file()
    assert not (local / "train").exists() and not (local / "build").exists()

    again, states = _run(tiny_config_for(tmp_path / "a", store=url, precisions=[Precision.fp32, Precision.int8]))
    assert again["passed"] and set(Counter(again["tasks"].values())) == {"Cached"}, again["tasks"]
    assert all(set(c) == {"Cached"} for c in states.values()), states

    # Another machine: its own (empty) local folder, the same bucket. Nothing is computed there.
    other, states = _run(tiny_config_for(tmp_path / "b", store=url, precisions=[Precision.fp32, Precision.int8]))
    assert other["passed"] and set(Counter(other["tasks"].values())) == {"Cached"}, other["tasks"]
    assert other["precisions"]["int8"]["max_abs"] == first["precisions"]["int8"]["max_abs"]
    assert (tmp_path / "b" / "report.json").is_file() and (tmp_path / "b" / other["report"]).is_file()


def test_a_machine_killed_in_a_stage_is_resumed_by_another_machine_there(bucket, tmp_path, monkeypatch):
    """Machine A (a child process) is SIGKILLed while it trains; machine B, with its own local folder,
    runs the same config on the same bucket: it waits out A's lease, trains, and reuses A's data."""
    import os
    import signal
    import time

    import _pipeline_kit as kit

    client, name = bucket
    url = f"s3://{name}/team"
    dataset = kit.tiny_dataset(tmp_path / "tiny.npz")
    a = kit.tiny_config(tmp_path / "machine-a", dataset).model_copy(update={"store": url})
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    child = kit.start_child(a, **env, TRTFLOW_S3_LEASE_S="4")

    def keys() -> list[str]:
        return [o["Key"] for o in client.list_objects_v2(Bucket=name, Prefix="team/").get("Contents", [])]

    try:
        # Killed once it holds the train lease (data is committed by then), before train commits.
        deadline = time.monotonic() + 120
        while not any(k.startswith("team/train/.leases/") for k in keys()) and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.communicate(timeout=60)
    assert child.returncode == -signal.SIGKILL, "machine A finished before it could be killed"
    data_manifests = [k for k in keys() if k.startswith("team/data/") and k.endswith("/manifest.json")]
    assert len(data_manifests) == 1 and not [k for k in keys() if k.startswith("team/train/") and k.endswith("/manifest.json")]
    etag = client.head_object(Bucket=name, Key=data_manifests[0])["ETag"]

    monkeypatch.setenv("TRTFLOW_S3_LEASE_S", "4")
    b = a.model_copy(update={"artifacts_dir": tmp_path / "machine-b"})
    refs = kit.run_plain(b)
    assert all(r.problems() == [] for r in refs.values()) and refs["verify-int8"].meta["passed"]
    # B took A's data from the bucket (the manifest A wrote is untouched) and did the rest itself.
    assert client.head_object(Bucket=name, Key=data_manifests[0])["ETag"] == etag
    assert len([k for k in keys() if k.startswith("team/train/") and k.endswith("/manifest.json")]) == 1
