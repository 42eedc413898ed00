"""The precision registry (tasks/precisions/base.py): one entry per precision, unknown ones refused."""

import pytest

from tasks.config import Precision, RepairConfig, Tolerances, default_tolerances
from tasks.errors import ConfigError
from tasks.precisions import PrecisionSpec, precision_spec, register_precision, registered


def test_every_precision_has_exactly_one_entry():
    names = [s.name for s in registered()]
    assert sorted(names) == sorted(p.value for p in Precision) and len(names) == len(set(names))
    for p in Precision:
        assert precision_spec(p) is precision_spec(p.value) and precision_spec(p).name == p.value


def test_an_unknown_precision_fails_loudly_naming_the_known_ones():
    with pytest.raises(ConfigError) as err:
        precision_spec("fp8")
    assert "precision 'fp8'" in str(err.value) and "fp16" in err.value.expected and "tasks/precisions" in err.value.fix


def test_a_second_entry_of_a_name_is_refused():
    with pytest.raises(ValueError, match="second precision named 'fp16'"):
        register_precision(PrecisionSpec(name="fp16", title="x", convert=precision_spec("fp16").convert, tolerance={}))
    assert precision_spec("fp16").title == "Thresholds of the fp16 engine."  # the first entry stays


def test_tolerances_come_from_the_entries_one_field_each():
    assert set(Tolerances.model_fields) == {p.value for p in Precision}
    for p in Precision:
        expected = precision_spec(p).tolerance
        assert default_tolerances()[p].model_dump(include=set(expected)) == dict(expected)
        assert Tolerances()[p] == default_tolerances()[p]
        assert Tolerances.model_fields[p.value].description == precision_spec(p).title
    assert Tolerances.model_validate({"fp16": {"atol": 0.5}})["fp16"].rtol == precision_spec("fp16").tolerance["rtol"]


def test_capabilities_say_what_each_precision_is():
    from onnx import TensorProto

    fp32, fp16, int8 = (precision_spec(p) for p in ("fp32", "fp16", "int8"))
    assert not fp32.reduced and fp16.reduced and int8.reduced
    # Only int8 reads the data (calibration), so only its variant's key holds it.
    assert [s.name for s in registered() if s.reads_data] == ["int8"]
    assert fp16.emulation is not None and fp16.emulation.elem_type == TensorProto.FLOAT16 and fp16.emulation.max_finite == 65504.0
    assert int8.emulation is None and fp32.emulation is None  # ORT runs Q/DQ natively; fp32 needs nothing
    assert fp16.element_type == TensorProto.FLOAT16 and fp32.element_type == TensorProto.FLOAT and int8.element_type is None
    assert int8.dequantized and "QLinearConv" in int8.kernels and not fp16.dequantized
    assert RepairConfig().applies == {p.value: precision_spec(p).reduced for p in Precision}
    assert not any(RepairConfig(enabled=False).applies.values())
