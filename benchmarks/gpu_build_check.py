"""Build every ONNX file under a folder with the project's TensorRT build worker, on a GPU machine.

It proves that the ONNX files the pipeline writes (every precision, every model shape: several
inputs, integer inputs, several outputs, repaired variants) parse and build as strongly typed
TensorRT networks with one optimization profile over the batch range. It calls the same worker the
``build`` stage uses (``tasks/backends/_trt_build.py``), so the profile, parser error reporting and
timing cache are the pipeline's own; it needs no pycuda (it only builds).

Run it where TensorRT (or TensorRT-RTX, whose Python module is aliased to ``tensorrt``) is installed::

    python benchmarks/gpu_build_check.py ONNX_DIR [--out OUT_DIR] [--batch 1,32,256] [--rtx]
        [--min-shapes input_ids:1x8,attention_mask:1x8 --opt-shapes ... --max-shapes ...]

Files with dynamic axes beyond the batch (a sequence length) need a min/opt/max shape per input, as
trtexec's ``--minShapes``: either ``--min-shapes/--opt-shapes/--max-shapes`` (for every file with
inputs of those names), or a sidecar ``<file>.shapes.json`` next to the ONNX file (``{"input_ids":
{"min": [1, 8], "opt": [...], "max": [...]}}``, what ``benchmarks/dynamic_onnx.py`` writes), which
wins. The shapes' axis 0 is then the profile's batch range for that file.

Prints one markdown row per file (its precision, inputs, profile, engine size, build seconds, layers
per precision, or the error) and writes ``build-check.json`` into OUT_DIR. A file's precision is read
from its ONNX types (Q/DQ: int8; bfloat16 weights or Casts: bf16; float16 ones: fp16; else fp32); a reduced
float file whose engine has no layer in that precision counts as failed (a strongly typed bf16 graph
built all in fp32 would be a silent fallback). Exit status 1 when any file failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: a module named ``tensorrt`` that is TensorRT-RTX's bindings (same API, other package name)
_ALIAS = "import sys, tensorrt_rtx_bindings as _trt\nsys.modules['tensorrt'] = _trt\n"


def _signature(path: Path) -> tuple[str, str]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def fmt(values: list) -> str:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = "×".join(d.dim_param or str(d.dim_value) for d in t.shape.dim)
            out.append(f"{v.name}:{onnx.TensorProto.DataType.Name(t.elem_type).lower()}[{dims}]")
        return ", ".join(out)

    return fmt(list(model.graph.input)), fmt(list(model.graph.output))


def precision_of(path: Path) -> str:
    """The precision an ONNX file is in, read from its own types (what a strongly typed network builds)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    if any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        return "int8"
    # Weights, and the Casts at a reduced graph's fp32 inputs (a graph whose weights all stay fp32 still computes in it).
    types = {t.data_type for t in model.graph.initializer}
    types |= {a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"}
    for elem_type, name in ((onnx.TensorProto.BFLOAT16, "bf16"), (onnx.TensorProto.FLOAT16, "fp16")):
        if elem_type in types:
            return name
    return "fp32"


def missing_precision(precision: str, layers: dict[str, int]) -> str | None:
    """Why a built engine is not the precision its file is in (None: it is, or nothing to check).

    A reduced float file (fp16, bf16) must build at least one layer of that precision.
    """
    if precision in ("fp16", "bf16") and layers and not layers.get(precision):
        return f"no {precision} layer in the engine ({layers}): the {precision} graph was built in another precision"
    return None


def _profile_of(path: Path, options: dict[str, dict[str, list[int]]] | None) -> dict[str, dict[str, list[int]]]:
    """The shapes of a file's inputs with dynamic axes: its sidecar ``.shapes.json``, else the options'."""
    import onnx

    sidecar = path.with_suffix(".shapes.json")
    if sidecar.is_file():
        return json.loads(sidecar.read_text())
    if not options:
        return {}
    names = {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
    return {n: shapes for n, shapes in options.items() if n in names}


def use_rtx() -> None:
    """Make ``import tensorrt`` load TensorRT-RTX's bindings, here and in the build worker it starts."""
    shim = Path(tempfile.mkdtemp(prefix="trt-alias-"))
    (shim / "tensorrt.py").write_text(_ALIAS)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    sys.path.insert(0, str(shim))


def worker_spec(path: Path, out_dir: Path, batch: tuple[int, ...], cache_dir: Path, trt_version: str, shapes: dict | None = None) -> dict:
    """The build worker's spec for one ONNX file (the pipeline's own build settings, strict fp32);
    ``shapes``: the min/opt/max shape of each input with dynamic axes beyond the batch."""
    from tasks.backends.tensorrt import timing_cache_path

    return {
        "onnx_path": str(path.resolve()),
        "out_dir": str(out_dir.resolve()),
        "engine_file": "engine.plan",
        "layers_file": "layers.json",
        "batch": list(batch),
        "shapes": shapes or {},
        "workspace_mib": 1024,
        "tf32": False,
        "builder_optimization_level": None,
        "timing_cache_file": str(timing_cache_path(cache_dir, trt_version, "gpu", "x")),
        "result_file": str(out_dir / "result.json"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx_dir", type=Path)
    ap.add_argument("--out", type=Path, default=Path("gpu-build-check"))
    ap.add_argument("--batch", default="1,32,256", help="min,opt,max of the optimization profile")
    ap.add_argument("--rtx", action="store_true", help="use TensorRT-RTX's bindings as 'tensorrt'")
    for level in ("min", "opt", "max"):
        ap.add_argument(f"--{level}-shapes", default=None, help=f"{level} shape per input, batch first (trtexec's --{level}Shapes), e.g. input_ids:1x8")
    args = ap.parse_args()
    batch = tuple(int(b) for b in args.batch.split(","))
    options = None
    if args.max_shapes:
        from tasks.shapes import parse_shapes

        levels = {lvl: parse_shapes(getattr(args, f"{lvl}_shapes") or "", f"--{lvl}-shapes") for lvl in ("min", "opt", "max")}
        options = {n: {lvl: levels[lvl][n] for lvl in levels} for n in levels["max"]}
    args.out.mkdir(parents=True, exist_ok=True)
    if args.rtx:
        use_rtx()
    import tensorrt as trt

    from tasks.backends.tensorrt import run_build_worker
    from tasks.errors import EngineBuildError

    files = sorted(args.onnx_dir.rglob("*.onnx"))
    rows, failed = [], 0
    print(f"TensorRT {trt.__version__}; profile batch {batch}; {len(files)} files\n")
    print("| file | precision | inputs | outputs | profile | engine bytes | build s | layers by precision | result |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, path in enumerate(files):
        rel = str(path.relative_to(args.onnx_dir))
        ins, outs = _signature(path)
        precision = precision_of(path)
        out_dir = args.out / f"{i:02d}"
        out_dir.mkdir(exist_ok=True)
        shapes = _profile_of(path, options)
        file_batch = tuple(next(iter(shapes.values()))[lvl][0] for lvl in ("min", "opt", "max")) if shapes else batch
        profile = "; ".join(f"{n} {'/'.join('x'.join(map(str, v[lvl])) for lvl in ('min', 'opt', 'max'))}" for n, v in shapes.items()) or "batch " + "/".join(map(str, file_batch))
        spec = worker_spec(path, out_dir, file_batch, args.out / "cache", trt.__version__, shapes)
        (out_dir / "spec.json").write_text(json.dumps(spec))
        t0 = time.perf_counter()
        try:
            result = run_build_worker(out_dir / "spec.json", out_dir / "result.json", 600)
            info = result["info"]
            layers = (info.get("layers") or {}).get("by_precision", {})
            wrong = missing_precision(precision, layers)
            row = {"file": rel, "precision": precision, "inputs": ins, "outputs": outs, "profile": profile, "engine_bytes": info.get("engine_bytes"),
                   "seconds": round(time.perf_counter() - t0, 2), "layers": layers, "ok": wrong is None, "warnings": result.get("warnings", [])}
            if wrong is not None:
                failed += 1
                row["error"] = wrong
        except EngineBuildError as exc:
            failed += 1
            row = {"file": rel, "precision": precision, "inputs": ins, "outputs": outs, "profile": profile, "engine_bytes": None,
                   "seconds": round(time.perf_counter() - t0, 2), "layers": {}, "ok": False, "error": str(exc)[:600]}
        rows.append(row)
        verdict = "built" if row["ok"] else "FAILED: " + row["error"].replace("|", "/").replace("\n", " ")[:300]
        print(f"| {rel} | {precision} | {ins} | {outs} | {profile} | {row['engine_bytes'] or ''} | {row['seconds']} | {row['layers'] or ''} | {verdict} |", flush=True)
    (args.out / "build-check.json").write_text(json.dumps({"tensorrt": trt.__version__, "batch": batch, "files": rows}, indent=2))
    print(f"\n{len(files) - failed} of {len(files)} built")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
