"""A real Triton Inference Server for the bundle tests, from the ``nvidia-pytriton`` 0.7.0 wheel.

The wheel (55 MB, PyPI) carries ``pytriton/tritonserver/bin/tritonserver`` (Triton 2.51) with the Python
backend only, and a Python-backend stub per Python version. pytriton pins numpy < 2, so it is never
installed: ``tritonserver_home`` downloads the wheel once (``pip download --no-deps``) and unpacks it
into a cache folder (``$TRTFLOW_TRITON_CACHE``, default ``~/.cache/trtflow-tests``). ``.ci/run`` fetches
it ahead (``python tests/_triton_kit.py``).

What this machine's Python backend can run, found by trying it:

- The stub (``python_backend_stubs/3.11/triton_python_backend_stub``) links the system's
  ``libpython3.11.so.1.0`` and runs an *isolated* interpreter (``sys.flags.isolated``): PYTHONPATH is
  ignored, so a served ``model.py`` adds the test environment's site-packages itself
  (``TRTFLOW_TRITON_SITE``), which brings numpy 2 and onnxruntime.
- The stub is built against numpy 1's C API: ``as_numpy()`` of an input tensor returns wrong values
  with numpy 2 (``[1, 1, 1, ...]`` for ``[1, 2, 3, ...]``), and ``pb_utils.Tensor(name, array)`` refuses
  outputs ("output tensor shape does not match size of output"). DLPack carries no numpy ABI:
  ``np.from_dlpack(tensor)`` and ``pb_utils.Tensor.from_dlpack(name, array)`` are exact.
- ``--http-port 0 --grpc-port 0`` is refused ("cannot listen to HTTP requests and GRPC requests at the
  same address and port"): the server gets a free HTTP port and no gRPC.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

WHEEL = "nvidia-pytriton==0.7.0"
PY = f"{sys.version_info.major}.{sys.version_info.minor}"

#: what a Python-backend model that serves the bundle's ONNX file with ONNX Runtime runs (1/model.py)
PYTHON_MODEL = '''
import json, os, site

site.addsitedir(os.environ["TRTFLOW_TRITON_SITE"])  # the stub's interpreter is isolated: no PYTHONPATH

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(params.get("intra_op_thread_count", 1))
        so.inter_op_num_threads = int(params.get("inter_op_thread_count", 1))
        here = os.path.dirname(os.path.abspath(__file__))
        self.session = ort.InferenceSession(os.path.join(here, "model.onnx"), so, providers=["CPUExecutionProvider"])
        self.outputs = [o["name"] for o in config["output"]]

    def execute(self, requests):
        responses = []
        for request in requests:
            # DLPack both ways: this stub's numpy C API is numpy 1's (as_numpy() is wrong under numpy 2).
            feed = {i.name: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, i.name)) for i in self.session.get_inputs()}
            got = dict(zip([o.name for o in self.session.get_outputs()], self.session.run(None, feed)))
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(got[n])) for n in self.outputs]))
        return responses
'''


def cache_dir() -> Path:
    return Path(os.environ.get("TRTFLOW_TRITON_CACHE") or Path.home() / ".cache" / "trtflow-tests")


def tritonserver_home() -> tuple[Path | None, str]:
    """The unpacked wheel's ``pytriton/tritonserver`` folder (fetched once), or None and why not."""
    home = cache_dir() / "nvidia_pytriton-0.7.0" / "pytriton" / "tritonserver"
    if (home / "bin" / "tritonserver").is_file():
        return home, ""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix=".fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"pip download {WHEEL} failed: {exc}"
        wheels = list(Path(tmp).glob("nvidia_pytriton-*.whl"))
        if proc.returncode != 0 or not wheels:
            return None, f"pip download {WHEEL} failed: {(proc.stderr or proc.stdout).strip()[-300:]}"
        unpacked = Path(tmp) / "unpacked"
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(unpacked)
        for exe in ("bin/tritonserver", *(f"python_backend_stubs/{v}/triton_python_backend_stub" for v in os.listdir(unpacked / "pytriton/tritonserver/python_backend_stubs"))):
            p = unpacked / "pytriton" / "tritonserver" / exe
            p.chmod(p.stat().st_mode | 0o111)
        final = cache_dir() / "nvidia_pytriton-0.7.0"
        with contextlib.suppress(OSError):  # another session unpacked it first
            os.replace(unpacked, final)
    return (home, "") if (home / "bin" / "tritonserver").is_file() else (None, f"{WHEEL} has no tritonserver binary")


def python_backend(home: Path, where: Path) -> tuple[Path | None, str]:
    """A backend folder whose Python backend uses the stub of this Python version, or None and why not.

    The stub links ``libpython<PY>.so.1.0`` from the system; without it the Python backend cannot start.
    """
    stub = home / "python_backend_stubs" / PY / "triton_python_backend_stub"
    if not stub.is_file():
        return None, f"the wheel has no Python-backend stub for Python {PY}"
    ldd = subprocess.run(["ldd", str(stub)], capture_output=True, text=True)
    if "not found" in ldd.stdout:
        missing = [line.split()[0] for line in ldd.stdout.splitlines() if "not found" in line]
        return None, f"the Python-backend stub for {PY} needs {', '.join(missing)} (e.g. apt-get install libpython{PY})"
    target = where / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for f in (home / "backends" / "python").iterdir():
        (target / f.name).symlink_to(f)
    # A link, not a copy: the stub finds its bundled libraries relative to its real place ($ORIGIN).
    (target / "triton_python_backend_stub").symlink_to(stub)
    return where / "backends", ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TritonServer:
    """``tritonserver`` in explicit model-control mode on 127.0.0.1: models are loaded one by one."""

    home: Path
    backends: Path
    repository: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        for _ in range(3):  # a free port may be taken between the probe and the bind
            self.port = free_port()
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(
                    [str(self.home / "bin" / "tritonserver"), f"--model-repository={self.repository}", f"--backend-directory={self.backends}",
                     "--http-address", "127.0.0.1", "--http-port", str(self.port), "--allow-grpc", "false", "--allow-metrics", "false",
                     "--model-control-mode", "explicit", "--exit-timeout-secs", "3"],
                    stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, start_new_session=True,
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://{self.url}/v2/health/live", timeout=1) as r:
                        if r.status == 200:
                            return
                time.sleep(0.2)
            self.stop()
        raise RuntimeError(f"tritonserver did not start:\n{self.log.read_text()[-3000:]}")

    def load(self, name: str) -> str | None:
        """Load one model; None when it is ready, else the server's error for it."""
        import tritonclient.http as http
        from tritonclient.utils import InferenceServerException

        client = http.InferenceServerClient(self.url, network_timeout=120)
        try:
            client.load_model(name)
        except InferenceServerException as exc:
            return str(exc)
        finally:
            client.close()
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(10)
        self.proc = None


def python_model_from_bundle(bundle: Path, repository: Path, name: str) -> Path:
    """The bundle's model as a Python-backend model that runs its ONNX file with ONNX Runtime.

    Everything of the generated config stays (inputs, outputs, batching, instance group, parameters,
    warm-up with the real sample): only ``platform: "onnxruntime_onnx"`` becomes ``backend: "python"``.
    """
    import json

    b = json.loads((bundle / "bundle.json").read_text())
    src = bundle / Path(b["shipped"]["config"]).parent
    dest = repository / name
    shutil.copytree(src, dest)
    text = (dest / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text, text
    text = text.replace('platform: "onnxruntime_onnx"', 'backend: "python"').replace(f'name: "{b["name"]}"', f'name: "{name}"')
    (dest / "config.pbtxt").write_text(text)
    (dest / "1" / "model.py").write_text(PYTHON_MODEL)
    return dest


if __name__ == "__main__":  # .ci/run: fetch the wheel ahead of the tests
    found, why = tritonserver_home()
    print(found if found else f"not fetched: {why}")
