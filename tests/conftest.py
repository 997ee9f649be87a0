"""Test-wide set-up: Ray must bind loopback only (see docs/guide/failures.md, Security), before anything imports ray."""

import os

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# A loaded 2-core CI machine can take longer than Train's 60 s default to start a worker group.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "180")


def pytest_collection_modifyitems(config, items):
    """Modules with end-to-end (slow) tests first. `make test` runs pytest-xdist with --dist loadfile: each
    worker takes whole modules in collection order, so a long Ray module that comes last alphabetically would
    start when the other worker is nearly done; taken first, the long ones overlap and the quick unit modules
    fill in at the end. The order inside a module is kept (its module-scoped Ray stays shared)."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
