"""`rayscale` command line: parse, then call the Python API (rayscale/api.py) or a tool.

Nothing runs at import time.

Bad input (a `UserError`) is printed as one line on stderr with exit code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import yaml

from rayscale import config as config_module
from rayscale import rules
from rayscale.errors import NonFiniteError, SearchFailed, UserError, WorkersOutOfMemory, on_the_command_line

EXIT_BAD_INPUT = 2
EXIT_SEARCH_FAILED = 1  # the search ran, but not one trial trained to a result
EXIT_OUT_OF_MEMORY = 1  # Ray killed a worker of the run for its node's memory, and Train gave up on the run
EXIT_DIVERGED = 1  # the run trained until its loss or gradients stayed non-finite (train.max_nonfinite_steps)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML config file (default: the embedded defaults)")
    parser.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override keys, e.g. --set optim.lr=0.1 train.epochs=3 (repeatable)")


def _cluster_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, else an embedded "
                                          "local Ray on 127.0.0.1)")


class _Parser(argparse.ArgumentParser):
    """A mistake in the flags gets the one-line form of every other bad input (exit 2); argparse's own printed
    the usage block first. Its subcommands' parsers are of this class too (add_subparsers takes the parent's)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("rayscale").strip()
        self.exit(EXIT_BAD_INPUT, f"rayscale: error: {command + ': ' if command else ''}{message} "
                                  f"(see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rayscale", description="Train and tune PyTorch models on Ray: Ray Data "
                                     "into Ray Train DDP workers, Ray Tune ASHA over them.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for bad input")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model on Ray (embedded default: MLP on digits)")
    _config_args(train)
    _cluster_args(train)

    tune = commands.add_parser("tune", help="search batch size and lr decay with ASHA (default: digits)")
    _config_args(tune)
    _cluster_args(tune)
    tune.add_argument("--resume", action="store_true", help="continue the search in run.output_dir/run.name")

    finder = commands.add_parser("find-batch-size", help="the largest micro-batch that fits on the device, and "
                                                        "the memory per sample")
    _config_args(finder)
    finder.add_argument("--max", type=int, help="largest micro-batch to try (default: 8x the per-worker batch)")
    finder.add_argument("--memory-mb", type=float, help="CPU only: the memory a step may use (default: half of "
                                                        "what is available now)")

    suggest = commands.add_parser("suggest", help="recommend a global batch size and lr from a finished run's "
                                                  "noise scale and step timings")
    suggest.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by rayscale train")
    suggest.add_argument("--max-batch", type=int, help="largest global batch to consider (default: 64x the run's)")
    suggest.add_argument("--plot", help="where to write the figure (default: RUN_DIR/suggest.png)")

    evaluation = commands.add_parser("eval", help="a finished run's model over its validation split or other data: "
                                                 "val_loss, val_accuracy and train.metrics")
    evaluation.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by rayscale train")
    evaluation.add_argument("--data", help="a Parquet file, directory, glob or URI with the run's columns (default: "
                                           "the run's validation split)")
    evaluation.add_argument("--output", help="where to write the metrics as JSON (default: RUN_DIR/eval.json)")
    evaluation.add_argument("--device", default="cpu", help="cpu (default) or cuda")

    prediction = commands.add_parser("predict", help="batch inference with a finished run's model over the "
                                                     "cluster (Ray Data, an actor pool), written as Parquet")
    prediction.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by rayscale train")
    prediction.add_argument("--data", required=True, help="a Parquet file, directory, glob or URI with the run's "
                                                          "input columns (labels not needed)")
    prediction.add_argument("--output", required=True, help="a new (or empty) directory for the Parquet output")
    prediction.add_argument("--workers", type=int, help="actors holding the model (default: one per GPU, else "
                                                        "the CPUs less one, at most 4)")
    _cluster_args(prediction)

    show = commands.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show_cmd = show.add_parser("show", help="print the resolved config and its derived values")
    _config_args(show_cmd)
    show.add_parser("keys", help="list every key with its type, default and meaning")
    return parser


def derived_values(cfg: config_module.Config) -> dict:
    """What follows from the config: the batch plan and the learning rate after the scaling rule."""
    from rayscale.math.batching import plan_batches
    from rayscale.math.schedules import peak_lr

    plan = plan_batches(cfg.batch.global_batch_size, cfg.batch.micro_batch_size, cfg.scaling.num_workers)
    return {
        "workers": plan.num_workers,
        "per_worker_batch_size": plan.per_worker_batch_size,
        "micro_batch_size": plan.micro_batch_size,
        "accumulation_steps": plan.accumulation_steps,
        "effective_lr": peak_lr(cfg.optim, cfg.batch.global_batch_size, cfg.batch.global_batch_size),
    }


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = config_module.load(args.config, args.overrides)
    rules.check(cfg)  # a config `rayscale train` would refuse is refused here too, with the same line
    derived = derived_values(cfg)  # before printing anything: a bad plan prints only its error
    print(yaml.safe_dump(config_module.to_dict(cfg), sort_keys=False).rstrip())
    print("# derived (not config keys)")
    print(yaml.safe_dump({"derived": derived}, sort_keys=False).rstrip())
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    rows = config_module.describe()
    width = max(len(r[0]) for r in rows)
    for name, type_name, default, doc in rows:
        print(f"{name:<{width}}  {default:<14} {doc}  ({type_name})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from rayscale import api

    api.train(args.config, overrides=args.overrides, address=args.address)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from rayscale import api

    try:
        api.tune(args.config, overrides=args.overrides, address=args.address, resume=args.resume)
    except SearchFailed as failed:  # not bad input (2), but a script must not take it for a finished search
        print(f"rayscale: error: {failed}", file=sys.stderr)
        return EXIT_SEARCH_FAILED
    return 0


def cmd_find_batch_size(args: argparse.Namespace) -> int:
    if args.max is not None and args.max < 1:
        raise UserError(f"--max {args.max}: expected a micro-batch of at least 1")
    if args.memory_mb is not None and not (math.isfinite(args.memory_mb) and args.memory_mb > 0):  # nan, inf
        raise UserError(f"--memory-mb {args.memory_mb:g}: expected a positive number of MiB")
    cfg = config_module.load(args.config, args.overrides)
    from rayscale.tools import batch_size_finder  # torch: once the flags and the config are known to be good

    def started() -> None:  # after the data and the model are checked: a bad one is one line, with no banner
        print(f"[rayscale] find-batch-size: model {cfg.model.name}, data {cfg.data.source}, {cfg.train.precision}, "
              f"optimizer {cfg.optim.name}; one training step per probe", flush=True)

    def shown(probe) -> None:
        if probe.predicted_mb is not None:  # not run: it would have gone past the budget
            print(f"  micro-batch {probe.micro_batch_size:>7,}  {'does not fit':<12}  "
                  f"{f'~{probe.predicted_mb:,.1f} MiB':>14}  predicted, not run", flush=True)
            return
        memory = f"{probe.peak_mb:,.1f} MiB" if probe.peak_mb is not None else "-"
        print(f"  micro-batch {probe.micro_batch_size:>7,}  {'fits' if probe.fits else 'does not fit':<12}  "
              f"{memory:>14}  {probe.seconds:.2f} s", flush=True)

    finding = batch_size_finder.find(cfg, limit=args.max, memory_mb=args.memory_mb, started=started, progress=shown)
    where = finding.device + (f", within {finding.budget_mb:,.0f} MiB of counted tensor memory"
                              if finding.budget_mb is not None else "")
    if finding.largest is None:
        raise UserError(f"find-batch-size: not even micro-batch 1 fits on {where}; use a smaller model or "
                        f"sequences, or train.precision bf16")
    print(f"[rayscale] on {where}:")
    for line in batch_size_finder.report(finding, cfg):
        print("  " + line)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from rayscale.engine.components.validation import shown
    from rayscale.tools.evaluate import evaluate_run

    found = evaluate_run(args.run_dir, args.data, device=args.device, output=args.output)
    metrics = {key: value for key, value in found.items() if key not in ("data", "rows")}
    print(f"[rayscale] eval of {args.run_dir} on {found['data']} ({found['rows']:,} rows): {shown(metrics)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from rayscale import api

    api.predict(args.run_dir, args.data, args.output, address=args.address, workers=args.workers)
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from rayscale.tools.suggest import suggest_from_cli

    return suggest_from_cli(args.run_dir, max_batch=args.max_batch, plot=args.plot)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "train": cmd_train,
        "tune": cmd_tune,
        "suggest": cmd_suggest,
        "eval": cmd_eval,
        "predict": cmd_predict,
        "find-batch-size": cmd_find_batch_size,
        "config": lambda a: cmd_config_show(a) if a.action == "show" else cmd_config_keys(a),
    }[args.command]
    try:
        with on_the_command_line():  # messages name the flags, not the Python API's parameters
            return handler(args)
    except BrokenPipeError:
        if args.command != "config":  # a run's own pipes or sockets: a failure, not a reader that has gone
            raise
        # `rayscale config keys | head`: the reader has gone, which is not an error. Python's flush of stdout at
        # exit would fail again: point it at /dev/null.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor (a notebook's)
            pass
        return 0
    except UserError as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"rayscale: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as exc:  # not bad input: the run trained, then diverged
        if args.debug:
            raise
        print(f"rayscale: error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    except WorkersOutOfMemory as exc:  # not bad input: the run started, then its node's memory ran out
        if args.debug:
            raise
        print(f"rayscale: error: {exc}", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY


if __name__ == "__main__":
    sys.exit(main())
