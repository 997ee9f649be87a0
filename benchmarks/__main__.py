"""`python -m benchmarks` (or `make bench`): every side-by-side benchmark in one run, ratios from the same run.

    python -m benchmarks [--smoke] [--only throughput,...,strategy,sharded_state] [--output-dir DIR] [--results-dir DIR]

Writes benchmarks/results/<name>.json per benchmark (`.smoke` added with --smoke) and
benchmarks/results/summary[.smoke].md, and prints the Markdown. Exit code 0 whatever the targets say (a missed
target is a finding, not a failure); 1 if a benchmark itself failed to run. The ASHA, chaos and preemption benchmarks
(benchmarks.tune_asha_vs_grid, benchmarks.chaos, benchmarks.preemption) take much longer and run on their own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from benchmarks import RESULTS, scratch_or_none

BENCHMARKS = ("throughput", "ingest", "accumulation", "noise_overhead", "mfu", "memory", "scale", "gpu_mfu",
              "strategy", "sharded_state")


def machine() -> dict:
    import ray
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "ray": ray.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def targets_table(results: dict) -> str:
    lines = ["| benchmark | measure | value | target | verdict |", "|---|---|---|---|---|"]
    for name, result in results.items():
        for target in result.get("targets", []):
            verdict = {True: "PASS", False: "FAIL", None: "-"}[target["pass"]]
            lines.append(f"| {name} | {target['name']} | {target['value']:.3g} | {target['target']} | {verdict} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: proves the scripts work (CI)")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    parser.add_argument("--output-dir", type=Path, help="scratch space for runs, new or empty "
                                                        "(default: a new temporary dir)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON and Markdown go "
                                                                          "(default benchmarks/results)")
    args = parser.parse_args(argv)
    chosen = list(dict.fromkeys(name.strip() for name in args.only.split(",") if name.strip()))  # each once
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        print(f"benchmarks: --only {','.join(unknown)}: expected some of {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # before anything imports ray
    from benchmarks.gpu_mfu import add_repository_to_worker_path

    add_repository_to_worker_path()
    scratch = scratch_or_none("benchmarks", args.output_dir)
    if scratch is None:
        return 2
    size = "smoke" if args.smoke else "full"
    suffix = ".smoke" if args.smoke else ""
    results_dir = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    import importlib

    results, sections, failed = {}, [], []
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"benchmarks: {name} ({size})", flush=True)
        work = scratch / name
        work.mkdir()
        began = time.time()
        try:
            result = module.run(size, work)
        except Exception:  # noqa: BLE001 - reported, and the others still run
            traceback.print_exc()
            failed.append(name)
            continue
        result["seconds"] = round(time.time() - began, 1)
        result["machine"] = machine()
        results[name] = result
        (results_dir / f"{name}{suffix}.json").write_text(json.dumps(result, indent=2) + "\n")
        sections.append(f"### {name}\n\n{module.table(result)}\n")
    markdown = "\n".join([f"## Benchmarks ({size}), {time.strftime('%Y-%m-%d')}\n",
                          "Machine: " + ", ".join(f"{k} {v}" for k, v in machine().items()) + "\n",
                          targets_table(results) + "\n", *sections])
    (results_dir / f"summary{suffix}.md").write_text(markdown)
    print(markdown)
    if failed:
        print(f"benchmarks: failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
