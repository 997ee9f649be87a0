"""The typed contracts: the worker payload and the training state, their versions, and reading a checkpoint
written by an earlier rayscale."""

import pytest
import torch

from rayscale import config
from rayscale.data.sources import DataSpec
from rayscale.engine import checkpoint
from rayscale.engine.state import STATE_VERSION, CheckpointVersionError, TrainState, WorkerPayload

SPEC = DataSpec("classification", (64,), 10)


def test_the_payload_crosses_as_plain_data_and_comes_back_typed():
    payload = WorkerPayload(config=config.to_dict(config.load()), spec=SPEC, run_dir="/tmp/r", train_rows=100,
                            val_rows=10, train_chunk_rows=(50, 40), val_chunk_rows=(5, 5), lanes=2,
                            val_cache=((0, 50), (50, 100)),
                            eval_at_samples=(320,), ps_servers=("a", "b"), ps_shards=((0, 2), (1,)))
    plain = payload.to_dict()
    assert plain["version"] == 4 and plain["spec"]["input_shape"] == (64,)
    # What Ray's pickling may give back: lists for tuples.
    listed = {**plain, "spec": {**plain["spec"], "input_shape": [64]}, "val_cache": [[0, 50], [50, 100]],
              "ps_shards": [[0, 2], [1]], "train_chunk_rows": [50, 40], "val_chunk_rows": [5, 5]}
    assert WorkerPayload.from_dict(listed) == payload


@pytest.mark.parametrize("change, message", [
    ({"version": 1}, "worker payload version 1: this rayscale reads version 4"),
    ({"extra_key": 1}, "unknown keys ['extra_key']"),
])
def test_a_payload_from_another_rayscale_is_refused_by_name(change, message):
    plain = {**WorkerPayload(config={}, spec=SPEC, run_dir="r", train_rows=1, val_rows=0).to_dict(), **change}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        WorkerPayload.from_dict(plain)


def test_a_payload_missing_a_key_is_refused():
    plain = WorkerPayload(config={}, spec=SPEC, run_dir="r", train_rows=1, val_rows=0).to_dict()
    del plain["train_rows"]
    with pytest.raises(ValueError, match=r"missing \['train_rows'\]"):
        WorkerPayload.from_dict(plain)


def test_the_training_state_round_trips_with_its_version():
    state = TrainState(epoch=2, step_in_epoch=3, samples_seen=999, step=40, resumes=1, nonfinite_skipped=2,
                       val_loss=0.5, parts={"rung_pause": {"paused": True, "rung_resumes": 1}})
    saved = state.to_checkpoint()
    assert saved["version"] == STATE_VERSION
    assert TrainState.from_checkpoint(saved, "here") == state


def test_a_newer_state_is_refused_with_one_line_naming_the_version():
    with pytest.raises(CheckpointVersionError, match=f"checkpoint /runs/x: training state version 99, but this "
                                                     f"rayscale reads versions 1 to {STATE_VERSION}"):
        TrainState.from_checkpoint({"version": 99, "epoch": 1}, "/runs/x")


def _version_1_file(directory, progress, average=None):
    """A state file as rayscale wrote it before the typed state: a `progress` dict, the average beside the model."""
    model = torch.nn.Linear(2, 2)
    checkpoint.save_atomic({"model": model.state_dict(), "optimizer": torch.optim.SGD(model.parameters(), 0.1)
                            .state_dict(), "scaler": None, "average": average, "progress": progress,
                            "rng": checkpoint.rng_states()}, directory / checkpoint.STATE_FILE)
    return model


def test_a_version_1_checkpoint_still_loads_into_the_typed_state(tmp_path):
    progress = {"epoch": 1, "step_in_epoch": 4, "samples_seen": 1700, "step": 27, "nonfinite_skipped": 1,
                "resumes": 2, "val_loss": 0.4, "val_accuracy": 0.9, "micro_batch_size": 16, "global_batch_size": 128,
                "paused": True, "rung_resumes": 1,
                "noise_scale": {"decay": 0.95, "true_sq": 1.0, "trace": 50.0, "updates": 3},
                "online": {"files": ["a.parquet"], "rows": 100, "current": None}}
    average = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    _version_1_file(tmp_path, progress, average)
    state = checkpoint.read_state(tmp_path).train_state
    assert (state.epoch, state.step_in_epoch, state.samples_seen, state.step, state.resumes) == (1, 4, 1700, 27, 2)
    assert (state.nonfinite_skipped, state.val_loss, state.val_accuracy) == (1, 0.4, 0.9)
    assert state.parts["micro_batch"] == {"micro_batch_size": 16}
    assert state.parts["adaptive_batch"] == {"global_batch_size": 128}
    assert state.parts["rung_pause"] == {"paused": True, "rung_resumes": 1}
    assert state.parts["noise_scale"]["trace"] == 50.0
    assert state.parts["online_feed"] == {"files": ["a.parquet"], "rows": 100, "current": None}
    assert torch.equal(state.parts["weight_average"]["weights"]["weight"], torch.ones(2, 2))


def test_every_part_a_version_1_checkpoint_can_hold_is_one_a_component_reads():
    """The migration's target names are the components' own: a renamed component would lose resumed state."""
    from rayscale.engine.components.adaptive_batch import AdaptiveBatch
    from rayscale.engine.components.micro_batch import AutoMicroBatch
    from rayscale.engine.components.noise_scale import NoiseScaleMeter
    from rayscale.engine.components.online_feed import OnlineFeed
    from rayscale.engine.components.rung_pause import RungPause
    from rayscale.engine.components.weight_average import Averaging
    from rayscale.engine.state import _VERSION_1_PARTS

    names = {AdaptiveBatch.name, AutoMicroBatch.name, NoiseScaleMeter.name, OnlineFeed.name, RungPause.name,
             Averaging.name}
    assert {part for part, _ in _VERSION_1_PARTS.values()} | {"noise_scale", "online_feed", "weight_average"} == names
