"""The `xlstm-jax` command line: `train` (the main job: an xLSTM on synthetic MQAR by default, or on token / text
files with --data; `xlstm_jax.train`),
`generate` (sampling from a checkpoint: text or token ids), `eval` (loss, perplexity and bits per byte on text or
token files), `serve` (an OpenAI-compatible server with continuous batching; `xlstm_jax.serve`), `bench`
(`xlstm_jax.bench`) and `doctor` (versions and backend checks).

Each sub-command adds its options when it is used, and jax (with flax, optax, orbax) is imported only when a
command runs, so `xlstm-jax --help` and `xlstm-jax train --help` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from xlstm_jax import compat
from xlstm_jax.eval_cli import EVAL_DESCRIPTION, add_eval_arguments
from xlstm_jax.generate_cli import GENERATE_DESCRIPTION, add_generate_arguments
from xlstm_jax.serve.cli import SERVE_DESCRIPTION, add_serve_arguments
from xlstm_jax.train.cli import TRAIN_DESCRIPTION, add_train_arguments


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser that adds its options (`add_arguments(parser)`) on first use."""

    def __init__(self, *args: Any, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._add_arguments = add_arguments

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._add_arguments is not None:
            add, self._add_arguments = self._add_arguments, None
            add(self)
        return super().parse_known_args(args, namespace)


def _backend_list(text: str) -> list[str]:
    from xlstm_jax.bench.runner import name_list
    from xlstm_jax.mlstm.api import IMPLEMENTATIONS

    return name_list(text, IMPLEMENTATIONS, "backend")


def _add_doctor_arguments(doctor: argparse.ArgumentParser) -> None:
    doctor.add_argument(
        "--backends", nargs="+", type=_backend_list, metavar="NAME",
        help="only check these backends (space- or comma-separated); default: all",
    )
    doctor.add_argument("--quick", action="store_true", help="one tiny problem per backend instead of two")


def _add_bench_arguments(bench: argparse.ArgumentParser) -> None:
    from xlstm_jax.bench.runner import add_arguments

    add_arguments(bench, backend_type=_backend_list)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-command per task."""
    parser = argparse.ArgumentParser(prog="xlstm-jax", description="xlstm_jax: mLSTM kernels and models for JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    sub.add_parser("train", help="train an xLSTM: synthetic multi-query associative recall by default, text or token files with --data",
                   description=TRAIN_DESCRIPTION, add_arguments=add_train_arguments,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_parser("generate", help="sample from a trained or pretrained xLSTM checkpoint",
                   description=GENERATE_DESCRIPTION, add_arguments=add_generate_arguments,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on text or token files",
                   description=EVAL_DESCRIPTION, add_arguments=add_eval_arguments)
    sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching over state slots",
                   description=SERVE_DESCRIPTION, add_arguments=add_serve_arguments,
                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub.add_parser(
        "doctor",
        help="check versions and backends, and run every runnable backend against the float64 reference",
        description="Print versions and known-bad combinations, list the mLSTM backends and whether they can run "
        "here, and check each runnable one (forward and backward, with states) against the float64 reference. "
        "Exits 1 on a FAIL or a refused version combination.",
        add_arguments=_add_doctor_arguments,
    )
    sub.add_parser(
        "bench",
        help="time the mLSTM backends and the installed peers; table, CSV, JSON and plots",
        description="Measure runtime, peak memory and the roofline fractions of every backend (and of the peers "
        "that are installed) over a preset sweep of shapes; print a table and write results.csv, results.json, "
        "runtime.png and roofline.png under --out. Exits 1 if an xlstm_jax case failed.",
        add_arguments=_add_bench_arguments,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `xlstm-jax` console script; returns the exit status (2: a usage error, reported as one
    `error:` line on stderr)."""
    args = build_parser().parse_args(argv)
    if args.command != "doctor":  # the doctor reports these; the rest would run JAX on the wrong device
        for severity, message in compat.environment_problems(os.environ, compat.cuda_plugin_installed()):
            if severity == "error":
                print(f"error: {message}", file=sys.stderr)
                return 2
    if args.command == "doctor":
        from xlstm_jax.doctor import run_doctor

        backends = None if args.backends is None else list(dict.fromkeys(n for group in args.backends for n in group))
        return run_doctor(backends=backends, quick=args.quick)
    if args.command in ("train", "generate", "eval"):
        from xlstm_jax.eval_cli import run_eval
        from xlstm_jax.generate_cli import run_generate
        from xlstm_jax.train.cli import run_train

        return {"train": run_train, "generate": run_generate, "eval": run_eval}[args.command](args)
    if args.command == "serve":
        from xlstm_jax.serve.cli import run_serve

        return run_serve(args)
    if args.command == "bench":
        from xlstm_jax.bench.runner import run_bench

        return run_bench(args)
    raise AssertionError(f"unhandled command {args.command!r}")


if __name__ == "__main__":
    raise SystemExit(main())
