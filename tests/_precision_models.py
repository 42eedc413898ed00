"""Tiny hand-made ONNX models with known precision problems, for the emulation and repair tests.

    from _precision_models import overflowing_mlp, outlier_channel_mlp
    model, x = overflowing_mlp()      # fc1's activations exceed 65504: fp16 overflows on a GPU
    model, x = outlier_channel_mlp()  # one huge channel: per-tensor int8 of fc2's input breaks top-1
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _model(nodes: list[Any], weights: dict[str, np.ndarray], n_in: int, n_out: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def overflowing_mlp(n: int = 256, seed: int = 0) -> tuple[Any, np.ndarray]:
    """x (8) -> fc0 -> relu -> fc1 -> fc2 -> logits (4); fc1's outputs reach ~1e5, past fp16's 65504.

    fc2 scales them back down, so fp32 is fine and the logits stay small; in fp16, fc1's output
    overflows to inf and the logits become inf/nan. The repair keeps fc1 (it writes the huge tensor)
    and fc2 (it reads it) in fp32; fc0 and relu stay fp16.

    Returns:
        The fp32 model and ``n`` input samples.
    """
    from onnx import helper

    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((8, 16)) / 3
    w1 = np.clip(rng.standard_normal((16, 16)) * 2e4, -6e4, 6e4)  # weights in range, activations not
    # |w2| >= 1e-4 keeps fc2's weights out of fp16's subnormal range (below 6.1e-5).
    w2 = rng.choice([-1.0, 1.0], (16, 4)) * rng.uniform(1, 2, (16, 4)) * 1e-4
    nodes = [
        helper.make_node("Gemm", ["x", "w0"], ["h0"], name="fc0"),
        helper.make_node("Relu", ["h0"], ["r0"], name="relu"),
        helper.make_node("Gemm", ["r0", "w1"], ["h1"], name="fc1"),
        helper.make_node("Gemm", ["h1", "w2"], ["logits"], name="fc2"),
    ]
    return _model(nodes, {"w0": w0, "w1": w1, "w2": w2}, 8, 4), rng.standard_normal((n, 8)).astype(np.float32)


def outlier_channel_mlp(n: int = 256, seed: int = 0) -> tuple[Any, np.ndarray]:
    """x (8) -> fc1 -> relu -> scale (channel 0 ×1000) -> fc2 -> logits (4).

    Channel 0 of 'scaled' is 1000× the others but fc2 barely reads it, so fp32 logits depend on the
    small channels. Per-tensor int8 of 'scaled' spends its 255 levels on channel 0 and rounds the
    small channels to zero: int8 top-1 agreement collapses.

    Returns:
        The fp32 model and ``n`` input samples.
    """
    from onnx import helper

    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 32))
    scale = np.ones((1, 32))
    scale[0, 0] = 1000.0
    w2 = rng.standard_normal((32, 4))
    w2[0] *= 1e-4
    nodes = [
        helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "scale"], ["scaled"], name="scale"),
        helper.make_node("Gemm", ["scaled", "w2"], ["logits"], name="fc2"),
    ]
    return _model(nodes, {"w1": w1, "scale": scale, "w2": w2}, 8, 4), rng.standard_normal((n, 8)).astype(np.float32)


def run(model: Any, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    """The first output of a model on ONNX Runtime's CPU provider, as the pipeline's engines run it
    (int8 Q/DQ unfused where this CPU's int8 kernels saturate: ``tasks.backends.onnxruntime``)."""
    import onnxruntime as ort

    from tasks.backends.onnxruntime import has_qdq, int8_kernels_saturate, session_options

    so = session_options(None, optimize, fuse_int8=not (int8_kernels_saturate() and has_qdq(model)))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# --- PyTorch factories for end-to-end runs (``--model _precision_models:OverflowNet`` with tests/ importable) ---


def OverflowNet(num_classes: int = 10, in_channels: int = 3) -> Any:
    """A classifier whose activations leave fp16's range: relu(fc0) × 2^10 × 2^10, then LayerNorm brings it back.

    Trains like any small MLP (LayerNorm normalises the scale away) and its fp16 variant passes on
    ONNX Runtime's CPU, which computes in fp32; in fp16 the scaled activations overflow to inf. The
    repair keeps the second Mul and the LayerNormalization in fp32. (Each gain fits fp16: a single
    2^20 initializer would be clamped to 65504 by the converter, which hides the overflow.)
    """
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, 64), nn.ReLU())
            self.register_buffer("gain", torch.tensor(2.0**10))  # a power of two: exact in fp16 too
            self.norm = nn.LayerNorm(64)
            self.head = nn.Linear(64, num_classes)

        def forward(self, x: Any) -> Any:
            return self.head(self.norm(self.features(x) * self.gain * self.gain))

    return Net()


def OutlierNet(num_classes: int = 10, in_channels: int = 3) -> Any:
    """A classifier whose two linear layers each read a tensor with one outlier channel.

    Channel 0 of each hidden tensor is scaled ×1000 and the next layer's weights for it by 1/1000, so
    fp32 computes exactly the plain MLP (and trains like one). int8 quantizes each linear layer's input
    per tensor: the outlier takes the whole range and the other channels round to zero, so int8 top-1
    agreement collapses. Repair keeps both linear layers (``hidden`` and ``head``) in fp32.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(in_channels * 64, 32), nn.ReLU())
            gain = torch.ones(32)
            gain[0] = 1000.0
            self.register_buffer("gain", gain)
            self.register_buffer("inverse", 1.0 / gain)
            self.hidden = nn.Linear(32, 32)
            self.head = nn.Linear(32, num_classes)

        def forward(self, x: Any) -> Any:
            h = F.relu(F.linear(self.features(x) * self.gain, self.hidden.weight * self.inverse, self.hidden.bias))
            return F.linear(h * self.gain, self.head.weight * self.inverse, self.head.bias)

    return Net()

def TinyRegressor(in_features: int = 8) -> Any:
    """A small regressor (two linear layers, one output per sample): int8 cannot reach a strict cosine
    gate, so a repair keeps one layer after the other in fp32, until no operator is left in int8."""
    from torch import nn

    return nn.Sequential(nn.Linear(in_features, 16), nn.ReLU(), nn.Linear(16, 2))
