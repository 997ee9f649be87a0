"""An epoch whose rows all weighed 0 ends the run: it trained on nothing, and so would every epoch after it.

Rows count through their weights: a user loss's own (train.loss), the data's (data.weight), and for tokens,
the labelled ones. A step or a log interval where they sum to 0 can happen (a window of masked prompts, say)
and is logged with `train_loss: null`; a whole epoch cannot, unless the weights are wrong, and what it would
save is the initial model moved only by momentum and weight decay. The rows' weights are summed with the log
line's own collective, so every rank reaches the same verdict at the epoch end. An epoch resumed part-way is not
judged: its first part was trained before the restart.
"""

from __future__ import annotations

import torch

from rayscale.engine.components import Component
from rayscale.engine.tasks import IGNORE_INDEX
from rayscale.errors import UserError


class EmptyEpochCheck(Component):
    def __init__(self, weighed_by: str):
        self.weighed_by = weighed_by  # what decides a row's weight in this run, for the error
        self.interval = torch.zeros((), dtype=torch.float64)
        self.epoch_weight = 0.0
        self.judged = True

    def start_epoch(self, run, epoch):
        self.epoch_weight = 0.0
        self.judged = run.state.step_in_epoch == 0  # the loop calls this before a resumed epoch's position resets

    def after_step(self, run, rows, result):
        # Summed on the step's device, and read once per log line with the line's own host sync.
        self.interval = self.interval.to(result.local_count.device) + result.local_count.detach()

    def interval_sums(self):
        weight, self.interval = float(self.interval), torch.zeros((), dtype=torch.float64)
        return [weight]

    def log_fields(self, run, sums, steps):
        self.epoch_weight += sums[0]
        return {}

    def end_epoch(self, run, epoch):
        if self.judged and self.epoch_weight == 0:
            raise UserError(f"{self.weighed_by}: every row of epoch {epoch + 1} weighed 0 on every worker, so the "
                            f"epoch trained on nothing; expected some rows with a positive weight")


def weighed_by(user_loss: bool, weight_column: str | None, tokens: bool) -> str:
    """What can make every row weigh 0 in a run, named for the error."""
    causes = (["train.loss (the weights it returns)"] if user_loss else []) + \
             ([f"data.weight (column {weight_column!r})"] if weight_column else []) + \
             ([f"the data's labels (a token labelled {IGNORE_INDEX} or masked does not count)"] if tokens else [])
    return " and ".join(causes) or "the data"
