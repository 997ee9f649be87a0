"""[2b] Joining a Ray cluster, or starting the embedded one on loopback only.

Without `--address` or RAY_ADDRESS, rayscale starts its own Ray bound to 127.0.0.1 (a fresh instance every time,
never another Ray found on this machine); with either (or inside a Ray job, which sets RAY_ADDRESS) it joins that
cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Train's controller reads this


def loopback_unless_joining(address: str | None) -> str | None:
    """The cluster address to join, if any; otherwise make the embedded Ray bind 127.0.0.1 only.

    Ray reads the variable when it is imported, so this runs before anything imports ray. It is not set when
    joining a cluster, whose nodes must keep advertising their real addresses.
    """
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return address


def _forget_dead_cluster_address() -> None:
    """Drop /tmp/ray/ray_current_cluster when nothing answers at the address it names.

    A head started with `ray start` and gone since leaves that file behind. Ray's state API, which Train V2
    uses to clean up placement groups, follows it even inside our own embedded Ray; pointing at a dead head,
    the clean-up fails and stopped Tune trials keep their CPUs, so later trials wait forever.
    """
    import socket

    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # a Ray without this layout: nothing we know how to check
        return
    path = Path(get_ray_address_file(None))
    try:
        host, port = path.read_text().strip().rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=1).close()
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        path.unlink(missing_ok=True)
        print(f"[rayscale] removed {path}: it named a Ray cluster that is no longer running", flush=True)


def connect(address: str | None) -> None:
    """Join a cluster (`--address`, RAY_ADDRESS, or inside `ray job submit`), else start Ray on loopback."""
    address = loopback_unless_joining(address)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level="WARNING")
        return
    _forget_dead_cluster_address()
    # Train's preemption watcher (an actor per worker group, polling for node drains to log them) has nothing
    # to watch on one embedded node, and cost ~7 CPU-seconds per 2-worker run here (43 -> 36 CPU-s for a
    # 1-epoch digits run, 2 cores). Set before ray.init so every process of this Ray inherits it; a user's
    # own setting wins.
    os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
    # Our own GCS port, so the address is known before Ray starts: every process of this cluster gets it
    # as RAY_ADDRESS. Ray's state API, which Train V2 uses to remove the placement groups of stopped runs,
    # otherwise refuses to guess when another Ray runs on the machine ("Found multiple active Ray
    # instances"), and stopped Tune trials then keep their CPUs.
    port = _free_loopback_port()
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        # address="local": always a fresh embedded instance, never another Ray found on this machine.
        # One logical CPU beyond the workers' reservation, or Ray Data's read tasks never get scheduled.
        # The dashboard stays on (Ray Train's state API needs it), on loopback only.
        ray.init(address="local", num_cpus=(os.cpu_count() or 1) + 1, dashboard_host="127.0.0.1",
                 logging_level="WARNING", runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}})
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
