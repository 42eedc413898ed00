"""The backend registry: every backend is one spec of capabilities; stages ask those, never the name."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tasks.backends import registry
from tasks.backends.base import BackendSpec, BuildResult
from tasks.backends.onnxruntime import ENGINE_FILE, OnnxRuntimeBuilder
from tasks.backends.registry import backend_spec, backends, builder_for, choose_backend, register_backend, unregister_backend
from tasks.config import BatchProfile, Precision
from tasks.errors import BackendUnavailableError

TOY_FILE = "toy-engine.onnx"


class ToyBuilder(OnnxRuntimeBuilder):
    """ONNX Runtime under another name, writing its engine under its own file name; counts its builds."""

    name = "toy"
    builds: list[str] = []

    def engine_from_onnx(self, onnx_path: Path, out_dir: Path, batch: Any, options: Any, shapes: Any = None) -> BuildResult:
        result = super().engine_from_onnx(onnx_path, out_dir, batch, options, shapes)
        shutil.move(out_dir / result.engine_file, out_dir / TOY_FILE)
        ToyBuilder.builds.append(Path(onnx_path).parent.name)
        return BuildResult(TOY_FILE, {**result.info, "backend": self.name})


#: unlike ONNX Runtime, the toy claims to compute fp16 natively: verify must then skip the fp16 emulation
TOY = BackendSpec(
    name="toy", builder=ToyBuilder, device="cpu", native_precisions=frozenset({"fp32", "fp16"}),
    engine_file=TOY_FILE, engine_format="ONNX (toy)", label="Toy", version_key="onnxruntime",
)


@pytest.fixture
def toy() -> Iterator[BackendSpec]:
    register_backend(TOY)
    ToyBuilder.builds.clear()
    try:
        yield TOY
    finally:
        unregister_backend(TOY.name)


def test_the_registry_lists_each_backends_capabilities():
    listed = {s.name: s for s in backends()}
    assert {"onnxruntime", "tensorrt"} <= set(listed)
    ort, trt = listed["onnxruntime"], listed["tensorrt"]
    assert (ort.device, ort.native_precisions, ort.engine_file, ort.timing_cache) == ("cpu", frozenset({"fp32", "int8"}), ENGINE_FILE, False)
    assert (trt.device, trt.native_precisions, trt.engine_file, trt.timing_cache) == ("gpu", frozenset({"fp32", "fp16", "bf16", "int8"}), "engine.plan", True)
    # What the stages derive from them.
    assert (ort.host_memory, ort.torch_device, trt.host_memory, trt.torch_device) == (True, "cpu", False, "cuda")
    assert not ort.runs_natively(Precision.fp16) and not ort.runs_natively(Precision.bf16) and ort.runs_natively(Precision.int8)
    assert trt.runs_natively("fp16") and trt.runs_natively(Precision.bf16)
    assert trt.portable_keys and not ort.portable_keys
    # auto tries TensorRT first; ONNX Runtime is the fallback.
    assert trt.auto is not None and ort.auto is not None and trt.auto < ort.auto
    assert builder_for("onnxruntime").name == "onnxruntime" and builder_for("tensorrt").name == "tensorrt"


def test_unknown_names_and_duplicates_are_refused(toy):
    with pytest.raises(BackendUnavailableError) as info:
        backend_spec("nope")
    assert "nope" in info.value.got and "toy" in info.value.expected and "onnxruntime" in info.value.expected
    with pytest.raises(BackendUnavailableError):
        builder_for("auto")
    with pytest.raises(ValueError, match="already registered"):
        register_backend(BackendSpec(name="toy", builder=ToyBuilder, device="gpu", native_precisions=frozenset(), engine_file="x", engine_format="x"))
    register_backend(toy)  # the same spec again: nothing changes
    with pytest.raises(ValueError, match="auto"):
        register_backend(BackendSpec(name="auto", builder=ToyBuilder, device="cpu", native_precisions=frozenset(), engine_file="x", engine_format="x"))
    unregister_backend("toy")
    assert "toy" not in {s.name for s in backends()}


def test_a_builder_must_answer_to_its_specs_name():
    register_backend(BackendSpec(name="renamed", builder=ToyBuilder, device="cpu", native_precisions=frozenset(), engine_file=TOY_FILE, engine_format="x"))
    try:
        with pytest.raises(ValueError, match="calls itself 'toy'"):
            builder_for("renamed")
    finally:
        unregister_backend("renamed")


def test_auto_takes_the_first_available_backend_in_rank_order(monkeypatch):
    monkeypatch.setattr(ToyBuilder, "availability", lambda self: None)
    register_backend(BackendSpec(name="toy", builder=ToyBuilder, device="cpu", native_precisions=frozenset({"fp32"}),
                                 engine_file=TOY_FILE, engine_format="x", label="Toy", auto=-1, present="the toy is always here"))
    try:
        builder, why = choose_backend("auto")
        assert builder.name == "toy" and why == "auto: the toy is always here"
        monkeypatch.setattr(ToyBuilder, "availability", lambda self: "no toys today")
        builder, why = choose_backend("auto")
        assert builder.name != "toy" and "Toy cannot run here (no toys today)" in why
        with pytest.raises(BackendUnavailableError, match="no toys today") as info:
            choose_backend("toy")
        assert "--backend auto" in info.value.fix
    finally:
        unregister_backend("toy")


def test_profile_and_memory_fitting_ask_the_device_not_the_name(toy):
    from tasks.engine import batch_for_memory
    from tasks.profile import _torch_device

    gpu = BackendSpec(name="toy-gpu", builder=ToyBuilder, device="gpu", native_precisions=frozenset({"fp32"}), engine_file=TOY_FILE, engine_format="x")
    register_backend(gpu)
    try:
        def engine(backend: str) -> Any:
            return SimpleNamespace(meta={"backend": backend, "engine_file": TOY_FILE, "batch": {"min": 1, "opt": 8, "max": 64}, "inputs": [], "outputs": []})

        assert _torch_device(engine("toy-gpu")) == "cuda" and _torch_device(engine("toy")) == "cpu"
        big = SimpleNamespace(digest="d", meta={"memory_plan": {"activation_per_sample": 27 << 20}})
        profile = BatchProfile(min=1, opt=8, max=64, cpu_memory_mib=512)
        assert batch_for_memory(profile, "toy-gpu", big) == profile  # device memory: kept
        assert batch_for_memory(profile, "toy", big).max < 64  # host memory: fitted
    finally:
        unregister_backend("toy-gpu")


def test_a_registered_toy_backend_runs_the_pipeline_with_no_other_edit(toy, tmp_path):
    import _pipeline_kit as kit
    from tasks.config import ProfileConfig

    data = kit.tiny_dataset(tmp_path / "tiny.npz", per_class=20)
    cfg = kit.tiny_config(tmp_path / "art", data, backend="toy", precisions=[Precision.fp32, Precision.fp16],
                          profile=ProfileConfig(min_seconds=0.0, min_iterations=2, max_seconds=0.05, warmup=0))
    refs = kit.run_plain(cfg)
    assert len(ToyBuilder.builds) == 2  # its builder made both engines
    for p in ("fp32", "fp16"):
        build = refs[f"build-{p}"]
        assert build.meta["backend"] == "toy" and build.meta["engine_file"] == TOY_FILE and build.path(TOY_FILE).is_file()
        assert refs[f"profile-{p}"].meta["torch"]["device"] == "cpu"
    # Its declared capability decides the numerics verify checks: native fp16, where ONNX Runtime's is emulated.
    assert refs["verify-fp16"].meta["numerics"] == "native fp16"
    assert refs["verify-fp32"].meta["backend"] == "toy"


def test_an_engine_written_elsewhere_than_the_spec_says_is_refused(toy, trained, tmp_path, monkeypatch):
    from tasks.engine import engine_from_variant
    from tasks.precision import variant_from_onnx

    monkeypatch.setitem(registry._REGISTRY, "toy", BackendSpec(**{**toy.__dict__, "engine_file": "elsewhere.onnx"}))
    variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp32, 16, tmp_path)
    with pytest.raises(ValueError, match="wrote toy-engine.onnx, its spec says elsewhere.onnx"):
        engine_from_variant(variant, "toy", BatchProfile(min=1, opt=2, max=4), {"threads": 1}, tmp_path)


def test_a_registered_backends_own_source_is_part_of_its_engines_key(toy):
    import hashlib

    from tasks.engine import _environment

    env = _environment({"backend": "toy"})
    assert env["backend_code"] == hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
    assert "backend_code" not in _environment({"backend": "onnxruntime"})  # the project's code is hashed as ``code``


def test_only_a_backend_with_a_timing_cache_is_given_the_stores_cache_folder(toy, trained, tmp_path, monkeypatch):
    from tasks.engine import engine_from_variant
    from tasks.precision import variant_from_onnx

    seen: list[dict[str, Any]] = []
    build = ToyBuilder.engine_from_onnx

    def recording(self: ToyBuilder, onnx_path: Path, out_dir: Path, batch: Any, options: Any, shapes: Any = None) -> BuildResult:
        seen.append(dict(options))
        return build(self, onnx_path, out_dir, batch, options, shapes)

    monkeypatch.setattr(ToyBuilder, "engine_from_onnx", recording)
    variant = variant_from_onnx(trained.onnx, trained.data, Precision.fp32, 16, tmp_path)
    batch = BatchProfile(min=1, opt=2, max=4)
    engine_from_variant(variant, "toy", batch, {"threads": 1}, tmp_path)
    monkeypatch.setitem(registry._REGISTRY, "toy", BackendSpec(**{**toy.__dict__, "timing_cache": True}))
    engine_from_variant(variant, "toy", batch, {"threads": 1}, tmp_path, refresh=True)
    assert "timing_cache_dir" not in seen[0]
    assert Path(seen[1]["timing_cache_dir"]) == tmp_path / ".cache" / "toy"
