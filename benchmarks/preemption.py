"""Preemption: work lost and time to train again when a spot node goes, a fixed-size run against an elastic one.

    python -m benchmarks.preemption [--replacement-after-s 30] [--drain-s 15] [--output-dir /tmp/rayscale-preempt]

On a simulated cluster (`ray.cluster_utils.Cluster` on this machine, everything on 127.0.0.1: a head with no CPU
and two nodes of 2 CPUs, one worker of 1.5 CPUs per node), the digits MLP behind a 0.1 s sleep per forward pass,
global batch 64, a checkpoint every 1024 samples (16 steps). Four runs, each losing one of its two nodes after
40 steps at 2 workers:

- fixed, lost:      `scaling.num_workers: 2`, the node removed without notice; a replacement node joins
                    `--replacement-after-s` later (a cloud's replacement of a spot node takes about that or more);
- elastic, lost:    `scaling.num_workers: [1, 2]`, the same loss: the run goes on at 1 worker without waiting;
- fixed, drained:   the node is first drained for a preemption (Ray's GCS `drain_node`, `--drain-s` before it
                    goes, as a spot interruption notice), then removed; a replacement joins as above;
- elastic, drained: the same drain and loss, elastic.

Per run: steps trained twice (the work lost, counted from each rank's own log of the rows of every step it
trained), seconds from the node going to the first step trained after it, the steps from the drain to the
checkpoint the ranks wrote on its notice, and whether every row was trained exactly once per epoch. Written to
<output-dir>/preemption.json and benchmarks/results/preemption.json. The tests' elastic cluster test shares this
module's cluster, drain and waiting helpers (tests/test_elastic.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks import RESULTS, output_dir_or_none
from rayscale.launch.connect import free_loopback_port

TESTS = Path(__file__).resolve().parent.parent / "tests"  # step_log (the setup hook) and loop_models (the model)
POLL_ENV = "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"  # how often Train's watcher asks Ray for drains (5 s default)
OPTIONS = ("batch.global_batch_size=64", "batch.micro_batch_size=null", "data.lanes=2", "scaling.cpus_per_worker=1.5",
           "run.hang_timeout_s=30", "train.log_every_samples=256", "model.name=loop_models:slow")


@contextmanager
def simulated_cluster(step_log_dir: Path, watcher_poll_s: float | None = None, watch_preemption: bool = True,
                      coordinator_tick_s: float | None = None):
    """A head with no CPU (the driver and Train's controller) and two nodes of 2 CPUs: one worker of 1.5 CPUs
    per node and half a CPU beside it for its reads. Every process logs the steps it trains (tests/step_log.py).
    Train's preemption watcher runs (as on a real cluster) unless `watch_preemption` is false: a test with no node
    drained spares the actor it starts per worker group. `coordinator_tick_s`: how often the AutoscalingCoordinator
    that Train's elastic policy asks looks for new nodes (Ray's 20 s unless given; tests/step_log.py sets it).
    Yields (cluster, nodes): replace an entry of `nodes` when you add one back."""
    import ray
    from ray.cluster_utils import Cluster

    from rayscale.launch.connect import PREEMPTION_WATCHER_ENV

    saved = {name: os.environ.get(name) for name in ("PYTHONPATH", PREEMPTION_WATCHER_ENV)}
    os.environ["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    os.environ.pop(PREEMPTION_WATCHER_ENV, None)  # an embedded Ray started earlier in this process turned it off
    ray.shutdown()
    # A node lost without notice is declared dead after a few missed health checks (Ray's default: 5 of every
    # 3 s, after 5 s); until then Train's elastic policy still counts its CPUs.
    # No dashboard, but its address (which Ray records in the GCS all the same) on a port of its own: Train's
    # placement-group cleaner asks the state API at that address whether the controller lives. At the default
    # 8265, another Ray's dashboard on this machine answered "no such actor", and the cleaner removed the
    # running group's placement group. Here the API is unreachable, which the cleaner takes as "don't know".
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "dashboard_host": "127.0.0.1",
        "dashboard_port": free_loopback_port(),
        "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3,
                           "health_check_initial_delay_ms": 1000}})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    # RAY_ADDRESS in every process of the cluster: without it Ray's state API follows the latest Ray started on
    # this machine (another test's, say), not this one.
    env = {"RAYSCALE_TEST_STEP_LOG": str(step_log_dir), "RAY_ADDRESS": cluster.address,
           **({POLL_ENV: str(watcher_poll_s)} if watcher_poll_s is not None else {}),
           **({"RAYSCALE_TEST_COORDINATOR_TICK_S": str(coordinator_tick_s)} if coordinator_tick_s is not None else {}),
           **({} if watch_preemption else {PREEMPTION_WATCHER_ENV: "0"})}
    ray.init(address=cluster.address, logging_level="WARNING",
             runtime_env={"worker_process_setup_hook": "step_log.install", "env_vars": env})
    try:
        yield cluster, nodes
    finally:
        ray.shutdown()
        cluster.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def drain(cluster, node, deadline_s: float) -> None:
    """What a cloud's spot interruption does through Ray's autoscaler: the GCS marks the node as being drained
    for a preemption, with the time it goes (as Ray's own tests drain a node)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=cluster.address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(node.node_id, reason, "spot interruption", int((time.time() + deadline_s) * 1000))
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node.node_id[:12]}: {why}")


def train_in_background(cfg, address: str) -> tuple[threading.Thread, dict]:
    """`rayscale train` on the cluster at `address`, in a thread: the outcome gets "summary" or "error"."""
    from rayscale.launch.trainer import train

    outcome: dict = {}

    def run():
        try:
            outcome["summary"] = train(cfg, address=address)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def wait_for(what: str, condition, timeout_s: float, outcome: dict):
    """`condition()`'s first truthy value, polled; an error if the run failed or ended first, or on timeout."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if "error" in outcome:
            raise RuntimeError(f"the run failed while waiting for {what}") from outcome["error"]
        if "summary" in outcome:
            raise RuntimeError(f"the run ended before {what}")
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"no {what} within {timeout_s:.0f} s")


def trained_steps(log_dir: Path, world_size: int, after: float, at_least: int = 1,
                  new_group: bool = False) -> list[dict] | None:
    """The steps trained at `world_size` after `after` (wall clock), once there are `at_least` of them.
    `new_group`: only those of processes that trained nothing before `after` (a step in flight when a node went
    may still end in the old group)."""
    import step_log

    records = step_log.records(log_dir)
    old = {r["pid"] for r in records if r["time"] <= after} if new_group else set()
    fresh = [r for r in records if r["time"] > after and r["world_size"] == world_size and r["pid"] not in old]
    return fresh if len(fresh) >= at_least else None


def scenario(cluster, nodes: list, log_dir: Path, output_dir: Path, name: str, elastic: bool, drained: bool,
             args) -> dict:
    import step_log

    from rayscale import config

    workers = "[1, 2]" if elastic else "2"
    cfg = config.load(overrides=[*OPTIONS, f"train.epochs={args.epochs}", "model.kwargs={delay_s: 0.1}",
                                 f"scaling.num_workers={workers}", "scaling.resize_check_s=5",
                                 "run.checkpoint_every_samples=1024", f"run.output_dir={output_dir}",
                                 f"run.name={name.replace(', ', '_')}"])
    started = time.time()
    thread, outcome = train_in_background(cfg, cluster.address)
    wait_for("40 steps at 2 workers", lambda: trained_steps(log_dir, 2, started, 2 * 40), 300, outcome)
    drained_at = time.time()
    if drained:
        drain(cluster, nodes[1], args.drain_s)
        time.sleep(max(0.0, drained_at + args.drain_s - time.time()))
    cluster.remove_node(nodes[1], allow_graceful=False)
    gone_at = time.time()
    if not elastic:  # a fixed-size run cannot go on until the cloud replaces the node
        time.sleep(args.replacement_after_s)
        nodes[1] = cluster.add_node(num_cpus=2)
    back = wait_for("training after the loss",
                    lambda: trained_steps(log_dir, 1 if elastic else 2, gone_at, new_group=True), 400, outcome)
    if elastic:  # the replacement joins later; the run grows back to 2 workers
        nodes[1] = cluster.add_node(num_cpus=2)
    thread.join(timeout=900)
    if thread.is_alive() or "error" in outcome:
        raise RuntimeError(f"{name}: the run did not finish") from outcome.get("error")
    summary = outcome["summary"]
    records = [r for r in step_log.records(log_dir) if r["time"] > started]
    kept, redone = step_log.kept_steps(records)
    steps_per_epoch = 1 + max(index for (epoch, index) in kept if epoch == 0)
    step_of = step_log.global_step(steps_per_epoch)
    exact = all(step_log.every_row_once(kept, epoch, summary["train_rows"]) for epoch in range(args.epochs))
    last_before = max(step_of(r) for r in records if r["time"] <= drained_at)
    return {"run": name, "steps_redone": len(redone), "node_gone_to_training_s": round(back[0]["time"] - gone_at, 1),
            "drain_to_checkpoint_steps": (summary["last_preemption_step"] - last_before
                                          if summary["preemption_checkpoints"] else None),
            "restarts": {key: summary[key] for key in ("resizes", "preemptions", "fault_restarts")},
            "world_sizes": summary["world_sizes"], "every_row_once_per_epoch": exact,
            "wall_s": round(time.time() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replacement-after-s", type=float, default=30.0,
                        help="seconds until a lost node is replaced (default 30)")
    parser.add_argument("--drain-s", type=float, default=15.0, help="a drain's notice before the node goes (15)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--output-dir", type=Path, default=Path("/tmp/rayscale-preemption"))
    args = parser.parse_args(argv)
    args.output_dir = output_dir_or_none("preemption", args.output_dir)
    if args.output_dir is None:
        return 2
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    sys.path.insert(0, str(TESTS))
    rows = []
    for name, elastic, drained in (("fixed, lost", False, False), ("elastic, lost", True, False),
                                   ("fixed, drained", False, True), ("elastic, drained", True, True)):
        print(f"preemption: {name}", flush=True)
        log_dir = args.output_dir / "steps" / name.replace(", ", "_")
        log_dir.mkdir(parents=True)
        with simulated_cluster(log_dir, watcher_poll_s=None) as (cluster, nodes):
            rows.append(scenario(cluster, nodes, log_dir, args.output_dir, name, elastic, drained, args))
        print(json.dumps(rows[-1]), flush=True)

    print("| run | steps trained twice | node gone to training again (s) | drain to checkpoint (steps) "
          "| world sizes | every row once per epoch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['steps_redone']} | {r['node_gone_to_training_s']} "
              f"| {r['drain_to_checkpoint_steps'] if r['drain_to_checkpoint_steps'] is not None else '-'} "
              f"| {r['world_sizes']} | {r['every_row_once_per_epoch']} |")
    result = {"runs": rows, "replacement_after_s": args.replacement_after_s, "drain_s": args.drain_s,
              "epochs": args.epochs}
    for path in (args.output_dir / "preemption.json", RESULTS / "preemption.json"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["every_row_once_per_epoch"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
