"""Command line of trtflow.

    trtflow run                              # bundled digits, fp32 + fp16 + int8, backend auto
    trtflow run --epochs 10 --precisions fp16,int8 --max-batch 128
    trtflow run --dataset my.npz --model mypkg.models:make_net
    trtflow run --refresh verify             # recompute one stage and what depends on it
    trtflow run --task-runner dask           # stages on a local Dask cluster (pip install ".[dask]")
    trtflow serve --cron "0 2 * * *"         # a deployment served from this process (see flows/serve.py)
    trtflow --help

Exit status: 0 when every precision verified, 1 when a stage failed, 2 for invalid options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tasks.config import Backend, Stage

EXIT_FAILED, EXIT_USAGE = 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trtflow", description="Turn a PyTorch model into verified inference engines (a Prefect flow).")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the pipeline (cached stages are reused)", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = run.add_argument_group("data and model")
    g.add_argument("--dataset", type=Path, help=".npz (one array per forward input, y: labels) or a folder of .npy files (memory-mapped); default: bundled digits")
    g.add_argument("--model", help="model factory 'package.module:callable': an nn.Module subclass or a function (default: CNN for images, MLP otherwise)")
    g.add_argument("--model-kwargs", metavar="JSON", help="extra keyword arguments of the factory, e.g. '{\"hidden\": 64}'")
    g.add_argument("--weights", type=Path, help="trained weights (state_dict .pt, checkpoint dict, or .safetensors); without --epochs nothing is trained")
    g.add_argument("--logits-output", metavar="NAME", help="the model output holding class logits (default: the first shaped N×classes)")
    g.add_argument("--epochs", type=int, help="training epochs (default 5); with --weights: fine-tune for this many (without: load only)")
    g.add_argument("--batch-size", type=int, help="training mini-batch size")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--seed", type=int, help="seed of split, init and shuffling")
    g.add_argument("--threads", type=int, help="CPU threads for training and ONNX Runtime")
    g.add_argument("--balance", choices=["none", "class_weight", "oversample"], help="re-balance skewed labels: weighted loss or weighted sampling")
    g.add_argument("--imbalance", type=float, metavar="SHARE", help="make --majority-class this share of the training split (demos, tests)")
    g.add_argument("--majority-class", type=int, metavar="K", help="the class --imbalance inflates (default 0)")
    g.add_argument("--max-majority-share", type=float, help="collapse gate: largest share of predictions one class may get (default 0.8)")
    g.add_argument("--min-balanced-accuracy-over-chance", type=float, help="collapse gate: balanced accuracy must beat 1/classes by this (default 0.1)")
    g.add_argument("--no-collapse-gate", action="store_true", help="record the metrics but never fail on a collapsed model")
    g = run.add_argument_group("engines")
    g.add_argument("--precisions", help="comma-separated: fp32,fp16,int8 (default all three)")
    g.add_argument("--backend", choices=[b.value for b in Backend], help="default auto")
    g.add_argument("--min-batch", type=int)
    g.add_argument("--opt-batch", type=int)
    g.add_argument("--max-batch", type=int)
    g.add_argument("--calibration-samples", type=int, help="training samples that calibrate int8")
    g.add_argument("--no-tf32", action="store_true", help="strict fp32 in TensorRT engines")
    g.add_argument("--no-profile", action="store_true", help="skip timing the engines against PyTorch (the profile stage)")
    g.add_argument("--repair", action=argparse.BooleanOptionalAction, default=None, help="keep the worst nodes of a failing fp16/int8 variant in fp32 and re-verify (default on)")
    g.add_argument("--repair-budget", type=int, metavar="N", help="most nodes a repair may keep in fp32 (default 4)")
    g.add_argument("--tolerance", action="append", default=[], metavar="PRECISION.METRIC=VALUE", help="override a threshold, e.g. fp16.atol=0.02 (repeatable)")
    g = run.add_argument_group("run")
    g.add_argument("--artifacts-dir", type=Path, help="where outputs and the cache live (default ./artifacts)")
    g.add_argument("--refresh", action="append", default=[], choices=[s.value for s in Stage], help="recompute this stage and its dependents (repeatable)")
    g.add_argument("--config", type=Path, help="a JSON file of PipelineConfig; options given here override it")
    g.add_argument("--json", action="store_true", help="print the report as JSON")
    from flows.serve import add_runner_options, add_serve_parser

    add_runner_options(run)
    add_serve_parser(sub)
    return p


def config_from_args(args: argparse.Namespace) -> Any:
    """Build a validated PipelineConfig from the options (and an optional JSON file).

    Raises:
        ConfigError: invalid values, with every problem named.
    """
    from pydantic import ValidationError

    from tasks.config import PipelineConfig, Tolerance, parse_precisions, read_config_file, validation_problems
    from tasks.errors import ConfigError

    raw: dict[str, Any] = read_config_file(args.config) if args.config else {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = raw
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value

    put("data.dataset", str(args.dataset) if args.dataset else None)
    put("data.seed", args.seed)
    put("train.model", args.model)
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError as exc:
            raise ConfigError(got=f"--model-kwargs {args.model_kwargs!r} ({exc})", expected="a JSON object", because="it holds the factory's keyword arguments", fix='quote it for the shell, e.g. --model-kwargs \'{"hidden": 64}\'') from None
        if not isinstance(kwargs, dict):
            raise ConfigError(got=f"--model-kwargs {args.model_kwargs!r}", expected="a JSON object of keyword arguments", because="it holds the factory's keyword arguments by name", fix='e.g. --model-kwargs \'{"hidden": 64}\'')
        put("train.model_kwargs", kwargs)
    put("train.weights", str(args.weights) if args.weights else None)
    # --weights alone converts the model as it is; --weights with --epochs fine-tunes it.
    put("train.fine_tune", True if args.weights and args.epochs is not None else None)
    put("train.logits_output", args.logits_output)
    put("train.epochs", args.epochs)
    put("train.batch_size", args.batch_size)
    put("train.lr", args.lr)
    put("train.seed", args.seed)
    put("train.threads", args.threads)
    put("train.balance", args.balance)
    put("data.imbalance", args.imbalance)
    put("data.majority_class", args.majority_class)
    put("train.collapse_gate.max_majority_prediction_share", args.max_majority_share)
    put("train.collapse_gate.min_balanced_accuracy_over_chance", args.min_balanced_accuracy_over_chance)
    put("train.collapse_gate.enabled", False if args.no_collapse_gate else None)
    put("engine.threads", args.threads)
    put("precisions", [p.value for p in parse_precisions(args.precisions)] if args.precisions else None)
    put("backend", args.backend)
    put("batch.min", args.min_batch)
    put("batch.opt", args.opt_batch)
    put("batch.max", args.max_batch)
    put("calibration_samples", args.calibration_samples)
    put("engine.tf32", False if args.no_tf32 else None)
    put("profile.enabled", False if args.no_profile else None)
    put("repair.enabled", args.repair)
    put("repair.budget", args.repair_budget)
    put("artifacts_dir", str(args.artifacts_dir) if args.artifacts_dir else None)
    put("refresh", args.refresh or None)
    for item in args.tolerance:
        # Merged into the config file's thresholds, then field by field into the precision's defaults.
        name, _, value = item.partition("=")
        prec, _, metric = name.partition(".")
        if metric not in Tolerance.model_fields or not value:
            raise ConfigError(got=f"--tolerance {item}", expected=f"PRECISION.METRIC=VALUE with METRIC one of {sorted(Tolerance.model_fields)}", because="only those thresholds exist", fix="e.g. --tolerance fp16.atol=0.02")
        thresholds = raw.setdefault("tolerances", {}).setdefault(parse_precisions(prec)[0].value, {})
        thresholds[metric] = None if value.lower() == "none" else value
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(got=validation_problems(exc), expected="valid options", because="the run cannot start with them", fix="fix the options named above (see trtflow run --help)") from None
    return config


def _print_summary(report: dict[str, Any], root: Path) -> None:
    print(f"\ntrtflow: {report['backend']}")
    print(f"{'precision':<10}{'passed':<8}{'accuracy':>10}{'top-1 agree':>13}{'min cosine':>12}{'max abs err':>13}  engine")
    for p, r in report["precisions"].items():
        if "error" in r:
            print(f"{p:<10}{'no':<8}  {r['failed_stage']} failed")
            continue
        def num(v: Any, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        print(f"{p:<10}{'yes' if r['passed'] else 'no':<8}{num(r['accuracy'], '.4f'):>10}{num(r['top1_agreement'], '.4f'):>13}{num(r['min_cosine'], '.6f'):>12}{num(r['max_abs'], '.3g'):>13}  {root / r['engine']}")
    skipped = next((r.get("checks_skipped") for r in report["precisions"].values() if r.get("checks_skipped")), None)
    if skipped:
        print("not checked: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()))
    from flows.report import numerics_lines, repair_lines

    for line in numerics_lines(report["precisions"]):
        print(f"numerics {line}")
    for line in repair_lines(report["precisions"]):
        print(f"repair {line}")
    for p, r in report["precisions"].items():
        if s := r.get("profile"):
            speed = f"profile failed: {s['error']}" if "error" in s else (
                f"p50 {s['latency_ms']['p50']:.3f} ms at batch {s['latency_batch']}, {s['samples_per_s']:.0f} samples/s at batch "
                f"{s['throughput_batch']}, {s['speedup']['throughput'] or 0:.2f}x PyTorch throughput"
            )
            print(f"speed {p:<5} {speed}")
    print(f"report: {root / 'report.json'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``trtflow`` command; returns the exit status."""
    args = _parser().parse_args(argv)
    # Like `python -m`: model factories in the current folder are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    from tasks.errors import ConfigError, TrtflowError

    if args.command == "serve":
        from flows.serve import serve

        try:
            return serve(args)
        except ConfigError as exc:
            print(f"trtflow: invalid options: {exc}", file=sys.stderr)
            return EXIT_USAGE
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"trtflow: invalid options: {exc}", file=sys.stderr)
        return EXIT_USAGE
    from flows.serve import pipeline_on

    try:
        report = pipeline_on(args.task_runner, args.dask_address, args.dask_workers)(config)
    except ConfigError as exc:
        print(f"trtflow: invalid options: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TrtflowError as exc:
        print(f"trtflow: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        # A full disk or an I/O failure outside a stage's staging folder: say so without a traceback.
        print(f"trtflow: storage error: {exc.strerror or exc} ({exc.filename or config.artifacts_dir}); "
              "finished stages stay cached: fix the disk and run the same command again", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("trtflow: interrupted; finished stages stay cached, run the same command to resume", file=sys.stderr)
        return 130
    root = Path(config.artifacts_dir).expanduser().resolve()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_summary(report, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
