"""data.curriculum_column's trace in metrics.jsonl: `curriculum_difficulty`, the mean difficulty of the rows
trained since the last line (the order itself is made by Ray Data, data/splits.py)."""

from __future__ import annotations

from rayscale.engine.components import Component


class CurriculumMeter(Component):
    logs = ("curriculum_difficulty",)

    def __init__(self) -> None:
        self.difficulty_sum, self.rows = 0.0, 0

    def after_step(self, run, rows, result):
        if "difficulty" in rows.rows and not rows.padding:  # host side: numpy already
            self.difficulty_sum += float(rows.rows["difficulty"].sum())
            self.rows += len(rows.rows["difficulty"])

    def interval_sums(self):
        sums, self.difficulty_sum, self.rows = [self.difficulty_sum, self.rows], 0.0, 0
        return sums

    def log_fields(self, run, sums, steps):
        difficulty_sum, rows = sums
        return {"curriculum_difficulty": difficulty_sum / rows if rows else None}
