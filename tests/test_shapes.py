"""Shape profiles per input: the trtexec-style options, the config, the resolved engine profile, the
shapes verified and timed, real samples cut or padded to a length, and the runners' range checks."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from flows.cli import _parser, config_from_args
from tasks.config import BatchProfile, PipelineConfig, ShapeProfile
from tasks.errors import ConfigError, InferenceError
from tasks.shapes import dim_groups, engine_profile, fit_lengths, full_shapes, opt_point, parse_pad_values, parse_shapes, shape_points

SPECS = [{"name": "input_ids", "dtype": "int64", "shape": [16]}, {"name": "attention_mask", "dtype": "int64", "shape": [16]}]
TEXT = ShapeProfile(
    min={"input_ids": "1x4", "attention_mask": "1x4"},
    opt={"input_ids": [8, 16], "attention_mask": [8, 16]},
    max={"input_ids": "16x32", "attention_mask": "16x32"},
    pad_values={"input_ids": 1},
)


def test_the_options_take_trtexec_shapes_and_set_the_batch_sizes():
    args = _parser().parse_args([
        "run", "--min-shapes", "input_ids:1x8,attention_mask:1x8", "--opt-shapes", "input_ids:32x64,attention_mask:32x64",
        "--max-shapes", "input_ids:256x128,attention_mask:256x128", "--pad-values", "input_ids:1",
    ])
    cfg = config_from_args(args)
    assert cfg.shapes.max == {"input_ids": [256, 128], "attention_mask": [256, 128]}
    assert cfg.shapes.pad_values == {"input_ids": 1.0}
    assert (cfg.batch.min, cfg.batch.opt, cfg.batch.max) == (1, 32, 256)  # axis 0 of the shapes is the batch
    assert cfg.shapes.axes() == {"input_ids": {1: (8, 64, 128)}, "attention_mask": {1: (8, 64, 128)}}
    # The config round-trips (the flow validates its parameters again).
    assert PipelineConfig.model_validate(cfg.model_dump(mode="json")).shapes == cfg.shapes


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        ({"min": {"x": [1, 4]}, "opt": {"x": [2, 8]}, "max": {"y": [4, 16]}}, "the same inputs"),
        ({"min": {"x": [1, 9]}, "opt": {"x": [2, 8]}, "max": {"x": [4, 16]}}, "min <= opt <= max"),
        ({"min": {"x": [1, 4]}, "opt": {"x": [2, 8]}, "max": {"x": [4, 16, 2]}}, "same rank"),
        ({"min": {"x": [1, 4], "m": [2, 4]}, "opt": {"x": [2, 8], "m": [2, 8]}, "max": {"x": [4, 16], "m": [4, 16]}}, "one batch"),
        ({"min": {"x": "1by4"}, "opt": {"x": [2, 8]}, "max": {"x": [4, 16]}}, "joined by x"),
    ],
)
def test_inconsistent_shapes_are_refused_naming_why(shapes, message):
    with pytest.raises(ValidationError, match=message):
        ShapeProfile(**shapes)


def test_batch_sizes_that_contradict_the_shapes_are_refused():
    with pytest.raises(ValidationError, match="differ from the shapes' batch"):
        PipelineConfig(batch=BatchProfile(max=64), shapes=TEXT)
    assert PipelineConfig(batch=BatchProfile(opt=8, max=16), shapes=TEXT).batch.max == 16  # agreeing is fine
    assert PipelineConfig(shapes=TEXT).batch.opt == 8  # not given: the shapes set it


@pytest.mark.parametrize(
    ("text", "message"),
    [("input_ids=1x8", "NAME:DIMS"), ("input_ids:1xa", "NAME:DIMS"), ("input_ids:", "NAME:DIMS")],
)
def test_bad_shape_text_is_one_line_with_the_fix(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_shapes(text)
    assert "--min-shapes input_ids:1x8" in info.value.fix
    assert parse_shapes(" a:1x2 , b:3x4x5 ") == {"a": [1, 2], "b": [3, 4, 5]}
    assert parse_pad_values("input_ids:1,mask:0") == {"input_ids": 1.0, "mask": 0.0}
    with pytest.raises(ConfigError, match="NAME:VALUE"):
        parse_pad_values("input_ids=1")


def test_the_engine_profile_is_checked_against_the_dataset():
    profile = engine_profile(BatchProfile(min=1, opt=8, max=16), TEXT, SPECS)
    assert profile.axes == {"input_ids": {1: (4, 16, 32)}, "attention_mask": {1: (4, 16, 32)}}
    assert profile.lengths == {"input_ids": {1: 16}, "attention_mask": {1: 16}} and profile.pad_values == {"input_ids": 1.0}
    assert full_shapes(profile, SPECS)["input_ids"] == {"min": [1, 4], "opt": [8, 16], "max": [16, 32]}
    # One dimension for axes of the same range: input_ids and attention_mask share the sequence length.
    assert dim_groups(profile) == [("input_ids_axis1", 4, 32, [("input_ids", 1), ("attention_mask", 1)])]
    with pytest.raises(ConfigError, match="one of the dataset's inputs"):
        engine_profile(BatchProfile(), ShapeProfile(min={"ids": [1, 4]}, opt={"ids": [2, 8]}, max={"ids": [4, 16]}), SPECS)
    with pytest.raises(ConfigError, match="rank 2"):
        engine_profile(BatchProfile(), ShapeProfile(min={"input_ids": [1, 4, 1]}, opt={"input_ids": [2, 8, 1]}, max={"input_ids": [4, 16, 1]}), SPECS)
    images = [{"name": "x", "dtype": "float32", "shape": [3, 32, 32]}]
    with pytest.raises(ConfigError, match="axis 1 of 'x' fixed at 4"):
        engine_profile(BatchProfile(), ShapeProfile(min={"x": [1, 4, 8, 8]}, opt={"x": [2, 4, 32, 32]}, max={"x": [4, 4, 64, 64]}), images)


def test_verified_shapes_are_min_opt_max_of_every_axis():
    profile = engine_profile(BatchProfile(min=1, opt=8, max=16), TEXT, SPECS)
    points = shape_points(profile)
    assert [p.text(SPECS) for p in points] == [
        "input_ids:1x4,attention_mask:1x4", "input_ids:8x16,attention_mask:8x16", "input_ids:16x32,attention_mask:16x32",
    ]
    assert opt_point(profile).key() == points[1].key()
    # Without dynamic axes: the batch sizes, as before.
    assert [p.text() for p in shape_points(BatchProfile(min=1, opt=1, max=4))] == ["batch 1", "batch 4"]


def test_real_samples_are_cut_or_padded_with_each_inputs_pad_value():
    ids = np.arange(2 * 6).reshape(2, 6) + 10
    mask = np.ones((2, 6), np.int64)
    short = fit_lengths({"input_ids": ids, "attention_mask": mask}, {"input_ids": {1: 4}, "attention_mask": {1: 4}})
    np.testing.assert_array_equal(short["input_ids"], ids[:, :4])
    long = fit_lengths({"input_ids": ids, "attention_mask": mask}, {"input_ids": {1: 9}, "attention_mask": {1: 9}}, {"input_ids": 1})
    np.testing.assert_array_equal(long["input_ids"][:, 6:], np.ones((2, 3)))  # the given pad value
    np.testing.assert_array_equal(long["attention_mask"][:, 6:], np.zeros((2, 3)))  # default 0: padding is masked out
    assert long["input_ids"].dtype == ids.dtype and long["input_ids"].flags.c_contiguous
    audio = np.ones((2, 1, 10), np.float32)
    assert fit_lengths({"x": audio}, {"x": {2: 3}})["x"].shape == (2, 1, 3)


def test_runners_accept_any_length_inside_the_profile_and_name_one_outside(tmp_path):
    from tasks.backends.onnxruntime import OnnxRuntimeRunner
    from tasks.backends.tensorrt import ProfileShapes, check_feed, derive_profile

    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    shapes = {"x": {"min": [1, 4], "opt": [2, 8], "max": [4, 16]}}
    with OnnxRuntimeRunner(path, threads=1, min_batch=1, max_batch=4, shapes=shapes) as runner:
        for t in (4, 11, 16):
            assert runner.infer({"x": np.ones((2, t), np.float32)})["y"].shape == (2, t)
        with pytest.raises(InferenceError, match="axis 1 from 4 to 16"):
            runner.infer({"x": np.ones((2, 17), np.float32)})
    # TensorRT's profile: the shapes for the sequence axis, the batch range for the batch.
    profile = derive_profile({"x": (-1, -1), "scale": (-1, 3)}, (1, 2, 4), shapes)
    assert profile["x"] == ProfileShapes((1, 4), (2, 8), (4, 16)) and profile["scale"] == ProfileShapes((1, 3), (2, 3), (4, 3))
    check_feed("x", (3, 9), profile["x"])
    with pytest.raises(InferenceError, match=r"shape \(N, 4..16\)"):
        check_feed("x", (3, 20), profile["x"])
    from tasks.errors import EngineBuildError

    with pytest.raises(EngineBuildError, match="no shape range"):
        derive_profile({"x": (-1, -1)}, (1, 2, 4))
    with pytest.raises(EngineBuildError, match="keep its static dimensions"):
        derive_profile({"x": (-1, 8)}, (1, 2, 4), shapes)


def test_the_ui_form_gets_a_typed_described_shapes_section():
    defs = PipelineConfig.model_json_schema()["$defs"]
    shapes = defs["ShapeProfile"]
    assert shapes["title"] == "Input shapes"
    for level in ("min", "opt", "max"):
        field = shapes["properties"][level]
        assert field["description"] and field["additionalProperties"] == {"items": {"type": "integer"}, "type": "array"}
    assert shapes["properties"]["pad_values"]["additionalProperties"] == {"type": "number"}
    assert {"max_relative_rmse", "max_r2_drop"} <= set(defs["Tolerance"]["properties"])
    assert defs["DataConfig"]["properties"]["task"]["enum"] == ["auto", "classification", "regression"]


def test_each_stage_key_follows_the_part_of_the_shapes_it_uses():
    """export: the dynamic axes only; build: the engine's shapes, not the pad values; verify: both."""
    from types import SimpleNamespace

    from tasks.engine import SPEC as BUILD, profile_for
    from tasks.export import SPEC as EXPORT
    from tasks.stage import stage_key
    from tasks.verify import SPEC as VERIFY

    ckpt = SimpleNamespace(digest="c", meta={"inputs": SPECS, "memory_plan": {"activation_per_sample": 1}})

    def keys(shapes):
        profile = profile_for(BatchProfile(min=1, opt=8, max=16), shapes, "onnxruntime", ckpt)  # type: ignore[arg-type]
        return (
            stage_key(EXPORT, {"checkpoint": None, "shapes": shapes}),
            stage_key(BUILD, {"variant": None, "backend": "onnxruntime", "batch": profile, "options": {}}),
            stage_key(VERIFY.__class__(VERIFY.name, VERIFY.module, VERIFY.libraries), {"engine": None, "batch": profile}),
        )

    base = keys(TEXT)
    longer = keys(TEXT.model_copy(update={"max": {"input_ids": [16, 64], "attention_mask": [16, 64]}}))
    padded = keys(TEXT.model_copy(update={"pad_values": {"input_ids": 3}}))
    more_batch = keys(TEXT.model_copy(update={"opt": {"input_ids": [4, 16], "attention_mask": [4, 16]}}))
    assert all(a != b for a, b in zip(base, longer))  # a longer max shape: every stage again
    assert padded[0] == base[0] and padded[1] == base[1] and padded[2] != base[2]  # pad values: verify only
    assert more_batch[0] == base[0]  # only the axes beyond the batch shape the export
    assert stage_key(EXPORT, {"checkpoint": None, "shapes": ShapeProfile()}) == stage_key(EXPORT, {"checkpoint": None})  # no shapes: as before
