import pytest
from pydantic import ValidationError

from tasks.config import BatchProfile, PipelineConfig, Precision, Stage, Tolerance, TrainConfig, parse_precisions
from tasks.errors import ConfigError


def test_defaults_cover_every_precision():
    cfg = PipelineConfig()
    assert cfg.precisions == [Precision.fp32, Precision.fp16, Precision.int8]
    assert set(cfg.tolerances) == set(Precision)
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


def test_refresh_includes_dependents():
    cfg = PipelineConfig(refresh=[Stage.build])
    assert cfg.refreshed() == {Stage.build, Stage.verify, Stage.profile}
    assert PipelineConfig(refresh=[Stage.train]).refreshed() >= {Stage.export, Stage.precision, Stage.verify}


def test_duplicate_precisions_collapse():
    assert PipelineConfig(precisions=["fp16", "fp16"]).precisions == [Precision.fp16]


def test_config_round_trips_as_json():
    cfg = PipelineConfig(precisions=["int8"], batch=BatchProfile(min=1, opt=2, max=4))
    assert PipelineConfig.model_validate_json(cfg.model_dump_json()) == cfg
