"""Write bf16 ONNX files (with their fp32, fp16 and int8 siblings) for a real TensorRT builder to check.

The default pipeline's CNN after one epoch in every registered precision, and hand-made graphs that
exercise the bf16 conversion's edges: a Conv/MaxPool CNN of opset 17 (raised to 22), an Einsum that
stays fp32 between Casts, the overflowing MLP of the repair tests and its variant with one node kept
in fp32. Then build them on the GPU machine (the folder travels with the working tree)::

    python benchmarks/bf16_onnx.py benchmarks/bf16-onnx
    python benchmarks/gpu_build_check.py benchmarks/bf16-onnx --rtx --out gpu-build-check-bf16

``gpu_build_check`` reads each file's precision from its types and fails a bf16 file whose engine
has no bf16 layer.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def hand_made() -> dict[str, object]:
    """name -> fp32 ModelProto."""
    import onnx
    from _precision_models import overflowing_mlp
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    cnn = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
            helper.make_node("Flatten", ["p"], ["f"], name="flat"),
            helper.make_node("Gemm", ["f", "fc"], ["y"], name="head"),
        ],
        "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"), numpy_helper.from_array(rng.standard_normal((64, 3)).astype(np.float32), "fc")],
    )
    einsum = helper.make_graph(
        [helper.make_node("Einsum", ["x", "w"], ["e"], name="einsum", equation="ij,jk->ik"), helper.make_node("Relu", ["e"], ["y"], name="relu")],
        "einsum", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")],
    )
    return {
        "cnn_opset17": onnx.helper.make_model(cnn, opset_imports=[helper.make_opsetid("", 17)], ir_version=9),
        "einsum_opset20": onnx.helper.make_model(einsum, opset_imports=[helper.make_opsetid("", 20)], ir_version=10),
        "overflow_mlp": overflowing_mlp()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args()
    import onnx

    from tasks.config import DataConfig, Precision, TrainConfig
    from tasks.data import splits_from_dataset
    from tasks.export import onnx_from_checkpoint
    from tasks.precision import variant_from_onnx
    from tasks.precisions.bf16 import bf16_from_onnx
    from tasks.train import checkpoint_from_splits

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trtflow-bf16-onnx-") as tmp:
        root = Path(tmp)
        data = splits_from_dataset(DataConfig(), root)
        exported = onnx_from_checkpoint(checkpoint_from_splits(data, TrainConfig(epochs=1), root), root)
        for precision in Precision:
            variant = variant_from_onnx(exported, data, precision, 64, root)
            shutil.copyfile(variant.path("model.onnx"), args.out_dir / f"default_cnn_{precision.value}.onnx")
            print(f"default_cnn_{precision.value}.onnx: {variant.meta['conversion']}")
        for name, model in hand_made().items():
            src = root / f"{name}.onnx"
            onnx.save(model, str(src))
            shutil.copyfile(src, args.out_dir / f"{name}_fp32.onnx")
            cases = [("bf16", [])] + ([("bf16_fc1_fp32", ["fc1"])] if name == "overflow_mlp" else [])
            for suffix, keep in cases:
                details = bf16_from_onnx(src, args.out_dir / f"{name}_{suffix}.onnx", keep)
                print(f"{name}_{suffix}.onnx: {details}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
