"""curves.png (rayscale/tools/plots.py), and matplotlib's import started ahead while a run trains."""

from __future__ import annotations

import sys
import threading

from rayscale.tools import plots


def test_the_import_ahead_runs_once_in_a_thread_and_not_when_matplotlib_is_loaded(monkeypatch):
    ran_in = []
    monkeypatch.setattr(plots, "_pyplot", lambda: ran_in.append(threading.current_thread()))
    monkeypatch.setattr(plots, "_LOADING", [])
    monkeypatch.delitem(sys.modules, "matplotlib.pyplot", raising=False)
    plots.load_in_background()
    plots.load_in_background()
    assert len(plots._LOADING) == 1
    plots._LOADING[0].join(timeout=30)
    assert ran_in == [plots._LOADING[0]] and ran_in[0] is not threading.main_thread()

    monkeypatch.setattr(plots, "_LOADING", [])
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", object())
    plots.load_in_background()
    assert plots._LOADING == []


def test_the_curves_drawn_after_the_import_ahead_wait_for_it(monkeypatch, tmp_path):
    monkeypatch.setattr(plots, "_LOADING", [])
    plots.load_in_background()
    records = [{"samples_seen": 100, "train_loss": 2.0}, {"samples_seen": 200, "train_loss": 1.5, "val_loss": 1.6,
                                                          "val_accuracy": 0.4}]
    plots.plot_curves(records, tmp_path / "curves.png", title="run")
    assert all(not thread.is_alive() for thread in plots._LOADING)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
