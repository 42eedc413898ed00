import pytest
from pydantic import ValidationError

from tasks.config import BatchProfile, PipelineConfig, Precision, Tolerance, TrainConfig, default_tolerances, parse_precisions
from tasks.errors import ConfigError


def test_defaults_cover_every_precision():
    cfg = PipelineConfig()
    assert cfg.precisions == [Precision.fp32, Precision.fp16, Precision.int8]
    assert {p.value for p in Precision} == set(cfg.tolerances.model_dump())
    # looser precisions get looser thresholds
    assert cfg.tolerance(Precision.fp32).min_cosine > cfg.tolerance(Precision.fp16).min_cosine > cfg.tolerance(Precision.int8).min_cosine


def test_batch_profile_must_be_ordered():
    with pytest.raises(ValidationError, match="min <= opt <= max"):
        BatchProfile(min=8, opt=4, max=64)
    with pytest.raises(ValidationError):
        BatchProfile(min=0, opt=1, max=2)


def test_negative_tolerance_rejected():
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        Tolerance(atol=-1)


def test_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match="one of fp32, fp16, int8"):
        parse_precisions("fp32,fp8")
    assert parse_precisions(" fp16 , int8 ") == [Precision.fp16, Precision.int8]


def test_model_path_needs_module_and_callable():
    with pytest.raises(ValidationError, match="package.module:callable"):
        TrainConfig(model="tasks.models.SmallCNN")


def test_unknown_field_rejected():
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate({"epochs": 3})


@pytest.mark.parametrize(
    ("given", "rtol"),
    [
        ({"tolerances": {"fp32": {"atol": 1e-3}}}, 1e-3),
        ({"tolerances": {Precision.fp32: Tolerance(atol=1e-3)}}, 1e-3),
        ({"tolerances": {"fp32": {"atol": 1e-3, "rtol": None}}}, None),
    ],
    ids=["form or config file", "python object", "with a None"],
)
def test_a_partial_tolerance_override_keeps_the_precisions_other_defaults(given, rtol):
    cfg = PipelineConfig.model_validate(given)
    fp32, defaults = cfg.tolerance(Precision.fp32), default_tolerances()[Precision.fp32]
    assert fp32.atol == 1e-3
    assert fp32.min_cosine == defaults.min_cosine == 0.99999  # not the generic 0.999
    assert fp32.min_top1_agreement == defaults.min_top1_agreement
    assert fp32.rtol == rtol
    assert cfg.tolerance(Precision.fp16) == default_tolerances()[Precision.fp16]


def test_default_tolerances_are_pinned():
    # The gates users trust: a change here must be deliberate (and documented in docs/tolerances).
    t = default_tolerances()
    assert (t[Precision.fp32].atol, t[Precision.fp32].rtol, t[Precision.fp32].min_cosine) == (1e-4, 1e-3, 0.99999)
    assert (t[Precision.fp16].atol, t[Precision.fp16].rtol, t[Precision.fp16].min_cosine) == (1e-2, 1e-2, 0.9999)
    assert (t[Precision.int8].atol, t[Precision.int8].rtol, t[Precision.int8].min_top1_agreement) == (None, None, 0.97)
    assert PipelineConfig().tolerances.fp16.atol == 1e-2


def test_an_unknown_precision_in_tolerances_is_refused():
    with pytest.raises(ValidationError, match="fp8"):
        PipelineConfig.model_validate({"tolerances": {"fp8": {"atol": 1.0}}})
    # A registered precision's thresholds merge into its own defaults like any other.
    assert PipelineConfig.model_validate({"tolerances": {"bf16": {"atol": 1.0}}}).tolerances["bf16"].rtol == 8e-2


def test_duplicate_precisions_collapse():
    assert PipelineConfig(precisions=["fp16", "fp16"]).precisions == [Precision.fp16]


def test_config_round_trips_as_json():
    cfg = PipelineConfig(precisions=["int8"], batch=BatchProfile(min=1, opt=2, max=4))
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg
