"""Command line of trtflow.

    trtflow run                              # bundled digits, fp32 + fp16 + int8, backend auto
    trtflow run --epochs 10 --precisions fp16,int8 --max-batch 128
    trtflow run --dataset my.npz --model mypkg.models:make_net
    trtflow run --refresh verify             # recompute one stage and what depends on it
    trtflow run --task-runner dask           # stages on a local Dask cluster (pip install ".[dask]")
    trtflow serve --cron "0 2 * * *"         # a deployment served from this process (see flows/serve.py)
    trtflow check-bundle artifacts/bundle    # digests, Triton config and samples of the bundle a run shipped
    trtflow --help

Exit status: 0 when every precision verified, 1 when a stage failed, 2 for invalid options,
130 (143) when interrupted by Ctrl-C (SIGTERM). -v/--debug shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT_FAILED, EXIT_USAGE = 1, 2


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("trtflow")
    except PackageNotFoundError:
        return "unknown (not installed)"


class _Help(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and gives the options room."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36, width=110)


def _parser() -> argparse.ArgumentParser:
    from tasks.options import add_config_options

    p = argparse.ArgumentParser(prog="trtflow", description="Turn a PyTorch model into verified inference engines (a Prefect flow).")
    p.add_argument("--version", action="version", version=f"trtflow {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (cached stages are reused)", description=__doc__, formatter_class=_Help)
    add_config_options(run)
    g = run.add_argument_group("thresholds and files")
    g.add_argument("--tolerance", action="append", default=[], metavar="PRECISION.METRIC=VALUE", help="override a threshold, e.g. fp16.atol=0.02 (repeatable; defaults in docs/tolerances.md)")
    g.add_argument("--config", type=Path, help="a JSON file of PipelineConfig; options given here override it")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    g.add_argument("-v", "--debug", action="store_true", help="show tracebacks and Prefect's full log lines")
    from flows.serve import add_runner_options, add_serve_parser

    add_runner_options(run)
    add_serve_parser(sub)
    check = sub.add_parser(
        "check-bundle", help="verify a deployment bundle before it ships: digests, Triton config, samples",
        description="Check a bundle written by `trtflow run` (artifacts/bundle/): every file against its SHA-256 in bundle.json, "
        "config.pbtxt against Triton's schema, and the stored samples through the local backend (ONNX Runtime; TensorRT "
        "with the same version on the same GPU model) within the shipped variant's tolerance. Exit 0, or 1 with one line "
        "naming what does not match.",
    )
    check.add_argument("dir", nargs="?", type=Path, default=Path("artifacts/bundle"), help="the bundle folder, holding bundle.json (default: artifacts/bundle)")
    check.add_argument("--no-samples", action="store_true", help="check digests and config only")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("-v", "--debug", action="store_true", help="show tracebacks")
    return p


def check_bundle_command(args: argparse.Namespace) -> int:
    """``trtflow check-bundle DIR``: 0 when the bundle is intact and its samples reproduce, else 1 with one line."""
    from tasks.package import check_bundle

    try:
        result = check_bundle(args.dir, run_samples=not args.no_samples)
    except Exception as exc:  # noqa: BLE001 - a BundleError, or anything else: one line, never a traceback
        _fail(exc, args.debug)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"ok": True, "folder": str(result.folder), "files": result.files, "shipped": result.shipped, "samples": result.samples}))
    else:
        print(result.text)
    return 0


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a validated PipelineConfig from the options (and an optional JSON file).

    Raises:
        ConfigError: invalid values, with every problem named.
    """
    from pydantic import ValidationError

    from tasks.config import PipelineConfig, Precision, Tolerance, parse_precisions, read_config_file, validation_problems
    from tasks.errors import ConfigError
    from tasks.options import config_dict_from_args

    raw: dict[str, Any] = read_config_file(args.config) if args.config else {}
    for item in args.tolerance:
        # Merged into the config file's thresholds, then field by field into the precision's defaults.
        name, _, value = item.partition("=")
        prec, _, metric = name.partition(".")
        if metric not in Tolerance.model_fields or not value:
            raise ConfigError(got=f"--tolerance {item}", expected=f"PRECISION.METRIC=VALUE with METRIC one of {sorted(Tolerance.model_fields)}", because="only those thresholds exist", fix="e.g. --tolerance fp16.atol=0.02",
                              summary=f"--tolerance {item}: METRIC one of {', '.join(sorted(Tolerance.model_fields))}, e.g. fp16.atol=0.02")
        try:
            precision = parse_precisions(prec)[0]
        except ConfigError:
            names = ", ".join(p.value for p in Precision)
            raise ConfigError(got=f"--tolerance {item}", expected=f"PRECISION.METRIC=VALUE with PRECISION one of {names}", because="each precision has its own thresholds", fix="e.g. --tolerance fp16.atol=0.02",
                              summary=f"--tolerance {item}: PRECISION one of {names}, e.g. fp16.atol=0.02") from None
        thresholds = raw.setdefault("tolerances", {}).setdefault(precision.value, {})
        thresholds[metric] = None if value.lower() == "none" else value
    raw = config_dict_from_args(args, raw)
    if getattr(args, "weights", None) and args.epochs is not None:
        # --weights alone converts the model as it is; --weights with --epochs fine-tunes it.
        raw.setdefault("train", {})["fine_tune"] = True
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        problems = validation_problems(exc)
        raise ConfigError(got=problems, expected="valid options", because="the run cannot start with them", fix="fix the options named above (see trtflow run --help)", summary=f"{problems}; see trtflow run --help") from None
    return config


def _shown(path: Path) -> str:
    """A path as a user would type it: relative to the current folder when inside it, else with ~."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        home = Path.home()
        try:
            return "~/" + str(path.resolve().relative_to(home.resolve()))
        except ValueError:
            return str(path)


def _print_summary(report: dict[str, Any], root: Path) -> None:
    from flows.report import batch_lines, bundle_lines, compute_text, judged_lines, numerics_lines, repair_lines

    def num(v: Any, fmt: str) -> str:
        return "n/a" if v is None else format(v, fmt)

    print(f"\ntrtflow: {report['backend']}")
    regression = (report.get("model") or {}).get("task") == "regression"
    # A regression is judged by R² against the labels and the error relative to the outputs' spread.
    cols = (("r2", "R²", ".4f"), ("r2_drop", "R² drop", ".4f"), ("max_relative_rmse", "rel. RMSE", ".3g")) if regression else (
        ("accuracy", "accuracy", ".4f"), ("top1_agreement", "top-1 agree", ".4f"), ("min_cosine", "min cosine", ".6f"))
    widths = (10, 13, 12)
    # rows of a run over several targets are "<target>/<precision>"
    pw = max([10, *(len(p) + 2 for p in report["precisions"])])
    print(f"{'precision':<{pw}}{'passed':<8}{'compute ops':>12}" + "".join(f"{label:>{w}}" for (_, label, _), w in zip(cols, widths)) + f"{'max abs err':>13}  engine")
    for p, r in report["precisions"].items():
        if "error" in r:
            print(f"{p:<{pw}}{'no':<8}{compute_text(r):>12}  {r['failed_stage']} failed")
            continue
        print(f"{p:<{pw}}{'yes' if r['passed'] else 'no':<8}{compute_text(r):>12}" + "".join(f"{num(r.get(k), f):>{w}}" for (k, _, f), w in zip(cols, widths, strict=True))
              + f"{num(r['max_abs'], '.3g'):>13}  {_shown(root / r['engine'])}")
    for name, t in (report.get("targets") or {}).items():
        print(f"target {name}: pool {t['pool']}, {t['state']}" + (f", {t['backend']}" if t.get("backend") else "") + (f"; {t['error']}" if t.get("error") else "")
              + (f"; its report: {t['report']} on that target" if t.get("report") else ""))
    for line in batch_lines(report["precisions"]):
        print(f"verified {line}")
    skipped = next((r.get("checks_skipped") for r in report["precisions"].values() if r.get("checks_skipped")), None)
    if skipped:
        print("not checked: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))

    for line in judged_lines(report["precisions"]):
        print(line)
    for line in numerics_lines(report["precisions"]):
        print(f"numerics {line}")
    for line in repair_lines(report["precisions"]):
        print(f"repair {line}")
    for p, r in report["precisions"].items():
        if s := r.get("profile"):
            shapes = [x for x in s.get("shapes") or [] if x.get("level") in ("min", "opt", "max")]
            speed = f"profile failed: {s['error']}" if "error" in s else (
                "; ".join(f"{x['shape']}: p50 {x['p50_ms']:.3f} ms, {x['samples_per_s'] or 0:.0f} samples/s" for x in shapes)
                + f"; {s['speedup']['throughput'] or 0:.2f}x PyTorch throughput at the max shape"
            ) if shapes else (
                f"p50 {s['latency_ms']['p50']:.3f} ms at batch {s['latency_batch']}, {s['samples_per_s']:.0f} samples/s at batch "
                f"{s['throughput_batch']}, {s['speedup']['throughput'] or 0:.2f}x PyTorch throughput"
            )
            print(f"speed {p:<5} {speed}")
    for line in bundle_lines(report, _shown(root / (report.get("bundle") or {}).get("path", "bundle"))):
        print(line)
    # This run's own report: report.json may already hold a concurrent run's.
    print(f"report: {_shown(root / report.get('report', 'report.json'))}")


def _fail(exc: BaseException, debug: bool) -> None:
    """Print an error as the terminal should show it: one line, a few indented details; traceback only with --debug."""
    from tasks.errors import TrtflowError, one_line

    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    text = exc.render(debug) if isinstance(exc, TrtflowError) else one_line(f"{type(exc).__name__}: {exc}", 150)  # type: ignore[union-attr]
    print(f"trtflow: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trtflow`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    # Like `python -m`: model factories in the current folder are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if args.command == "check-bundle":
        return check_bundle_command(args)
    from flows.runtime import PrefectServerError, prepare_environment
    from tasks.errors import ConfigError, StorageError, TrtflowError

    prepare_environment()
    if args.command == "serve":
        from flows.serve import serve

        try:
            return serve(args)
        except ConfigError as exc:
            _fail(exc, debug)
            return EXIT_USAGE
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        _fail(exc, debug)
        return EXIT_USAGE
    started = False  # once the flow runs, whatever fails is a failed stage (exit 1), never an invalid option
    try:
        # Everything that needs no Prefect, before its server starts: a bad input fails in seconds.
        from flows.preflight import check_before_run
        from flows.runtime import RunHandle, run_flow, signals_end_the_run

        with signals_end_the_run(RunHandle()):  # Ctrl-C / SIGTERM during the checks: one line too
            check_before_run(config)
        from flows.serve import pipeline_on

        flow = pipeline_on(args.task_runner, args.dask_address, args.dask_workers)
        started = True
        report = run_flow(flow, config, debug)
    except ConfigError as exc:
        _fail(exc, debug)
        return EXIT_FAILED if started else EXIT_USAGE
    except (TrtflowError, PrefectServerError) as exc:
        _fail(exc, debug)
        return EXIT_FAILED
    except OSError as exc:
        # A full disk or an I/O failure outside a stage's staging folder: say so without a traceback.
        _fail(StorageError(
            got=f"{exc.strerror or exc} ({exc.filename or config.artifacts_dir})",
            expected="a writable disk with free space", because="trtflow writes every stage's output to the artifacts folder",
            fix="fix the disk (free space, permissions) and run the same command again: finished stages are reused",
            summary=f"storage error: {exc.strerror or exc} ({_shown(Path(exc.filename or config.artifacts_dir))}); fix the disk and run the same command again",
        ), debug)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("trtflow: interrupted; finished stages are kept, run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - an unexpected failure still gets one line, not a traceback
        _fail(exc, debug)
        if not debug:
            print("  (an unexpected error: run the same command with -v for the traceback, and report it)", file=sys.stderr)
        return EXIT_FAILED
    root = Path(config.artifacts_dir).expanduser().resolve()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
