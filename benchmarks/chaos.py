"""Chaos: runs with Train workers SIGKILLed at random steps, checked against an uninterrupted run.

    python -m benchmarks.chaos [--runs 3] [--kills 1] [--seed 0] [--output-dir /tmp/rayscale-chaos]

The data are the real 8x8 digits written to Parquet with one extra leading feature, the row's index. The model
(written next to the data and put on PYTHONPATH before Ray starts) strips that column, logs the row indices of
every micro-batch it trains on (one file per worker process) and sleeps 10 ms per forward, so that kills land
mid-epoch; its numerics are the built-in MLP's.

For every run it reports: the kills sent, the restarts the run counted, recovery seconds (kill to the first
forward pass of the new worker group), rows lost and rows duplicated, and whether the final model.pt equals the
uninterrupted run's bit for bit. Rows lost/duplicated are measured from the workers' own logs, independently of
the run's bookkeeping: each worker process (an attempt) must have trained exactly the uninterrupted rank's
sequence of micro-batches from the point its checkpoint restored, and together the attempts must cover that
sequence. Lost and duplicated must be 0. The result goes to <output-dir>/chaos.json and
benchmarks/results/chaos.json; the exit code is 1 if any run lost or duplicated a row or ended with another model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks import RESULTS, output_dir_or_none

MODEL = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    from rayscale.models import MLP


    class RowLogging(MLP):
        """Column 0 is the row index: logged, then dropped; the rest is the digits MLP."""

        def forward(self, x):
            if self.training:
                rows = ",".join(str(int(r)) for r in x[:, 0].tolist())
                with open(Path(os.environ["RAYSCALE_CHAOS_LOG_DIR"], str(os.getpid())), "a") as log:
                    log.write(f"{time.time()} {rows}\\n")
                time.sleep(0.01)
            return super().forward(x[:, 1:])


    def make(**kwargs):
        return RowLogging(in_features=64, num_outputs=10, hidden_sizes=(256, 256))
''')



def write_data(directory: Path) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sklearn.datasets import load_digits

    digits = load_digits()
    columns = {"row": np.arange(len(digits.target), dtype=np.float32)}
    columns.update({f"p{i}": digits.data[:, i].astype(np.float32) / 16 for i in range(64)})
    columns["label"] = digits.target.astype(np.int64)
    path = directory / "digits_rows.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=256)
    return path


def overrides(output_dir: Path, name: str, data: Path, epochs: int, workers: int) -> list[str]:
    return [f"run.output_dir={output_dir}", f"run.name={name}", f"data.source={data}",
            f"data.features=[row, {', '.join(f'p{i}' for i in range(64))}]", "model.name=chaos_model:make",
            f"train.epochs={epochs}", f"scaling.num_workers={workers}", "batch.global_batch_size=64",
            "batch.micro_batch_size=8", "run.checkpoint_every_samples=320", "run.hang_timeout_s=30",
            "run.max_failures=10"]


def read_logs(log_dir: Path) -> dict[int, list[tuple[float, tuple[int, ...]]]]:
    """pid -> [(time, row indices of one micro-batch)] in the order that process trained them."""
    out = {}
    for path in log_dir.iterdir():
        entries = []
        for line in path.read_text().splitlines():
            stamp, rows = line.split(" ", 1)
            entries.append((float(stamp), tuple(int(r) for r in rows.split(","))))
        out[int(path.name)] = entries
    return out


def account(reference: dict[int, list], attempts: dict[int, list]) -> dict:
    """Rows lost and duplicated across the attempts, against the uninterrupted run's per-rank sequences."""
    canonical = [[rows for _, rows in seq] for seq in reference.values()]
    where = {rows: (rank, i) for rank, seq in enumerate(canonical) for i, rows in enumerate(seq)}
    covered = [Counter() for _ in canonical]
    lost = duplicated = 0
    for entries in attempts.values():
        batches = [rows for _, rows in entries]
        if not batches:
            continue
        if batches[0] not in where:  # started somewhere the uninterrupted run never was
            duplicated += sum(len(b) for b in batches)
            continue
        rank, start = where[batches[0]]
        expected = canonical[rank][start:start + len(batches)]
        for got, want in zip(batches, expected, strict=False):
            if got != want:  # a resumed stream that drifted: rows missed and rows trained out of place
                trained, due = Counter(got), Counter(want)
                lost += sum((due - trained).values())
                duplicated += sum((trained - due).values())
        duplicated += sum(len(b) for b in batches[len(expected):])
        covered[rank].update(range(start, start + len(batches)))
    for rank, seq in enumerate(canonical):
        lost += sum(len(rows) for i, rows in enumerate(seq) if not covered[rank][i])
    return {"rows_lost": lost, "rows_duplicated": duplicated}


def run_training(cfg_overrides: list[str]) -> tuple[dict, dict]:
    import torch

    from rayscale import config
    from rayscale.launch import trainer

    cfg = config.load(overrides=cfg_overrides)
    summary = trainer.train(cfg)
    return summary, torch.load(Path(summary["run_dir"]) / "model.pt")


def chaos_run(index: int, args, data: Path, log_dir: Path, rng: random.Random) -> dict:
    for stale in log_dir.iterdir():
        stale.unlink()
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(overrides(args.output_dir, f"chaos{index}", data, args.epochs,
                                                       args.workers))
        except BaseException as exc:  # noqa: BLE001 - reported in the table
            outcome["error"] = repr(exc)

    total_forwards = args.reference_forwards
    targets = sorted(rng.randrange(total_forwards // 10, total_forwards * 9 // 10) for _ in range(args.kills))
    thread = threading.Thread(target=train)
    started = time.time()
    thread.start()
    kills, recoveries = [], []
    for target in targets:
        while thread.is_alive():
            logs = read_logs(log_dir)
            if sum(len(v) for v in logs.values()) >= target:
                break
            time.sleep(0.02)
        if not thread.is_alive():
            break
        live = sorted(pid for pid in read_logs(log_dir) if Path(f"/proc/{pid}").exists())
        if not live:
            continue
        victim = rng.choice(live)
        before = set(read_logs(log_dir))
        os.kill(victim, signal.SIGKILL)
        killed_at = time.time()
        kills.append({"pid": victim, "after_forwards": target})
        while thread.is_alive() and not set(read_logs(log_dir)) - before:
            time.sleep(0.05)
        if set(read_logs(log_dir)) - before:
            recoveries.append(round(time.time() - killed_at, 1))
    thread.join()
    row = {"run": index, "kills": len(kills), "kill_points": [k["after_forwards"] for k in kills],
           "recovery_s": recoveries, "wall_s": round(time.time() - started, 1)}
    if "error" in outcome:
        return {**row, "finished": False, "error": outcome["error"]}
    import torch

    summary, model = outcome["result"]
    return {**row, "finished": True, "restarts": summary["restarts"],
            **account(args.reference_logs, read_logs(log_dir)),
            "model_equal": all(torch.equal(args.reference_model[k], model[k]) for k in args.reference_model)}


def main(argv: list[str] | None = None) -> int:
    from rayscale.launch.connect import connect
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="interrupted runs (default 3)")
    parser.add_argument("--kills", type=int, default=1, help="worker SIGKILLs per run, at random steps (default 1)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill points and victims")
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/rayscale-chaos"))
    args = parser.parse_args(argv)
    args.output_dir = output_dir_or_none("chaos", args.output_dir)
    if args.output_dir is None:
        return 2
    log_dir = args.output_dir / "forwards"
    log_dir.mkdir(parents=True)
    (args.output_dir / "chaos_model.py").write_text(MODEL)
    data = write_data(args.output_dir)
    # Before Ray starts: every worker process inherits these.
    os.environ["RAYSCALE_CHAOS_LOG_DIR"] = str(log_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(args.output_dir), os.environ.get("PYTHONPATH", "")])
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.path.insert(0, str(args.output_dir))


    connect(None)
    print("chaos: uninterrupted reference run", flush=True)
    summary, args.reference_model = run_training(overrides(args.output_dir, "reference", data, args.epochs,
                                                           args.workers))
    args.reference_logs = read_logs(log_dir)
    args.reference_forwards = sum(len(v) for v in args.reference_logs.values())
    rng = random.Random(args.seed)
    rows = []
    for index in range(args.runs):
        print(f"chaos: run {index + 1}/{args.runs}, {args.kills} kill(s)", flush=True)
        rows.append(chaos_run(index, args, data, log_dir, rng))

    headers = ["run", "finished", "kills", "restarts", "recovery s", "rows lost", "rows duplicated", "model equal",
               "wall s"]
    table = [[str(r["run"]), str(r["finished"]), str(r["kills"]), str(r.get("restarts", "-")),
              ", ".join(map(str, r["recovery_s"])) or "-", str(r.get("rows_lost", "-")),
              str(r.get("rows_duplicated", "-")), str(r.get("model_equal", "-")), str(r["wall_s"])] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)))
    ok = all(r["finished"] and not r["rows_lost"] and not r["rows_duplicated"] and r["model_equal"] for r in rows)
    print(f"chaos: {sum(r['finished'] for r in rows)}/{len(rows)} runs finished, "
          f"{sum(r['kills'] for r in rows)} kills, {'PASS' if ok else 'FAIL'}")
    result = {"runs": rows, "epochs": args.epochs, "workers": args.workers, "seed": args.seed,
              "reference_forwards": args.reference_forwards, "reference_wall_s": summary["wall_time_s"], "pass": ok}
    (args.output_dir / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
