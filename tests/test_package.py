"""The package stage and check-bundle: what is shipped (only what passed, by the policy), what the bundle
holds (config from the engine's IO, digests, provenance, samples), and what check-bundle catches.

    pytest tests/test_package.py -q

Triton's own checks of the same bundles (schema, a real tritonserver, serving) are in tests/test_triton.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.backends.base import EngineInfo
from tasks.config import PipelineConfig, Precision, ShipConfig, check_ship_policy, parse_ship_policy
from tasks.errors import BundleError, ConfigError
from tasks.package import BUNDLE_JSON, Figures, check_bundle, choose, model_name
from tasks.triton import config_problems, config_text, model_of_engine, parsed_config, triton_type

ALL = ["fp32", "fp16", "int8"]
FIG = [
    Figures("fp32", 2_000_000, p50_ms=0.05, latency_batch=1, samples_per_s=30_000.0, throughput_batch=256),
    Figures("fp16", 1_000_000, p50_ms=0.07, latency_batch=1, samples_per_s=28_000.0, throughput_batch=256),
    Figures("int8", 600_000, p50_ms=0.04, latency_batch=1, samples_per_s=14_000.0, throughput_batch=256),
]


# --- the choice ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "shipped", "words"),
    [
        ("fastest", "fp32", "highest throughput at batch 256"),
        ("lowest-latency", "int8", "lowest p50 at batch 1"),
        ("smallest", "int8", "smallest engine file"),
        ("fp16", "fp16", "requested"),
        # int8 is quicker at batch 1 but slower in throughput; fp32 fits the budget and is the fastest within it
        ("latency-budget=0.06", "fp32", "p50 <= 0.06 ms"),
        ("latency-budget=0.045", "int8", "over budget: fp32, fp16"),
    ],
)
def test_each_policy_picks_by_its_own_figure(policy, shipped, words):
    chosen, reason = choose(FIG, policy, ALL)
    assert chosen == shipped and words in reason and reason.startswith(policy.split("=")[0])


def test_only_a_variant_that_passed_is_ever_chosen():
    passed = [f for f in FIG if f.precision != "int8"]  # int8 failed its gates
    chosen, reason = choose(passed, "lowest-latency", ALL)
    assert chosen == "fp32" and "not passed: int8" in reason
    with pytest.raises(BundleError, match="int8 did not pass its gates") as e:
        choose(passed, "int8", ALL)
    assert "--ship fp32" in e.value.summary
    with pytest.raises(BundleError, match="was not built"):
        choose(passed, "int8", ["fp32", "fp16"])
    with pytest.raises(BundleError) as e:
        choose([], "fastest", ALL)
    assert e.value.summary.startswith("bundle: nothing to ship: no variant passed its gates") and len(e.value.summary) <= 150


def test_a_speed_policy_without_timings_and_an_unmet_budget_fail_with_the_fix():
    untimed = [FIG[0], Figures("fp16", 1_000_000, untimed="the speed profile is off (--no-profile)")]
    with pytest.raises(BundleError, match="fp16 has no timings") as e:
        choose(untimed, "fastest", ALL)
    assert "--ship smallest" in e.value.fix
    assert choose(untimed, "smallest", ALL)[0] == "fp16"  # needs no timings
    with pytest.raises(BundleError, match="within 0.01 ms") as e:
        choose(FIG, "latency-budget=0.01", ALL)
    assert "latency-budget=0.04" in e.value.fix


def test_policies_are_parsed_and_refused_before_any_work():
    assert parse_ship_policy("latency-budget=2.50") == ("latency-budget", 2.5)
    assert ShipConfig(policy="Latency-Budget=2.50").policy == "latency-budget=2.5"
    for bad in ("quickest", "latency-budget=0", "latency-budget=x", "fp64", "latency-budget=inf"):
        with pytest.raises(ValueError, match="ship policy"):
            ShipConfig(policy=bad)
    # Refused when the config is made (the CLI's flags, a config file, a deployment's parameters) ...
    with pytest.raises(ConfigError) as e:
        PipelineConfig.model_validate({"profile": {"enabled": False}, "ship": {"policy": "fastest"}})
    assert "--ship fastest needs the speed profile" in e.value.summary and "--no-package" in e.value.summary
    with pytest.raises(ConfigError) as e:
        PipelineConfig.model_validate({"precisions": ["fp32"], "ship": {"policy": "int8"}})
    assert "--precisions has no int8" in e.value.summary
    # ... and by the check itself, on a config changed without validation
    with pytest.raises(ConfigError, match="--ship int8 with --precisions fp32"):
        check_ship_policy(PipelineConfig(precisions=["fp32", "int8"], ship={"policy": "int8"}).model_copy(update={"precisions": [Precision.fp32]}))
    # No policy chosen and no profile: the smallest passed variant ships (the default compares speed).
    assert PipelineConfig.model_validate({"profile": {"enabled": False}}).ship.policy == "smallest"
    assert PipelineConfig.model_validate({}).ship.policy == "fastest"
    for fine in ({"profile": {"enabled": False}}, {"profile": {"enabled": False}, "ship": {"policy": "smallest"}}, {"profile": {"enabled": False}, "ship": {"enabled": False}}, {}):
        check_ship_policy(PipelineConfig.model_validate(fine))


def test_the_cli_options_set_the_ship_config(capsys):
    from flows.cli import EXIT_USAGE, _parser, config_from_args, main

    cfg = config_from_args(_parser().parse_args(["run", "--ship", "latency-budget=3", "--bundle-name", "clf", "--no-package"]))
    assert (cfg.ship.policy, cfg.ship.name, cfg.ship.enabled) == ("latency-budget=3", "clf", False)
    assert config_from_args(_parser().parse_args(["run"])).ship.policy == "fastest"
    assert main(["run", "--ship", "quickest"]) == EXIT_USAGE
    assert "ship policy 'quickest'" in capsys.readouterr().err


def test_the_model_name_is_the_factorys_made_safe():
    assert model_name(PipelineConfig()) == "default_model"
    assert model_name(PipelineConfig.model_validate({"train": {"model": "pkg.mod:Make Net!"}})) == "Make_Net"
    assert model_name(PipelineConfig.model_validate({"ship": {"name": "clf-v2"}})) == "clf-v2"
    with pytest.raises(ValueError, match="model name"):
        ShipConfig(name="../up")


# --- config.pbtxt from an engine's IO -------------------------------------------------------------


def _info(**over):
    base = {
        "backend": "onnxruntime", "engine_file": "engine.onnx", "batch": {"min": 1, "opt": 16, "max": 64}, "threads": 2,
        "inputs": [{"name": "tokens", "dtype": "int32", "shape": [-1, -1]}, {"name": "keep", "dtype": "tensor(bool)", "shape": [-1, 7]}],
        "outputs": [{"name": "scores", "dtype": "float16", "shape": [-1, 5]}],
    }
    return EngineInfo.model_validate({**base, **over})


def test_types_dims_and_batching_come_from_the_engines_io():
    model = model_of_engine(_info(), "m")
    assert [(t.name, t.data_type, t.dims) for t in model.inputs] == [("tokens", "TYPE_INT32", (-1,)), ("keep", "TYPE_BOOL", (7,))]
    assert [(t.name, t.data_type, t.dims) for t in model.outputs] == [("scores", "TYPE_FP16", (5,))]
    assert (model.max_batch_size, model.preferred_batch_sizes, model.instance_kind) == (64, (16,), "KIND_CPU")
    text = config_text(model)
    cfg = parsed_config(text)
    assert config_problems(cfg) == [] and cfg.parameters["intra_op_thread_count"].string_value == "2"
    assert "dims: [ -1 ]" in text and "max_queue_delay_microseconds: 100" in text
    # A fixed batch axis: no batching, full shapes.
    static = model_of_engine(_info(inputs=[{"name": "x", "dtype": "float32", "shape": [4, 3]}], outputs=[{"name": "y", "dtype": "float32", "shape": [4, 2]}]), "m")
    assert static.max_batch_size == 0 and static.inputs[0].dims == (4, 3) and "dynamic_batching" not in config_text(static)
    assert config_problems(parsed_config(config_text(static))) == []
    tensorrt = model_of_engine(_info(backend="tensorrt", inputs=[{"name": "x", "dtype": "HALF", "shape": [-1, 3]}], outputs=[{"name": "y", "dtype": "BF16", "shape": [-1, 2]}]), "m")
    assert (tensorrt.platform, tensorrt.instance_kind, tensorrt.inputs[0].data_type, tensorrt.outputs[0].data_type) == ("tensorrt_plan", "KIND_GPU", "TYPE_FP16", "TYPE_BF16")
    with pytest.raises(BundleError, match="tensor 'q' of type FP8"):
        triton_type("FP8", "q")


def test_the_package_time_check_refuses_what_triton_core_refuses():
    good = config_text(model_of_engine(_info(), "m"))
    assert config_problems(parsed_config(good)) == []
    cases = {
        "preferred_batch_size: [ 16 ]": ("preferred_batch_size: [ 65 ]", "must be <= max batch size 64"),
        "data_type: TYPE_BOOL": ("data_type: TYPE_INVALID", "TYPE_INVALID"),
        "dims: [ 7 ]": ("dims: [ 0 ]", "must be > 0 or -1"),
        'name: "keep"': ('name: "tokens"', "input names repeat"),
    }
    for old, (new, problem) in cases.items():
        problems = config_problems(parsed_config(good.replace(old, new, 1)))
        assert problems and (problem is None or any(problem in p for p in problems)), (new, problems)
    with pytest.raises(BundleError, match="schema refuses"):
        parsed_config(good.replace("max_batch_size", "max_batch"))
    with pytest.raises(BundleError, match="schema refuses"):
        parsed_config(good.replace("KIND_CPU", "KIND_TPU"))


# --- the bundle a run writes ----------------------------------------------------------------------


def _bundle_json(bundle) -> dict:
    return json.loads((bundle.dir / BUNDLE_JSON).read_text())


def test_the_bundle_holds_the_verified_engine_and_its_record(image_bundle):
    b = _bundle_json(image_bundle)
    refs = image_bundle.refs
    engine = refs["build-fp32"]
    shipped = image_bundle.dir / b["shipped"]["model_file"]
    # The very file verify checked, byte for byte, and every file's digest is the file's.
    assert shipped.read_bytes() == engine.path("engine.onnx").read_bytes()
    assert b["shipped"]["model_file"] == "model_repository/default_model/1/model.onnx"
    files = {str(p.relative_to(image_bundle.dir)) for p in image_bundle.dir.rglob("*") if p.is_file()} - {BUNDLE_JSON}
    assert set(b["files"]) == files
    from tasks.artifacts import sha256_file

    assert all(sha256_file(image_bundle.dir / rel) == digest for rel, digest in b["files"].items())
    prov = b["provenance"]
    assert prov["dataset"]["sha256"] == refs["data"].meta["source"]["digest"]
    assert prov["model"]["factory"] == "tasks.models:default_model" and "tasks/models.py" in prov["model"]["project"] and len(prov["model"]["sha256"]) == 64
    assert prov["engine"]["backend"] == "onnxruntime" and prov["engine"]["backend_version"] == refs["build-fp32"].meta["environment"]["onnxruntime"]
    assert prov["config"]["ship"]["policy"] == "fp32" and "artifacts_dir" not in prov["config"] and prov["trtflow"]
    assert b["variants"]["fp32"]["gates"]["passed"] is True and b["variants"]["fp32"]["gates"]["tolerance"]["atol"] == 1e-4
    assert b["variants"]["fp32"]["chosen"] is True and b["choice"]["policy"] == "fp32"


def test_the_samples_are_real_test_inputs_with_the_engines_own_outputs(image_bundle):
    from tasks.data import split_inputs, split_labels
    from tasks.engine import runner_from_build

    b = _bundle_json(image_bundle)
    with np.load(image_bundle.dir / b["samples"]["file"], allow_pickle=False) as z:
        x, logits, labels = z[b["samples"]["inputs"]["x"]], z[b["samples"]["outputs"]["logits"]], z["labels"]
    n = b["samples"]["count"]
    data = image_bundle.refs["data"]
    assert n == len(x) == 8 and np.array_equal(x, split_inputs(data, "test", np.arange(n))["x"])
    assert np.array_equal(labels, split_labels(data, "test")[:n])
    with runner_from_build(image_bundle.refs["build-fp32"]) as runner:
        assert np.array_equal(runner.infer({"x": x})["logits"], logits)
    # Warm-up: the first sample's raw bytes, as config.pbtxt names them.
    model_dir = image_bundle.dir / "model_repository" / "default_model"
    assert (model_dir / "warmup" / "input_0").read_bytes() == x[0].tobytes()
    assert 'input_data_file: "input_0"' in (model_dir / "config.pbtxt").read_text()


def test_check_bundle_confirms_an_intact_bundle(image_bundle, text_bundle):
    for bundle in (image_bundle, text_bundle):
        result = check_bundle(bundle.dir)
        assert result.files == len(_bundle_json(bundle)["files"])
        assert "samples through onnxruntime" in result.samples and "within the" in result.samples


def _copy(bundle, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(bundle.dir, dest)
    return dest


def test_check_bundle_names_a_flipped_byte_a_missing_and_an_extra_file(image_bundle, tmp_path):
    dest = _copy(image_bundle, tmp_path)
    model = dest / "model_repository" / "default_model" / "1" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError) as e:
        check_bundle(dest)
    assert e.value.summary.startswith("bundle: model_repository/default_model/1/model.onnx has sha256") and len(e.value.summary) <= 150
    shutil.rmtree(dest)
    dest = _copy(image_bundle, tmp_path)
    (dest / "samples" / "samples.npz").unlink()
    with pytest.raises(BundleError, match="samples/samples.npz is missing"):
        check_bundle(dest)
    shutil.rmtree(dest)
    dest = _copy(image_bundle, tmp_path)
    (dest / "model_repository" / "default_model" / "2").mkdir()
    (dest / "model_repository" / "default_model" / "2" / "model.onnx").write_bytes(b"x")
    with pytest.raises(BundleError, match="2/model.onnx is not in bundle.json"):
        check_bundle(dest)


def test_check_bundle_runs_the_samples_so_a_forged_digest_does_not_pass(image_bundle, tmp_path):
    """Someone swaps the engine for another and rewrites bundle.json's digest: the samples catch it."""
    import onnx
    from onnx import numpy_helper

    from tasks.artifacts import sha256_file

    dest = _copy(image_bundle, tmp_path)
    rel = "model_repository/default_model/1/model.onnx"
    model = onnx.load(str(dest / rel))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.5, init.name))
    onnx.save(model, str(dest / rel))
    b = json.loads((dest / BUNDLE_JSON).read_text())
    b["files"][rel] = sha256_file(dest / rel)
    (dest / BUNDLE_JSON).write_text(json.dumps(b))
    with pytest.raises(BundleError) as e:
        check_bundle(dest)
    assert e.value.summary.startswith("bundle: samples differ from the bundle's verified outputs: logits.")
    assert "samples not run" in check_bundle(dest, run_samples=False).samples


def test_check_bundle_command_exit_codes_and_one_line(image_bundle, tmp_path, capsys):
    from flows.cli import EXIT_FAILED, main

    assert main(["check-bundle", str(image_bundle.dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"bundle {image_bundle.dir}: 4 files match bundle.json") and "ships fp32 onnxruntime" in out
    dest = _copy(image_bundle, tmp_path)
    config = dest / "model_repository" / "default_model" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: 9"))
    assert main(["check-bundle", str(dest)]) == EXIT_FAILED
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("trtflow: bundle: model_repository/default_model/config.pbtxt has sha256") and len(lines[0]) <= 160
    assert "Traceback" not in err and all(line.startswith("  ") for line in lines[1:])
    assert main(["check-bundle", str(tmp_path / "nowhere")]) == EXIT_FAILED
    assert "no readable bundle.json" in capsys.readouterr().err


# --- the stage: cached, content-addressed, materialised ---------------------------------------------


def test_a_second_run_reuses_the_bundle_and_a_new_policy_repackages_only(image_bundle, tmp_path):
    from tasks.package import bundle_of_variants
    from tasks.stage import was_cached

    refs, cfg = image_bundle.refs, image_bundle.config
    root = tmp_path / "art"
    shutil.copytree(image_bundle.root, root)
    args = {"engines": {"fp32": refs["build-fp32"]}, "verifications": {"fp32": refs["verify-fp32"]}, "profiles": {}, "checkpoint": refs["train"], "data": refs["data"]}
    args = {k: ({p: r.under(root) for p, r in v.items()} if isinstance(v, dict) else v.under(root)) for k, v in args.items()}
    again = bundle_of_variants(**args, config=cfg.model_copy(update={"artifacts_dir": root}), store=root)
    assert was_cached() and again.key == refs["package"].key
    (root / "bundle" / "stale.txt").write_text("left by hand")
    other = bundle_of_variants(**args, config=cfg.model_copy(update={"ship": ShipConfig(policy="smallest")}), store=root)
    assert not was_cached() and other.key != refs["package"].key
    b = json.loads((root / "bundle" / BUNDLE_JSON).read_text())
    assert b["choice"]["policy"] == "smallest" and not (root / "bundle" / "stale.txt").exists()
    check_bundle(root / "bundle")
    with pytest.raises(BundleError) as e:
        bundle_of_variants(**{**args, "engines": {}, "verifications": {}}, config=cfg, store=root)
    assert "nothing to ship" in e.value.summary


def test_the_text_bundle_keeps_integer_inputs_and_both_outputs(text_bundle):
    b = _bundle_json(text_bundle)
    assert b["shipped"]["precision"] in ("fp32", "fp16") and b["choice"]["policy"] == "smallest"
    with np.load(text_bundle.dir / b["samples"]["file"]) as z:
        assert [z[k].dtype for k in b["samples"]["inputs"].values()] == [np.int64, np.int64]
        assert [z[k].shape for k in b["samples"]["outputs"].values()] == [(8, 3), (8, 12)]
    sizes = {p: v["figures"]["engine_bytes"] for p, v in b["variants"].items()}
    assert b["shipped"]["precision"] == min(sizes, key=sizes.get)
    assert b["variants"]["fp16"]["gates"]["numerics"]  # what was verified for each variant is kept
