"""data.online: one pass over a growing directory, file by file, instead of epochs (the files: data/online.py).

Rank 0 lists the directory and every rank takes its answer, so all read the same file and take their share of
the same steps. Each file is cut into steps on its own, its partial last step trained at once, so the steps
depend on the file list alone. The files trained, their rows and the file in progress are checkpointed after
every file: a restarted group, or the same command run later, continues with the first file not trained yet.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rayscale.config import Config
from rayscale.data import online
from rayscale.data.assembly import StepAssembler
from rayscale.data.sources import DataSpec
from rayscale.engine import distributed
from rayscale.engine.components import Component
from rayscale.engine.components.validation import shown
from rayscale.engine.feed import Segment

if TYPE_CHECKING:
    from rayscale.engine.loop import TrainLoop


@dataclass
class OnlinePart:
    files: list[str] = field(default_factory=list)  # trained whole, in order (relative to the directory)
    rows: int = 0  # their rows
    current: str | None = None  # the file in progress (its steps done: TrainState.step_in_epoch)


class OnlineFeed(Component):
    name = "online_feed"
    logs = ("online_files", "online_rows")

    def __init__(self, cfg: Config, spec: DataSpec, saved: OnlinePart):
        self.cfg, self.spec, self.saved = cfg, spec, saved
        self.file_rows = 0

    def part(self, run):
        return self.saved

    def finished(self, state) -> bool:
        return False  # a stream may always grow: a re-run waits for new files

    def describe(self, train_rows: int) -> str:
        return f"online over {self.cfg.data.source}"

    def segments(self, loop: TrainLoop) -> Iterator[Segment]:
        run, data, saved = loop.run, self.cfg.data, self.saved
        decide_on_rank_0 = lambda decide: distributed.from_rank_0(decide, run.rank)  # noqa: E731
        while (name := online.wait_for_file(data.source, saved.files, data, decide_on_rank_0)) is not None:
            if (empty := online.nothing_to_train(data.source, name, data)) is not None:  # counted as trained
                run.say(f"online: {name} {empty}; skipped")
                saved.files.append(name)
                continue
            loop.start_epoch(0)
            skip = run.state.step_in_epoch if saved.current == name else 0
            saved.current, run.state.step_in_epoch = name, 0
            chunks = online.file_chunks(data.source, name, data, self.cfg.seed, self.spec, saved.rows)
            self.file_rows = chunks[-1].stop - saved.rows
            assembler = StepAssembler(run.plan, run.rank)
            steps = assembler.steps(online.read_file(chunks, data, self.cfg.seed))
            yield Segment(0, itertools.islice(steps, skip, None), skip,  # committed steps read past: one file
                          saved.rows + self.file_rows)

    def end_segment(self, loop: TrainLoop, segment: Segment) -> bool:
        run, saved = loop.run, self.saved
        saved.files.append(saved.current)
        saved.rows, saved.current = saved.rows + self.file_rows, None
        run.state.step_in_epoch = 0
        loop.save({"samples_seen": run.state.samples_seen, "epoch": 0, "online_files": len(saved.files),
                   **run.state.validation()})
        return False

    def finish(self, loop: TrainLoop) -> None:
        """Nothing new for data.online_idle_timeout_s: validate, the last line, the final checkpoint."""
        run, saved = loop.run, self.saved
        val = loop.validate()
        run.state.epoch, run.state.step_in_epoch = 1, 0
        loop.set_validation(val)
        line = loop.line(0, epoch_end=True, evaluation=bool(val), validation=val,
                         fields={"online_files": len(saved.files), "online_rows": saved.rows})
        run.say(f"online done: {len(saved.files)} files, {saved.rows:,} rows, nothing new for "
                f"{self.cfg.data.online_idle_timeout_s:g} s {shown(val)}")
        loop.save({**line.to_json(), "epoch": 1, "training_done": True})
