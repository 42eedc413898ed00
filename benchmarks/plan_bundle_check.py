"""Build TensorRT plans on a GPU machine and write the Triton model repository the package stage would ship.

For every ONNX file under a folder (or one file): the pipeline's own build worker builds the plan
(``tasks/backends/_trt_build.py``: strongly typed, one profile over the batch range), which also reads
the plan's IO tensors back from the deserialized engine (``engine_io``) when this TensorRT can
deserialize it here (TensorRT-RTX 1.7 cannot on compute capability 9.0: then the network's IO is
used, and the config says so). Then ``tasks.package.write_model_repository`` writes
``model_repository/<name>/config.pbtxt``, ``1/model.plan`` and the warm-up inputs, parsing the config
with Triton's schema and its core checks. It needs tritonclient (``pip install tritonclient``), no
pycuda and no Triton server::

    python benchmarks/plan_bundle_check.py ONNX_DIR_OR_FILE [--out OUT] [--batch 1,32,256] [--rtx]

Writes ``OUT/<file stem>/engine.json`` (the EngineInfo the config was derived from) and the model
repository beside it, prints each config and where its IO came from, and ``OUT/plan-check.json``.
Exit status 1 when a build or a config failed. Back on a CPU machine, put an ``engine.json`` into
``tests/data/trt-engines/NAME.json``: ``tests/test_triton.py`` then loads its config into a real
tritonserver too (accepted up to the missing TensorRT backend).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _gpu() -> dict[str, str]:
    """GPU name and compute capability from nvidia-smi (no pycuda needed); empty when it cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        name, cc = (x.strip() for x in out.stdout.splitlines()[0].split(","))
        return {"gpu": name, "compute_capability": cc}
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired):
        return {}


def _feed(info) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Two samples per input for the warm-up file: zeros for integers (valid ids and masks), ones for floats."""
    from tasks.triton import NUMPY_TYPES, engine_io, triton_type

    feed = {}
    for name, dtype, shape in engine_io(info).inputs:
        dims = [2 if i == 0 and d < 0 else (d if d > 0 else 8) for i, d in enumerate(shape)]
        np_type = NUMPY_TYPES.get(triton_type(dtype, name), "float32")
        feed[name] = (np.ones if np.dtype(np_type).kind == "f" else np.zeros)(dims, dtype=np_type)
    return feed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("onnx", type=Path, help="an ONNX file, or a folder searched for *.onnx")
    ap.add_argument("--out", type=Path, default=Path("plan-bundles"))
    ap.add_argument("--batch", default="1,32,256", help="min,opt,max of the optimization profile")
    ap.add_argument("--rtx", action="store_true", help="use TensorRT-RTX's bindings as 'tensorrt'")
    args = ap.parse_args()
    from gpu_build_check import use_rtx, worker_spec

    if args.rtx:
        use_rtx()
    import tensorrt as trt

    from tasks.backends.base import EngineInfo
    from tasks.backends.tensorrt import run_build_worker
    from tasks.errors import TrtflowError
    from tasks.package import write_model_repository

    batch = tuple(int(b) for b in args.batch.split(","))
    files = [args.onnx] if args.onnx.is_file() else sorted(args.onnx.rglob("*.onnx"))
    args.out.mkdir(parents=True, exist_ok=True)
    env = {"tensorrt": trt.__version__, **_gpu()}
    print(f"TensorRT {trt.__version__} on {env.get('gpu', 'an unknown GPU')} (sm {env.get('compute_capability', '?')}); profile {batch}; {len(files)} files")
    rows, failed = [], 0
    for path in files:
        # One folder per file, named by its path under ONNX_DIR (precision/<key>/model.onnx files share a stem).
        rel = path.with_suffix("").name if args.onnx.is_file() else str(path.relative_to(args.onnx).with_suffix(""))
        stem = re.sub(r"[^A-Za-z0-9_]+", "_", rel).strip("_") or "model"
        out = args.out / stem
        build = out / "build"
        build.mkdir(parents=True, exist_ok=True)
        spec = worker_spec(path, build, batch, args.out / "cache", trt.__version__)
        (build / "spec.json").write_text(json.dumps(spec))
        try:
            result = run_build_worker(build / "spec.json", build / "result.json", 600)
            record = {**result["info"], "backend": "tensorrt", "engine_file": "engine.plan", "environment": env,
                      "batch": {"min": batch[0], "opt": batch[1], "max": batch[2]}, "warnings": result.get("warnings", [])}
            info = EngineInfo.model_validate(record)
            (out / "engine.json").write_text(json.dumps(info.model_dump(mode="json"), indent=2))
            repo = out / "model_repository"
            if repo.exists():
                import shutil

                shutil.rmtree(repo)
            model = write_model_repository(repo, stem, info, build / "engine.plan", _feed(info), header=f"plan_bundle_check: {path.name}, TensorRT {trt.__version__}")
            text = (repo / stem / "config.pbtxt").read_text()
            rows.append({"file": str(path), "ok": True, "io_source": model.source, "max_batch_size": model.max_batch_size,
                         "inputs": [t.__dict__ for t in model.inputs], "outputs": [t.__dict__ for t in model.outputs]})
            print(f"\n== {path.name}: config from {model.source}\n{text}")
        except TrtflowError as exc:
            failed += 1
            rows.append({"file": str(path), "ok": False, "error": str(exc)[:800]})
            print(f"\n== {path.name}: FAILED: {str(exc)[:800]}")
    (args.out / "plan-check.json").write_text(json.dumps({"tensorrt": trt.__version__, **env, "batch": batch, "files": rows}, indent=2))
    print(f"\n{len(files) - failed} of {len(files)} plans built with a config Triton's schema accepts")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
