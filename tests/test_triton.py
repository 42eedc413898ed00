"""Triton checks the bundles itself: its schema parses config.pbtxt, a real tritonserver accepts the
generated configs (and refuses a mutated one), and the shipped ONNX file, served through a
Python-backend model, answers exactly what the bundle says it verified.

    pytest tests/test_triton.py -q

The server is Triton 2.51 from the ``nvidia-pytriton`` 0.7.0 wheel, unpacked into a cache folder, never
installed (see tests/_triton_kit.py); without it the server tests skip and say why. It runs in
explicit model-control mode, so one server per session loads every case (about 2 s to start).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _triton_kit import TritonServer, python_backend, python_model_from_bundle, tritonserver_home
from tasks.backends.base import EngineInfo
from tasks.triton import config_problems, config_text, model_of_engine, parsed_config

#: a TensorRT build record as the build worker writes it (tasks/backends/_trt_build.py), plan IO included:
#: the two-input text model, fp16 plan, profile 1/32/256
TRT_INFO = {
    "backend": "tensorrt",
    "engine_file": "engine.plan",
    "batch": {"min": 1, "opt": 32, "max": 256},
    "precision": "fp16",
    "inputs": [{"name": "input_ids", "dtype": "INT64", "shape": [-1, 12]}, {"name": "attention_mask", "dtype": "INT64", "shape": [-1, 12]}],
    "outputs": [{"name": "embedding", "dtype": "FLOAT", "shape": [-1, 4]}, {"name": "logits", "dtype": "HALF", "shape": [-1, 3]}],
    "environment": {"tensorrt": "10.13.0.35", "gpu": "NVIDIA H200", "compute_capability": "9.0"},
    "engine_io": [
        {"name": "input_ids", "mode": "input", "dtype": "INT64", "shape": [-1, 12], "profile": {"min": [1, 12], "opt": [32, 12], "max": [256, 12]}},
        {"name": "attention_mask", "mode": "input", "dtype": "INT64", "shape": [-1, 12], "profile": {"min": [1, 12], "opt": [32, 12], "max": [256, 12]}},
        {"name": "embedding", "mode": "output", "dtype": "FLOAT", "shape": [-1, 4]},
        {"name": "logits", "mode": "output", "dtype": "HALF", "shape": [-1, 3]},
    ],
}


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory):
    """One tritonserver for the session (explicit model control), with a Python backend for this Python."""
    home, why = tritonserver_home()
    if home is None:
        pytest.skip(f"no Triton server: {why}")
    where = tmp_path_factory.mktemp("triton")
    backends, why = python_backend(home, where)
    if backends is None:
        pytest.skip(f"no Python backend: {why}")
    repo = where / "repository"
    repo.mkdir()
    # The served model.py reads numpy and onnxruntime from this environment (the stub ignores PYTHONPATH).
    server = TritonServer(home, backends, repo, where / "server.log", env={"TRTFLOW_TRITON_SITE": str(Path(np.__file__).parents[1])})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _model_dir(bundle_dir: Path) -> Path:
    b = json.loads((bundle_dir / "bundle.json").read_text())
    return bundle_dir / Path(b["shipped"]["config"]).parent


def _copy_as(src: Path, repo: Path, name: str) -> Path:
    dest = repo / name
    shutil.copytree(src, dest)
    text = (dest / "config.pbtxt").read_text()
    old = next(line for line in text.splitlines() if line.startswith("name: "))
    (dest / "config.pbtxt").write_text(text.replace(old, f'name: "{name}"', 1))
    return dest


def assert_accepted(bundle_dir: Path, triton: TritonServer, name: str) -> None:
    """Triton core checks the config first: an accepted one stops only at the missing onnxruntime backend."""
    _copy_as(_model_dir(bundle_dir), triton.repository, name)
    error = triton.load(name)
    assert error is not None and "unable to find backend library for backend 'onnxruntime'" in error, error
    assert f"Poll failed for model directory '{name}'" not in triton.log.read_text()


def assert_served_as_verified(bundle_dir: Path, triton: TritonServer, name: str) -> None:
    """The bundle's config with ``backend: "python"`` (warm-up with the real sample included), its
    model.onnx run by ONNX Runtime inside Triton, queried over HTTP with tritonclient: the answers are
    the bundle's verified outputs."""
    import tritonclient.http as http

    served = python_model_from_bundle(bundle_dir, triton.repository, name)
    b = json.loads((bundle_dir / "bundle.json").read_text())
    assert (served / "1" / "model.onnx").read_bytes() == (bundle_dir / b["shipped"]["model_file"]).read_bytes()
    error = triton.load(name)
    assert error is None, f"{error}\n{triton.log.read_text()[-3000:]}"
    with np.load(bundle_dir / b["samples"]["file"]) as z:
        feed = {n: z[k] for n, k in b["samples"]["inputs"].items()}
        verified = {n: z[k] for n, k in b["samples"]["outputs"].items()}
    client = http.InferenceServerClient(triton.url, network_timeout=120)
    try:
        inputs = []
        for n, arr in feed.items():
            inp = http.InferInput(n, list(arr.shape), {"float32": "FP32", "int64": "INT64", "int32": "INT32", "bool": "BOOL"}[str(arr.dtype)])
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        result = client.infer(name, inputs, outputs=[http.InferRequestedOutput(n, binary_data=True) for n in verified])
        client.unload_model(name)
    finally:
        client.close()
    assert len(next(iter(feed.values()))) > 1  # a real batch, not one sample
    for n, want in verified.items():
        got = result.as_numpy(n)
        assert got.shape == want.shape and got.dtype == want.dtype
        # Bit for bit: the same file, ONNX Runtime version, thread count and batch as when the bundle was made.
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["image", "text"])
def test_the_generated_config_parses_with_tritons_schema(kind, request):
    bundle = request.getfixturevalue(f"{kind}_bundle")
    config = parsed_config((_model_dir(bundle.dir) / "config.pbtxt").read_text())
    assert config_problems(config) == []
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == bundle.config.batch.max
    assert list(config.dynamic_batching.preferred_batch_size) == [bundle.config.batch.opt]
    if kind == "text":
        from tasks.triton import model_config_schema

        int64 = model_config_schema().DataType.Value("TYPE_INT64")
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("input_ids", int64, [10]), ("attention_mask", int64, [10])]
        assert [list(o.dims) for o in config.output] == [[3], [12]]


@pytest.mark.parametrize("kind", ["image", "text"])
def test_tritonserver_accepts_the_generated_config(kind, request, triton):
    assert_accepted(request.getfixturevalue(f"{kind}_bundle").dir, triton, f"accept_{kind}")


def test_tritonserver_refuses_a_preferred_batch_above_the_max(image_bundle, triton):
    dest = _copy_as(_model_dir(image_bundle.dir), triton.repository, "mutated")
    text = (dest / "config.pbtxt").read_text()
    mbs = image_bundle.config.batch.max
    (dest / "config.pbtxt").write_text(text.replace(f"preferred_batch_size: [ {image_bundle.config.batch.opt} ]", f"preferred_batch_size: [ {mbs * 2} ]"))
    assert f"preferred_batch_size: [ {mbs * 2} ]" in (dest / "config.pbtxt").read_text()
    error = triton.load("mutated")
    assert error is not None
    assert "dynamic batching preferred size must be <= max batch size for mutated" in triton.log.read_text()
    # ... and the package-time check names the same problem without a server.
    assert any("must be <= max batch size" in p for p in config_problems(parsed_config((dest / "config.pbtxt").read_text())))


@pytest.mark.parametrize("kind", ["image", "text"])
def test_the_shipped_onnx_file_served_by_triton_answers_the_verified_outputs(kind, request, triton):
    assert_served_as_verified(request.getfixturevalue(f"{kind}_bundle").dir, triton, f"serve_{kind}")


def test_the_warmup_request_is_a_real_sample_triton_reads(image_bundle, triton):
    """Triton runs model_warmup at load: the bundle's sample file has exactly one input's bytes, a cut one is refused."""
    served = python_model_from_bundle(image_bundle.dir, triton.repository, "warm_cut")
    sample = served / "warmup" / "input_0"
    assert sample.stat().st_size == 3 * 32 * 32 * 4
    sample.write_bytes(sample.read_bytes()[:-4])
    error = triton.load("warm_cut")
    assert error is not None and "warmup" in error.lower(), error


#: engine.json files that benchmarks/plan_bundle_check.py wrote on a GPU machine (real plans' records)
RECORDED = sorted((Path(__file__).parent / "data" / "trt-engines").glob("*.json"))


def _warmup_feed(info: EngineInfo) -> dict[str, np.ndarray]:
    from tasks.triton import NUMPY_TYPES, engine_io, triton_type

    return {n: np.zeros([2 if i == 0 and d < 0 else max(d, 1) for i, d in enumerate(shape)], NUMPY_TYPES[triton_type(t, n)]) for n, t, shape in engine_io(info).inputs}


@pytest.mark.parametrize("record", [TRT_INFO, *RECORDED], ids=["worker-record", *(p.stem for p in RECORDED)])
def test_a_plan_config_from_the_plans_own_metadata_is_accepted(record, tmp_path, triton):
    """The TensorRT path: config.pbtxt from a plan's engine IO (as the build worker reads it back from the
    deserialized plan) parses, and tritonserver accepts it up to the missing tensorrt backend."""
    from tasks.package import write_model_repository

    info = EngineInfo.model_validate(record if isinstance(record, dict) else json.loads(record.read_text()))
    name = f"plan_{len(list(triton.repository.iterdir()))}"
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not a real plan: Triton checks the config before it loads the file")
    model = write_model_repository(triton.repository, name, info, plan, _warmup_feed(info))
    text = (triton.repository / name / "config.pbtxt").read_text()
    assert 'platform: "tensorrt_plan"' in text and "kind: KIND_GPU" in text
    assert (triton.repository / name / "1" / "model.plan").read_bytes() == plan.read_bytes()
    if record is TRT_INFO:
        assert "deserialized plan" in text and model.max_batch_size == 256 and model.preferred_batch_sizes == (32,)
        assert [(t.name, t.data_type, t.dims) for t in model.outputs] == [("embedding", "TYPE_FP32", (4,)), ("logits", "TYPE_FP16", (3,))]
    error = triton.load(name)
    assert error is not None and "unable to find backend library for backend 'tensorrt'" in error, error


def test_the_plans_own_profile_wins_over_the_build_record():
    """engine_io is what the plan says: its profile max, not the configured batch, sets max_batch_size."""
    info = EngineInfo.model_validate({**TRT_INFO, "batch": {"min": 1, "opt": 8, "max": 64}})
    model = model_of_engine(info, "m")
    assert model.max_batch_size == 256 and model.preferred_batch_sizes == (32,)
    without = EngineInfo.model_validate({**TRT_INFO, "engine_io": None, "batch": {"min": 1, "opt": 8, "max": 64}})
    fallback = model_of_engine(without, "m")
    assert fallback.max_batch_size == 64 and "network" in fallback.source
    assert "max_batch_size: 64" in config_text(fallback)


TESTS = Path(__file__).resolve().parent
#: the default job (bundled digits, the default CNN, default ship policy 'fastest' over the profile), small;
#: and the held-out two-input int64 text model. int8 is left to the flow tests (its 1-epoch variant fails).
JOBS = {
    "default": ["--epochs", "1", "--precisions", "fp32,fp16", "--min-batch", "1", "--opt-batch", "8", "--max-batch", "64"],
    "text": ["--model", "_bundle_kit:pooled_text", "--epochs", "3", "--lr", "0.01", "--precisions", "fp32,fp16", "--max-batch", "32", "--opt-batch", "4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("job", list(JOBS))
def test_trtflow_run_writes_a_bundle_that_check_bundle_and_triton_accept(job, tmp_path, triton):
    """`trtflow run` in a fresh process, then `trtflow check-bundle`, then Triton on the bundle it wrote."""
    from _bundle_kit import text_dataset

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PYTHONPATH=os.pathsep.join([str(TESTS.parent), str(TESTS)]))
    art = tmp_path / "art"
    extra = ["--dataset", str(text_dataset(tmp_path / "text.npz"))] if job == "text" else []
    run = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--artifacts-dir", str(art), *JOBS[job], *extra], capture_output=True, text=True, env=env, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    shipped = next(line for line in run.stdout.splitlines() if line.startswith("shipped: "))
    assert "fastest: " in shipped and f"bundle: {art / 'bundle'}" in run.stdout
    report = json.loads((art / "report.json").read_text())
    assert report["bundle"]["precision"] in ("fp32", "fp16") and shipped.startswith(f"shipped: {report['bundle']['precision']} ")
    check = subprocess.run([sys.executable, "-m", "flows.cli", "check-bundle", str(art / "bundle")], capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0 and "files match bundle.json" in check.stdout and "samples through onnxruntime" in check.stdout, check.stderr
    assert_accepted(art / "bundle", triton, f"cli_accept_{job}")
    assert_served_as_verified(art / "bundle", triton, f"cli_serve_{job}")


def test_the_platform_and_instance_kind_come_from_the_backends_spec():
    """A registered backend is served on the Triton platform its spec declares, on its device's kind."""
    from tasks.backends.base import BackendSpec
    from tasks.backends.onnxruntime import OnnxRuntimeBuilder
    from tasks.backends.registry import register_backend, unregister_backend
    from tasks.errors import BundleError
    from tasks.triton import platform_of

    info = EngineInfo.model_validate({**TRT_INFO, "engine_io": None, "backend": "ort-gpu"})
    for name, platform in (("ort-gpu", "onnxruntime_onnx"), ("unserved", None)):
        register_backend(BackendSpec(name=name, builder=OnnxRuntimeBuilder, device="gpu", native_precisions=frozenset({"fp32"}),
                                     engine_file="engine.onnx", engine_format="ONNX", triton_platform=platform))
    try:
        model = model_of_engine(info, "m")
        assert (model.platform, model.instance_kind) == ("onnxruntime_onnx", "KIND_GPU")
        assert "session's inputs" in model.source
        assert (platform_of("onnxruntime").instance_kind, platform_of("tensorrt").model_file) == ("KIND_CPU", "model.plan")
        with pytest.raises(BundleError, match="only those have a Triton platform") as error:
            model_of_engine(info.model_copy(update={"backend": "unserved"}), "m")
        assert "unserved" not in error.value.expected and "onnxruntime" in error.value.expected
        with pytest.raises(BundleError, match="a registered backend"):
            platform_of("nowhere")
    finally:
        unregister_backend("ort-gpu")
        unregister_backend("unserved")
