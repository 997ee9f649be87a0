"""run.progress: the driver's bar over metrics.jsonl on an interactive terminal, the workers' lines elsewhere."""

from __future__ import annotations

import io
import json
import time

import pytest
from inprocess import train

from rayscale.driver import progress
from rayscale.driver.progress import MetricsFollower, ProgressBar, wants_bar
from rayscale.engine import checkpoint


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("mode, stream, expected", [
    ("auto", Terminal(), True), ("auto", io.StringIO(), False), ("bar", io.StringIO(), True),
    ("lines", Terminal(), False),
])
def test_auto_draws_a_bar_only_on_an_interactive_terminal(mode, stream, expected):
    assert wants_bar(mode, stream) is expected


def _line(samples, **extra):
    return {"samples_seen": samples, "epoch": 0, "train_loss": 1.5, **extra}


def test_the_bar_follows_the_log_with_rate_eta_loss_and_epoch_ends_even_when_a_resume_rewrites_it(tmp_path):
    log, screen, seen = tmp_path / "metrics.jsonl", io.StringIO(), []
    bar = ProgressBar(total_samples=1000, epochs=2, file=screen)
    follower = MetricsFollower(log, [bar.show, seen.append])
    follower.poll()  # no log yet: nothing to show
    log.write_text(json.dumps(_line(200)) + "\n" + json.dumps(_line(500, epoch_end=True, val_loss=0.25)) + "\n"
                   + '{"samples_seen": 6')  # a line being written: read next time
    follower.poll()
    assert [line["samples_seen"] for line in seen] == [200, 500]  # every reader gets every line
    assert bar.bar.n == 500 and "val_loss 0.2500" in screen.getvalue()
    assert "epoch 1/2 done: samples 500 val_loss 0.2500" in screen.getvalue()
    assert "500/1" in screen.getvalue() and "loss=1.5000" in screen.getvalue()
    # Resumed from the epoch end: the log is rewritten up to it, and the bar goes on from there.
    checkpoint.write_bytes_atomic(log, (json.dumps(_line(500, epoch_end=True)) + "\n"
                                        + json.dumps(_line(700, epoch=1)) + "\n").encode())
    follower.poll()
    assert bar.bar.n == 700 and screen.getvalue().count("epoch 1/2 done") == 1
    assert [line["samples_seen"] for line in seen] == [200, 500, 500, 700]  # the rewritten log read again
    bar.bar.close()


@pytest.mark.parametrize("first_line", [_line(300, validation_rows=123456), _line(300)],
                         ids=["old-offset-mid-line", "old-offset-at-a-line-end"])
def test_a_log_rewritten_under_the_same_inode_with_more_bytes_is_read_again_from_its_start(tmp_path, first_line):
    """A rewrite the follower did not see happen: the same inode number (freed by one replace, taken by the next)
    and a file longer than what was read, so the old offset falls inside a line of the new one, or by chance at
    the end of one."""
    log, seen = tmp_path / "metrics.jsonl", []
    follower = MetricsFollower(log, [seen.append])
    log.write_text(json.dumps(_line(200)) + "\n")
    follower.poll()
    inode = log.stat().st_ino
    with open(log, "r+") as handle:  # in place: the inode the follower knows
        handle.write(json.dumps(first_line) + "\n" + json.dumps(_line(400)) + "\n")
    assert log.stat().st_ino == inode
    follower.poll()
    assert [line["samples_seen"] for line in seen] == [200, 300, 400]


def test_the_bar_thread_reads_lines_written_while_it_runs_and_the_last_ones_at_exit(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "POLL_S", 0.01)
    log, screen = tmp_path / "metrics.jsonl", io.StringIO()
    with ProgressBar(total_samples=None, epochs=1, file=screen) as bar, MetricsFollower(log, [bar.show]):
        log.write_text(json.dumps(_line(64)) + "\n")
        deadline = time.time() + 10
        while bar.bar.n != 64 and time.time() < deadline:
            time.sleep(0.01)
        assert bar.bar.n == 64
        with open(log, "a") as handle:
            handle.write(json.dumps(_line(128, epoch_end=True)) + "\n")
    assert bar.bar.n == 128 and "epoch 1/1 done" in screen.getvalue()


def test_with_a_bar_the_workers_leave_out_their_periodic_lines_only(tmp_path, capsys):
    train(tmp_path, "quiet", "train.epochs=1", "batch.global_batch_size=64", "train.log_every_samples=256",
          progress_lines=False)
    quiet = capsys.readouterr().out
    train(tmp_path, "lines", "train.epochs=1", "batch.global_batch_size=64", "train.log_every_samples=256")
    lines = capsys.readouterr().out
    assert "samples 256 loss" in lines and "epoch 1/1 done" in lines
    assert "loss" not in quiet and "done" not in quiet
    assert "global batch 64" in quiet  # what the run is, said once, stays
