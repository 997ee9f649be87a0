"""Orders on lanes against one global order: how close the per-lane curriculum, length bucketing and class
stratification (data/lane_steps.py) come to what one global order gives. Pure numpy, no Ray, seconds.

    python benchmarks/lane_orderings.py [--rows 20000] [--batch 256]

For 1, 2, 4 and 8 lanes (1 lane is the global order), on synthetic rows:
- curriculum: each row's step against its step in one global sort by the same keys (mean |difference| as a
  share of the epoch's steps), and the mean difficulty of the first and last tenth of the epoch; once with
  difficulty spread over the file, once with the file sorted by difficulty (the worst case: each lane holds
  one band of difficulty);
- bucket_by_length: padded token slots / real tokens in each worker's share of a step (uniform lengths 1-256);
- stratified (4 classes, 40/30/20/10%): the largest |class count - proportional share| in any full step.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from rayscale.config import DataConfig
from rayscale.data.lane_steps import LaneSteps, epoch_pieces, lane_order, piece_rows
from rayscale.data.splits import CurriculumOrder, add_curriculum_keys
from rayscale.math.batching import plan_batches

LANES = (1, 2, 4, 8)
CHUNK = 1000  # rows per row group of the simulated source


def _epoch(columns: dict, lanes: int, batch: int, data: DataConfig, curriculum=None) -> list[list[dict]]:
    """[step][rank] -> that rank's rows, one worker per lane."""
    rows = len(columns["row_id"])
    chunk_rows = [min(CHUNK, rows - a) for a in range(0, rows, CHUNK)]
    order = lane_order(data, 0, 0, lanes, rows, batch, curriculum)
    plan = plan_batches(batch, None, lanes)
    per_rank = []
    for rank in range(lanes):
        steps = LaneSteps(plan, rank, lanes, lanes, rows, order)
        pieces = epoch_pieces(chunk_rows, lanes, steps.starts, order)
        offsets = np.concatenate([[0], np.cumsum(chunk_rows)])
        blocks = [{k: v[offsets[p.read.chunk] + p.read.skip:offsets[p.read.chunk] + p.read.skip + p.read.take]
                   for k, v in columns.items()} for p in pieces]
        per_rank.append([step.rows for step in steps.steps(piece_rows(blocks, pieces)) if not step.padding])
    return [list(step) for step in zip(*per_rank, strict=True)]


def curriculum(rows: int, batch: int, sorted_file: bool) -> dict:
    rng = np.random.default_rng(0)
    difficulty = np.sort(rng.random(rows)) if sorted_file else rng.random(rows)
    columns = {"row_id": np.arange(rows), "x": np.zeros((rows, 1), np.float32), "y": np.zeros(rows, np.int64),
               "difficulty": difficulty}
    edges = np.linspace(0, 1, 1025)
    order = CurriculumOrder(0, rows, rows, 0.1, 0, (tuple(edges), tuple(np.histogram(difficulty, edges)[0].tolist())))
    keys = add_curriculum_keys(dict(columns), order)["curriculum_key"]
    global_step = np.empty(rows, np.int64)
    global_step[np.lexsort((columns["row_id"], keys))] = np.arange(rows) // batch
    steps = -(-rows // batch)
    out = {}
    for lanes in LANES:
        epoch = _epoch(columns, lanes, batch, DataConfig(shuffle="none"), curriculum=order)
        step_of = np.empty(rows, np.int64)
        for index, ranks in enumerate(epoch):
            for part in ranks:
                step_of[part["row_id"]] = index
        trained = np.concatenate([part["row_id"] for ranks in epoch for part in ranks])
        tenth = len(trained) // 10
        out[lanes] = {"mean_step_shift": round(float(np.abs(step_of - global_step).mean() / steps), 4),
                      "first_tenth_difficulty": round(float(difficulty[trained[:tenth]].mean()), 3),
                      "last_tenth_difficulty": round(float(difficulty[trained[-tenth:]].mean()), 3)}
    return out


def bucketing(rows: int, batch: int) -> dict:
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 257, rows)
    x = np.empty(rows, dtype=object)
    x[:] = [np.ones(n, np.int64) for n in lengths]
    columns = {"row_id": np.arange(rows), "x": x, "y": np.zeros(rows, np.int64)}
    out = {}
    for lanes in LANES:
        padded = real = 0
        for ranks in _epoch(columns, lanes, batch, DataConfig(shuffle_buffer_rows=8 * batch, bucket_by_length=True)):
            for part in ranks:
                sizes = lengths[part["row_id"]]
                padded += int(sizes.max() * len(sizes) - sizes.sum())
                real += int(sizes.sum())
        out[lanes] = round(padded / real, 4)
    plain = _epoch(columns, 1, batch, DataConfig(shuffle_buffer_rows=8 * batch))
    sizes = [lengths[part["row_id"]] for ranks in plain for part in ranks]
    out["no bucketing, 1 lane"] = round(sum(int(s.max() * len(s) - s.sum()) for s in sizes)
                                        / sum(int(s.sum()) for s in sizes), 4)
    return out


def stratified(rows: int, batch: int) -> dict:
    labels = np.random.default_rng(2).choice(4, size=rows, p=[0.4, 0.3, 0.2, 0.1])
    columns = {"row_id": np.arange(rows), "x": np.zeros((rows, 1), np.float32), "y": labels}
    share = batch * np.bincount(labels, minlength=4) / rows
    out = {}
    for lanes in LANES:
        epoch = _epoch(columns, lanes, batch, DataConfig(shuffle_buffer_rows=8 * batch, stratified=True))
        counts = [np.bincount(np.concatenate([p["y"] for p in ranks]), minlength=4) for ranks in epoch[:-1]]
        out[lanes] = round(float(max(np.abs(c - share).max() for c in counts)), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    report = {"rows": args.rows, "global_batch": args.batch, "lanes": list(LANES),
              "curriculum_spread_file": curriculum(args.rows, args.batch, sorted_file=False),
              "curriculum_file_sorted_by_difficulty": curriculum(args.rows, args.batch, sorted_file=True),
              "bucketing_padding_per_real_token": bucketing(args.rows, args.batch),
              "stratified_worst_step_deviation": stratified(args.rows, args.batch)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
