"""Stage ``package``: ship one verified engine as a Triton model repository, with digests and samples.

It runs once every branch is done (a gather node of the graph) and sees only the variants that passed
their gates. ``choose`` picks one by the ship policy (``fastest``, ``lowest-latency``, ``smallest``, a
precision, ``latency-budget=MS``); ``bundle_of_variants`` writes the bundle as a content-addressed
artifact and materialises it as ``<artifacts>/bundle/``::

    bundle/
      bundle.json                                  SHA-256 of every file, provenance, gates and figures, the choice
      model_repository/<name>/config.pbtxt         from the engine's own IO specs and profile (tasks/triton.py)
      model_repository/<name>/1/model.onnx         or model.plan: the very engine file verify checked
      model_repository/<name>/warmup/input_<i>     one real sample per input, for Triton's model_warmup
      samples/samples.npz                          real test inputs and the shipped engine's outputs on them

``check_bundle`` is what ``trtflow check-bundle DIR`` runs before a deployment: every digest, the config
against Triton's schema, and the samples through the local backend within the variant's tolerance.

    from tasks.package import check_bundle
    print(check_bundle(Path("artifacts/bundle")).text)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.artifacts import MANIFEST, ArtifactRef, sha256_file
from tasks.backends.base import EngineInfo
from tasks.backends.registry import backend_spec, builder_for
from tasks.config import PipelineConfig, Precision, Tolerance, parse_ship_policy
from tasks.errors import BackendUnavailableError, BundleError
from tasks.locking import key_lock
from tasks.code_digests import describe
from tasks.stage import StageSpec, run_stage
from tasks.store import Store, as_store

log = logging.getLogger("trtflow.package")

#: the bundle's own description (never in its file list: it holds the list)
BUNDLE_JSON = "bundle.json"
#: where the latest bundle is materialised, relative to the artifacts folder
BUNDLE_DIR = "bundle"
REPOSITORY = "model_repository"
SAMPLES = "samples/samples.npz"
FORMAT = "trtflow-bundle/1"
#: the lock key under which bundle/ is replaced
MATERIALISING = "materialising" + "0" * 51


def _portable_config(config: PipelineConfig) -> dict[str, Any]:
    """The run's config as the bundle records it: no artifacts folder or store, no refresh list, file names only."""
    out = PipelineConfig.model_validate(config).model_dump(mode="json", exclude={"artifacts_dir", "store", "refresh"})
    for section, key in (("data", "dataset"), ("train", "weights")):
        if out[section].get(key):
            out[section][key] = Path(out[section][key]).name
    return out


def model_code(factory: str) -> dict[str, Any]:
    """The model factory's code as the cache keys see it: its source files (SHA-256 each), the trtflow
    modules and the installed distributions it imports, and one digest over all of them."""
    found = describe(factory)
    return {"factory": factory, **found, "sha256": hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()}


def _key_inputs(inputs: Mapping[str, Any]) -> Mapping[str, Any]:
    # The bundle records the config and the model code as they are: both belong to its key.
    config = inputs["config"]
    return {**inputs, "config": _portable_config(config), "model_code": model_code(PipelineConfig.model_validate(config).train.model)["sha256"]}


SPEC = StageSpec(
    "package",
    __name__,
    libraries=("tritonclient", "protobuf", "numpy", "onnxruntime"),
    key_inputs=_key_inputs,
)


# --- the choice -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """What the policies compare for one variant that passed."""

    precision: str
    engine_bytes: int
    p50_ms: float | None = None
    latency_batch: int | None = None
    samples_per_s: float | None = None
    throughput_batch: int | None = None
    #: why there are no timings (profile off, profile failed)
    untimed: str | None = None


def _fail(got: str, expected: str, because: str, fix: str, summary: str) -> BundleError:
    return BundleError(got=got, expected=expected, because=because, fix=fix, summary=summary)


def choose(figures: Sequence[Figures], policy: str, attempted: Sequence[str]) -> tuple[str, str]:
    """Pick the variant to ship among those that passed.

    Args:
        figures: one entry per variant that passed its gates, in the run's precision order (ties go
            to the earlier one).
        policy: a ship policy (``tasks.config.parse_ship_policy``).
        attempted: every precision the run built, passed or not.

    Returns:
        ``(precision, reason)``: the reason names the policy, the figures compared, and what did not pass.

    Raises:
        BundleError: no variant passed, the requested precision did not, a timed policy lacks timings,
            or no variant meets the latency budget.
    """
    kind, value = parse_ship_policy(policy)
    passed = [f.precision for f in figures]
    failed = [p for p in attempted if p not in passed]
    tail = f"; not passed: {', '.join(failed)}" if failed else ""
    if not figures:
        raise _fail(
            got=f"no variant that passed its gates (built: {', '.join(attempted) or 'none'})",
            expected="at least one verified variant",
            because="only a variant that passed verification is ever shipped",
            fix="read report.json; fix the failing gate, loosen --tolerance only if the drift is acceptable, or add fp32 to --precisions",
            summary="nothing to ship: no variant passed its gates; read report.json, or pass --no-package",
        )
    if kind == "precision":
        if value not in passed:
            why = "was not built (not in --precisions)" if value not in attempted else "did not pass its gates"
            raise _fail(
                got=f"--ship {value}, but {value} {why}",
                expected=f"a precision that passed: {', '.join(passed)}",
                because="only a variant that passed verification is ever shipped",
                fix=f"pass --ship {passed[0]} (passed: {', '.join(passed)}), or --ship fastest",
                summary=f"--ship {value}: {value} {why}; pass --ship {passed[0]} (passed: {', '.join(passed)})",
            )
        return str(value), f"{value}: requested (--ship {value}), and it passed its gates{tail}"
    if kind == "smallest":
        best = min(figures, key=lambda f: f.engine_bytes)
        listed = ", ".join(f"{f.precision} {f.engine_bytes} bytes" for f in figures)
        return best.precision, f"smallest: {best.precision} has the smallest engine file of the variants that passed ({listed}){tail}"
    # Every policy below compares measured speed (tasks.config.TIMED_POLICIES).
    untimed = [f for f in figures if f.samples_per_s is None or f.p50_ms is None]
    if untimed:
        f = untimed[0]
        raise _fail(
            got=f"--ship {policy}, but {f.precision} has no timings ({f.untimed or 'not profiled'})",
            expected="the speed profile of every variant that passed",
            because=f"'{kind}' compares measured speed",
            fix="let the profile stage run (drop --no-profile) or fix its failure, or pass --ship smallest or --ship PRECISION",
            summary=f"--ship {policy} needs timings, {f.precision} has none ({f.untimed or 'not profiled'}); drop --no-profile or pass --ship smallest",
        )
    if kind == "fastest":
        best = max(figures, key=lambda f: f.samples_per_s or 0.0)
        listed = ", ".join(f"{f.precision} {f.samples_per_s:.0f}" for f in figures)
        return best.precision, f"fastest: {best.precision} has the highest throughput at batch {best.throughput_batch} of the variants that passed (samples/s: {listed}){tail}"
    if kind == "lowest-latency":
        best = min(figures, key=lambda f: f.p50_ms or 0.0)
        listed = ", ".join(f"{f.precision} {f.p50_ms:.4g}" for f in figures)
        return best.precision, f"lowest-latency: {best.precision} has the lowest p50 at batch {best.latency_batch} of the variants that passed (ms: {listed}){tail}"
    assert kind == "latency-budget" and isinstance(value, float)
    within = [f for f in figures if (f.p50_ms or 0.0) <= value]
    listed = ", ".join(f"{f.precision} {f.p50_ms:.4g} ms" for f in figures)
    if not within:
        quickest = min(figures, key=lambda f: f.p50_ms or 0.0)
        raise _fail(
            got=f"--ship latency-budget={value:g}: no variant that passed has a batch-{quickest.latency_batch} p50 within {value:g} ms ({listed})",
            expected=f"at least one variant with p50 <= {value:g} ms",
            because="the budget admits only variants whose measured p50 latency is within it",
            fix=f"raise the budget to at least {quickest.p50_ms:.4g} (latency-budget={quickest.p50_ms:.4g}), or pass --ship lowest-latency",
            summary=f"latency-budget={value:g} ms: no passed variant is that fast (best {quickest.precision} {quickest.p50_ms:.4g} ms); raise the budget",
        )
    best = max(within, key=lambda f: f.samples_per_s or 0.0)
    over = [f.precision for f in figures if f not in within]
    return best.precision, (
        f"latency-budget={value:g}: {best.precision} has the highest throughput ({best.samples_per_s:.0f} samples/s at batch "
        f"{best.throughput_batch}) of the variants that passed with a batch-{best.latency_batch} p50 <= {value:g} ms ({listed}"
        f"{'; over budget: ' + ', '.join(over) if over else ''}){tail}"
    )


def figures_of(precision: str, engine: ArtifactRef, profile: ArtifactRef | None, profile_enabled: bool) -> Figures:
    """The figures of one passed variant: engine file size and, when profiled, p50 and throughput."""
    from tasks.engine import engine_info

    info = engine_info(engine)
    size = engine.path(info.engine_file).stat().st_size
    if profile is None:
        return Figures(precision, size, untimed="the speed profile is off (--no-profile)" if not profile_enabled else "its profile failed (see report.json)")
    m = profile.meta
    return Figures(precision, size, m["latency_ms"]["p50"], m["latency_batch"], m["samples_per_s"], m["throughput_batch"])


# --- writing the bundle ---------------------------------------------------------------------------


def model_name(config: PipelineConfig) -> str:
    """The Triton model name: ``--bundle-name``, else the factory's name made safe (``default_model``)."""
    if config.ship.name:
        return config.ship.name
    attr = config.train.model.rpartition(":")[2]
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", attr).strip("_") or "model"
    return name if not name[0].isdigit() and name[0] != "-" else f"model_{name}"


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write arrays as an uncompressed .npz with fixed timestamps (the same arrays give the same bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for key, arr in arrays.items():
            with z.open(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), "w") as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)


def sample_inputs(data: ArtifactRef, info: Any, count: int) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The first ``count`` real test samples (repeated when the split is smaller), within the engine's batch range.

    Inputs are cast to the engine's input types (within their kind, as the runners do).
    """
    from tasks.data import split_inputs, split_labels, split_size
    from tasks.triton import NUMPY_TYPES, triton_type

    n = max(info.batch.min, min(count, info.batch.max))
    rows = np.arange(n) % split_size(data, "test")
    feed = split_inputs(data, "test", rows)
    types = {s.name: NUMPY_TYPES.get(triton_type(s.dtype, s.name)) for s in info.inputs}
    feed = {k: (v.astype(types[k]) if types.get(k) else v) for k, v in feed.items()}
    y = split_labels(data, "test")
    return feed, (None if y is None else y[rows])


def write_model_repository(
    repository: Path, name: str, info: Any, engine_file: Path, feed: Mapping[str, np.ndarray], max_queue_delay_us: int = 100, header: str = ""
) -> Any:
    """Write ``<repository>/<name>/``: the engine file, ``config.pbtxt`` and the warm-up samples.

    The config is derived from the engine's record (``tasks.triton.model_of_engine``), parsed with
    Triton's schema and checked for what Triton core refuses, before it is written.

    Args:
        repository: the model repository folder.
        name: the model's name (its folder).
        info: the engine's ``EngineInfo``.
        engine_file: the engine file to ship (copied as ``1/model.onnx`` or ``1/model.plan``).
        feed: real input samples (input name -> batch); the first sample warms the model up.
        max_queue_delay_us: the dynamic batcher's longest wait.
        header: a comment for the top of the config.

    Returns:
        The ``TritonModel`` written.

    Raises:
        BundleError: a tensor type Triton cannot name, or a config Triton would refuse.
    """
    from tasks.triton import NUMPY_TYPES, WarmupInput, batched, config_problems, config_text, engine_io, model_of_engine, parsed_config, platform_of, triton_type

    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    shutil.copyfile(engine_file, model_dir / "1" / platform_of(info.backend).model_file)
    # Warm-up: the first real sample of every input, as raw bytes (Triton repeats it to the batch size).
    io = engine_io(info)
    warmup, per_sample = [], batched(io)
    (model_dir / "warmup").mkdir()
    for i, (tensor, dtype, _) in enumerate(io.inputs):
        kind = triton_type(dtype, tensor)
        sample = np.asarray(feed[tensor][0] if per_sample else feed[tensor])
        if kind not in NUMPY_TYPES:  # BF16: numpy has no such type, so the warm-up request is zeros
            warmup.append(WarmupInput(tensor, kind, tuple(sample.shape)))
            continue
        raw = np.ascontiguousarray(sample, dtype=NUMPY_TYPES[kind]).tobytes()  # the bytes Triton reads, in the engine's type
        (model_dir / "warmup" / f"input_{i}").write_bytes(raw)
        warmup.append(WarmupInput(tensor, kind, tuple(sample.shape), f"input_{i}"))
    model = model_of_engine(info, name, max_queue_delay_us, warmup)
    text = config_text(model, header)
    if problems := config_problems(parsed_config(text)):
        raise BundleError(
            got=f"a generated config.pbtxt Triton would refuse: {'; '.join(problems)}",
            expected="a config Triton core accepts",
            because="Triton checks every config before it loads the model",
            fix="report this with the engine's engine.json; pass --no-package meanwhile",
        )
    (model_dir / "config.pbtxt").write_text(text)
    return model


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` except its own ``bundle.json`` (and a store manifest)."""
    return {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not (p.parent == folder and p.name in (BUNDLE_JSON, MANIFEST))
    }


def _trtflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trtflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _variant_record(p: str, verify: ArtifactRef | None, figures: Figures | None, tolerance: Tolerance) -> dict[str, Any]:
    if verify is None:
        return {"passed": False, "why": "no verified engine: its branch failed (report.json names the stage and the error)"}
    gates = {k: verify.meta.get(k) for k in (
        "passed", "numerics", "samples", "outputs", "checks_run", "checks_skipped", "max_abs", "mean_abs", "max_rel",
        "min_cosine", "top1_agreement", "accuracy_reference", "accuracy", "accuracy_drop", "balanced_accuracy")}
    out: dict[str, Any] = {"passed": True, "gates": {**gates, "tolerance": tolerance.model_dump()}, "verify_digest": verify.digest}
    if figures is not None:
        out["figures"] = {
            "engine_bytes": figures.engine_bytes,
            "p50_ms": figures.p50_ms, "latency_batch": figures.latency_batch,
            "samples_per_s": figures.samples_per_s, "throughput_batch": figures.throughput_batch,
            **({"untimed": figures.untimed} if figures.untimed else {}),
        }
    return out


def bundle_of_variants(
    engines: Mapping[str, ArtifactRef],
    verifications: Mapping[str, ArtifactRef],
    profiles: Mapping[str, ArtifactRef],
    checkpoint: ArtifactRef,
    data: ArtifactRef,
    config: PipelineConfig,
    store: Store,
    refresh: bool = False,
) -> ArtifactRef:
    """Choose the variant to ship among those that passed, and write its bundle.

    Args:
        engines: precision -> ``build`` artifact, for the variants that passed (a repaired one's engine).
        verifications: precision -> ``verify`` artifact of the same variants.
        profiles: precision -> ``profile`` artifact, for those that were timed.
        checkpoint: the ``train`` artifact (model provenance).
        data: the ``data`` artifact (the samples are its first test rows; dataset provenance).
        config: the run's config (ship policy, tolerances, and the record of what made the bundle).
        store: the artifact store; the bundle is also copied to ``bundle/`` in its local folder (``--artifacts-dir``).
        refresh: write the bundle again even if an intact one exists.

    Returns:
        The ``package`` artifact; its meta names the shipped variant, the policy and the reason.

    Raises:
        BundleError: nothing passed, nothing meets the policy, or the config Triton would refuse.
    """
    config = PipelineConfig.model_validate(config)

    def make(out: Path) -> dict[str, Any]:
        from tasks.engine import engine_info, runner_from_build
        from tasks.triton import platform_of, schema_version

        attempted = [p.value for p in config.precisions]
        passed = [p for p in attempted if p in engines and p in verifications]
        # An engine that is a precision's rounding emulation (bf16 on a CPU without bf16 kernels) computes
        # in fp32: verified as that precision's numerics, but not an engine of it, so it is never shipped.
        emulated = [p for p in passed if (engine_info(engines[p]).model_extra or {}).get("emulation")]
        kind, value = parse_ship_policy(config.ship.policy)
        if kind == "precision" and value in emulated:
            raise _fail(
                got=f"--ship {value}, but the {value} engine built here is its rounding emulation (fp32 arithmetic)",
                expected=f"a {value} engine that computes in {value}", because=f"this backend has no {value} kernels; the emulation only verifies {value}'s numerics",
                fix=f"build {value} on a backend that runs it (--backend tensorrt on a GPU, or a --targets entry), or ship another precision",
                summary=f"--ship {value}: the {value} engine here is an emulation (no {value} kernels on this backend); build it where {value} runs, or ship another precision",
            )
        shippable = [p for p in passed if p not in emulated]
        figures = {p: figures_of(p, engines[p], profiles.get(p), config.profile.enabled) for p in shippable}
        chosen, reason = choose([figures[p] for p in shippable], config.ship.policy, [p for p in attempted if p not in emulated])
        if emulated:
            reason += f"; not shipped: {', '.join(emulated)} (verified through its rounding emulation: this backend has no kernels for it)"
        engine = engines[chosen]
        info = engine_info(engine)
        engine.verify()
        name = model_name(config)
        plat = platform_of(info.backend)
        feed, labels = sample_inputs(data, info, config.ship.samples)
        with runner_from_build(engine) as runner:
            outputs = runner.infer(feed)
        header = f"Written by trtflow {_trtflow_version()}: {chosen} {info.backend} engine, chosen by --ship {config.ship.policy}."
        model = write_model_repository(out / REPOSITORY, name, info, engine.path(info.engine_file), feed, config.ship.max_queue_delay_us, header)

        ins = {s.name: f"input_{i}" for i, s in enumerate(info.inputs)}
        outs = {k: f"output_{i}" for i, k in enumerate(outputs)}
        arrays = {ins[k]: v for k, v in feed.items()} | {outs[k]: v for k, v in outputs.items()}
        if labels is not None:
            arrays["labels"] = labels
        write_npz(out / SAMPLES, arrays)

        env = dict(info.environment)
        spec = backend_spec(info.backend)
        backend_version = env.get(spec.version_key) or "unknown"
        engine_record: dict[str, Any] = {
            "backend": info.backend, "backend_version": backend_version, "environment": env, "precision": chosen,
            "threads": info.threads, "batch": info.batch.model_dump(), "engine_digest": engine.digest,
            "variant_digest": info.variant_digest, "io_source": model.source,
        }
        if spec.device == "gpu":
            engine_record["gpu"] = {"name": env.get("gpu"), "compute_capability": env.get("compute_capability")}
        verify = verifications[chosen]
        tolerance = config.tolerance(Precision(chosen))
        bundle = {
            "format": FORMAT,
            "name": name,
            "shipped": {
                "precision": chosen, "backend": info.backend, "platform": plat.platform,
                "model_file": f"{REPOSITORY}/{name}/1/{plat.model_file}",
                "config": f"{REPOSITORY}/{name}/config.pbtxt",
            },
            "choice": {"policy": config.ship.policy, "reason": reason},
            "variants": {p: {**_variant_record(p, verifications.get(p) if p in passed else None, figures.get(p), config.tolerance(Precision(p))), "chosen": p == chosen} for p in attempted},
            "samples": {
                "file": SAMPLES, "count": len(next(iter(feed.values()))), "inputs": ins, "outputs": outs,
                "labels": "labels" if labels is not None else None,
                "outputs_from": f"the shipped {chosen} engine ({info.backend} {backend_version}), the one verify checked against PyTorch",
                "tolerance": tolerance.model_dump(), "logits_output": checkpoint.meta.get("logits_output"),
                "verified_on": verify.meta.get("samples"),
            },
            "provenance": {
                "trtflow": _trtflow_version(),
                "config": _portable_config(config),
                "dataset": {"description": (data.meta.get("source") or {}).get("description"), "sha256": (data.meta.get("source") or {}).get("digest"), "splits_digest": data.digest},
                "model": {**model_code(config.train.model), "read_at": "packaging (the files the factory imports, as the cache keys hash them)",
                          "weights_digest": checkpoint.meta.get("weights_digest"), "checkpoint_sha256": checkpoint.files.get("model.pt")},
                "engine": engine_record,
                "triton_schema": f"tritonclient {schema_version()} model_config.proto",
            },
        }
        bundle["files"] = _digests(out)
        (out / BUNDLE_JSON).write_text(json.dumps(bundle, indent=2, default=str) + "\n")
        log.info("package: shipping %s (%s); %s", chosen, plat.platform, reason)
        return {
            "name": name, "precision": chosen, "backend": info.backend, "platform": plat.platform, "policy": config.ship.policy,
            "reason": reason, "model_file": bundle["shipped"]["model_file"], "config": bundle["shipped"]["config"],
            "model_sha256": bundle["files"][bundle["shipped"]["model_file"]],
        }

    inputs = {"engines": dict(engines), "verifications": dict(verifications), "profiles": dict(profiles), "checkpoint": checkpoint, "data": data, "config": config}
    ref = run_stage(SPEC, inputs, store, refresh, make)
    # Runs sharing an artifacts folder replace bundle/ one at a time.
    local = as_store(store).local
    # The copy is this machine's (a local folder), so is its lock.
    with key_lock(local, SPEC.name, MATERIALISING):
        materialised(ref, local / BUNDLE_DIR)
    return ref


def materialised(ref: ArtifactRef, dest: Path) -> Path:
    """Copy a ``package`` artifact's bundle to ``dest`` (``artifacts/bundle/``), replacing an older one.

    An intact copy of the same bundle is left as it is. The new copy is made beside ``dest`` and moved
    into place, so ``dest`` never holds half of one bundle.

    Returns:
        ``dest``.
    """
    ref.verify()
    want = ref.path(BUNDLE_JSON).read_bytes()
    try:
        same = (dest / BUNDLE_JSON).read_bytes() == want and not _mismatches(dest, json.loads(want)["files"])
    except (OSError, ValueError):
        same = False
    if same:
        return dest
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    shutil.copytree(ref.dir, tmp, ignore=lambda d, names: [MANIFEST] if Path(d) == ref.dir else [])
    trash = dest.parent / f".trash-{dest.name}-{uuid.uuid4().hex[:8]}"
    if dest.exists():
        os.replace(dest, trash)
    os.replace(tmp, dest)
    shutil.rmtree(trash, ignore_errors=True)
    return dest


# --- checking a bundle ----------------------------------------------------------------------------


def _mismatches(folder: Path, files: Mapping[str, str]) -> list[str]:
    """Files that differ from their recorded SHA-256, are missing, or are not recorded at all."""
    found = []
    for rel, digest in sorted(files.items()):
        p = folder / rel
        if not p.is_file():
            found.append(f"{rel} is missing")
        elif (got := sha256_file(p)) != digest:
            found.append(f"{rel} has sha256 {got[:12]}…, bundle.json says {digest[:12]}…")
    extra = sorted(set(_digests(folder)) - set(files))
    found += [f"{rel} is not in bundle.json" for rel in extra]
    return found


@dataclass(frozen=True)
class BundleCheck:
    """What ``check_bundle`` confirmed."""

    folder: Path
    files: int
    shipped: str
    samples: str

    @property
    def text(self) -> str:
        return f"bundle {self.folder}: {self.files} files match bundle.json; config.pbtxt parses with Triton's schema; {self.samples}; ships {self.shipped}"


def _broken(folder: Path, what: str, fix: str, short_fix: str | None = None) -> BundleError:
    return BundleError(
        got=f"{what} in {folder}", expected="a bundle identical to what trtflow packaged",
        because="check-bundle compares every file with the SHA-256 recorded when it was verified and packaged",
        fix=fix, summary=f"{what}; {short_fix or fix}",
    )


def check_bundle(folder: Path, run_samples: bool = True) -> BundleCheck:
    """Check a bundle before it is deployed.

    Every file against its SHA-256 in ``bundle.json`` (and no file beside them), ``config.pbtxt``
    against Triton's schema and core checks, and, when ``run_samples`` and the backend runs here
    (ONNX Runtime; TensorRT with the same version on the same GPU model), the stored samples through
    the shipped engine file within the shipped variant's tolerance.

    Returns:
        What was checked, with one line of text.

    Raises:
        BundleError: one line naming the first thing that does not match.
    """
    from tasks.triton import config_problems, parsed_config

    folder = Path(folder)
    refetch, again = "copy the bundle again from where trtflow wrote it, or run trtflow run to package it again", "copy it again or re-run trtflow run"
    try:
        bundle = json.loads((folder / BUNDLE_JSON).read_text())
        files, shipped = dict(bundle["files"]), bundle["shipped"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _broken(folder, f"no readable {BUNDLE_JSON} ({type(exc).__name__}: {exc})", "pass the bundle folder (the one holding bundle.json)") from None
    if bundle.get("format") != FORMAT:
        raise _broken(folder, f"bundle format {bundle.get('format')!r}", f"check it with the trtflow that wrote it ({FORMAT} here)")
    if problems := _mismatches(folder, files):
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise _broken(folder, problems[0] + more, refetch, again)
    text = (folder / shipped["config"]).read_text()
    config = parsed_config(text, shipped["config"])
    if problems := config_problems(config):
        raise _broken(folder, f"{shipped['config']}: {problems[0]}", refetch, again)
    if config.platform != shipped["platform"]:
        raise _broken(folder, f"{shipped['config']} says platform {config.platform!r}, bundle.json {shipped['platform']!r}", refetch, again)
    how = "samples not run (--no-samples)"
    if run_samples:
        how = _samples_through_backend(folder, bundle)
    return BundleCheck(folder, len(files), f"{shipped['precision']} {shipped['backend']} as '{bundle['name']}'", how)


def _samples_through_backend(folder: Path, bundle: Mapping[str, Any]) -> str:
    """Run the stored samples through the shipped engine file when its backend runs here; say what was done."""
    from tasks.compare import compare_outputs

    shipped, samples, engine = bundle["shipped"], bundle["samples"], bundle["provenance"]["engine"]
    runner, backend = _local_runner(folder / shipped["model_file"], shipped["backend"], engine)
    if runner is None:
        return f"samples not run: {backend}"
    with np.load(folder / samples["file"], allow_pickle=False) as z:
        feed = {name: z[key] for name, key in samples["inputs"].items()}
        expected = {name: z[key] for name, key in samples["outputs"].items()}
    with runner:
        got = runner.infer(feed)
    tol = Tolerance.model_validate(samples["tolerance"])
    logits = samples.get("logits_output")
    # Identical arrays pass as they are: cosine is undefined for an all-zero row.
    differing = {k: v for k, v in expected.items() if not (k in got and got[k].shape == v.shape and np.array_equal(got[k], v))}
    result = compare_outputs(differing, got, tol, label="samples", task_outputs={logits} if logits else set())
    if not result.passed:
        first = next(c for c in result.checks if not c.passed).describe()
        raise BundleError(
            got=f"{samples['count']} samples through {shipped['backend']} outside the {shipped['precision']} tolerance: {first}",
            expected="the outputs recorded when the bundle was verified, within its tolerance",
            because="the engine file runs differently here (another backend version or machine) or was replaced",
            fix="deploy with the backend version bundle.json names, or package again on this machine",
            summary=f"samples differ from the bundle's verified outputs: {first}",
        )
    worst = max((s.max_abs for s in result.outputs.values()), default=0.0)
    return f"{samples['count']} samples through {backend} within the {shipped['precision']} tolerance (max abs diff {worst:.3g})"


def _local_runner(model_file: Path, backend: str, engine: Mapping[str, Any]) -> tuple[Any, str]:
    """A runner for the shipped file on this machine and the backend's name and version, or None and
    why it cannot run here."""
    try:
        spec = backend_spec(backend)
    except BackendUnavailableError:
        return None, f"no local runner for backend '{backend}'"
    builder = builder_for(backend)
    if (why := builder.availability()) is not None:
        return None, f"{spec.label or spec.name} cannot run here ({why})"
    here, there = builder.environment(), engine.get("environment") or {}
    for key in spec.portable_keys:
        if here.get(key) != there.get(key):
            return None, f"the engine was built for {key} {there.get(key)}, this machine has {here.get(key)} ({spec.engine_format} files are not portable)"
    batch = engine.get("batch") or {"min": 1, "opt": 1, "max": 1}
    info = EngineInfo(backend=backend, engine_file=model_file.name, batch=batch, inputs=[], outputs=[], threads=engine.get("threads"))
    on = f" on {here['gpu']}" if spec.device == "gpu" and "gpu" in here else ""
    return builder.runner_from_engine(model_file, info), f"{spec.name} {here.get(spec.version_key, '')}{on}"
