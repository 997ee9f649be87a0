"""Test-wide set-up: Ray must bind loopback only (see docs/guide/failures.md, Security), before anything imports ray."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A loaded 2-core CI machine can take longer than Train's 60 s default to start a worker group.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")

# run.trackers: W&B never goes online from a test (whatever this shell says), and MLflow keeps to each run's store.
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_BASE_URL"):
    os.environ.pop(name, None)

# The clusters tests start themselves (ray.cluster_utils) skip Ray's idle prestarted workers too, as the embedded
# Ray does (launch/connect.py): nothing here uses them.
os.environ.setdefault("RAY_prestart_worker_first_driver", "0")

# Every Ray the tests start (embedded, simulated clusters, `ray start`) reports the dashboard's node and worker
# metrics every 60 s instead of every 5: no test reads them, and an idle embedded Ray took 3.7 CPU-seconds per
# 30 s with Ray's defaults against 1.6 with these (the reporter walks every process on each report), on a
# 2-core machine whose test run is CPU-bound.
os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")
os.environ.setdefault("METRICS_RECORD_INTERVAL_S", "60")
# ... and records no metrics at all: every Ray process exports its histograms (RPC and task latencies) to its
# node's dashboard agent, which replays each bucket's count into OpenTelemetry one value at a time (py-spy on the
# elastic test's head agent: 83% of its samples in ReporterAgent._export_histogram_data; 17 CPU-seconds in one
# run). No test reads them. The elastic test alone took 90.3 busy CPU-seconds with them and 65.2 without.
os.environ.setdefault("RAY_enable_metrics_collection", "0")
# One intra-op thread per torch (and BLAS) process the tests start outside Ray's workers (which Ray already
# gives one per CPU): two xdist workers share 2 cores, and with one thread per core each, their waiting OpenMP
# threads spun on cores the other needed (six in-process modules: 123 CPU-seconds against 74; the command and
# machine are in docs/development.md).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The embedded Ray starts without its dashboard's modules (launch/connect.py), except in the module that tests
# them (test_pipeline's ray_session): ~1.9 CPU-seconds less per Ray instance started and left idle for 35 s.
os.environ.setdefault("RAYSCALE_DASHBOARD", "0")

# The longest modules first, then the rest as collected. With `--dist loadfile --no-loadscope-reorder` (the
# Makefile's), pytest-xdist hands modules out in this order to whichever worker is free, and the many short ones
# fill both workers at the end. Its own order (most tests first) started these, few tests each, last, and one
# worker ran a long module alone while the other sat idle. The order also pairs modules that mostly wait (the
# cluster's `ray up` and jobs, test_pipeline's hang timeout and slow uploads, the elastic run's node events and
# drain deadline) with modules that keep both cores busy (the benchmark smoke, Tune, the examples): two waiting
# modules side by side left the cores 10-50% busy for a minute (`/proc/stat` sampled every 2 s over a run,
# 2026-12-07). A stale list only orders.
LONGEST_FIRST = ("test_benchmarks", "test_cluster", "test_pipeline", "test_tune", "test_examples",
                 "test_elastic", "test_benchmark_asha", "test_ray_datasets", "test_parameter_server",
                 "test_sharded_ingest", "test_loop", "test_ordering")


def pytest_collection_modifyitems(items):
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))
