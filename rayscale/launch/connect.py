"""[2b] Joining a Ray cluster, or starting the embedded one on loopback only.

Without `--address` or RAY_ADDRESS, rayscale starts its own Ray bound to 127.0.0.1 (a fresh instance every time,
never another Ray found on this machine); with either (or inside a Ray job, which sets RAY_ADDRESS) it joins that
cluster.
"""

from __future__ import annotations

import os
import random
from collections.abc import Collection
from pathlib import Path

from rayscale.errors import UserError, argument

PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"  # Train's controller reads this
PRESTART_ENV = "RAY_prestart_worker_first_driver"  # the raylet reads this (Ray system config)
REACH_TIMEOUT_S = 5.0  # a head that is up accepts a TCP connection at once; a dropped packet waits this long
DASHBOARD_ENV = "RAYSCALE_DASHBOARD"  # 0: the embedded Ray starts without its dashboard's modules; 1 (default)
AUTOSCALER_REQUESTS_ENV = "RAYSCALE_AUTOSCALER_REQUESTS"  # 0: fixed-size runs ask no autoscaler for resources
_SET_FOR_EMBEDDED: set[str] = set()  # the variables connect set for an embedded Ray (a user's own are not here)


def autoscaler_requests() -> bool:
    """Whether a fixed-size run's controller asks the cluster's autoscaler for its workers' resources
    (RAYSCALE_AUTOSCALER_REQUESTS, 1 by default; the embedded Ray, which has none, sets 0)."""
    value = os.environ.get(AUTOSCALER_REQUESTS_ENV, "1").strip()
    if value not in ("0", "1"):
        raise UserError(f"{AUTOSCALER_REQUESTS_ENV}={value!r}: expected 0 (fixed-size runs ask no autoscaler for "
                        f"their workers' resources) or 1")
    return value == "1"


def dashboard_wanted() -> bool:
    """Whether the embedded Ray starts its dashboard (RAYSCALE_DASHBOARD, 1 by default)."""
    value = os.environ.get(DASHBOARD_ENV, "1").strip()
    if value not in ("0", "1"):
        raise UserError(f"{DASHBOARD_ENV}={value!r}: expected 0 (no dashboard for the embedded Ray) or 1")
    return value == "1"


def loopback_unless_joining(address: str | None) -> str | None:
    """The cluster address to join, if any; otherwise make the embedded Ray bind 127.0.0.1 only.

    Ray reads the variable when it is imported, so this runs before anything imports ray. It is not set when
    joining a cluster, whose nodes must keep advertising their real addresses.
    """
    if address is not None and not address.strip():  # None is no address; "" from Python was taken for none too
        raise UserError(f"{argument('address')}: expected host:port, ray://host:port, auto or local, got an empty "
                        f"value (leave it out for the embedded Ray)")
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


def will_embed(address: str | None) -> bool:
    """Whether a run given `address` starts the embedded Ray, whose size is then known before it starts: no
    cluster to join, and no Ray running in this process already (a notebook's, a test's)."""
    import sys

    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    return loopback_unless_joining(address) is None and not running


def embedded_cpus() -> int:
    """The logical CPUs of the embedded Ray: one beyond this machine's cores, for Ray Data's read tasks (below)."""
    return (os.cpu_count() or 1) + 1


def connect(address: str | None) -> None:
    """Join a cluster (`--address`, RAY_ADDRESS, or inside `ray job submit`), else start Ray on loopback."""
    named = argument("address") if address else "RAY_ADDRESS"
    address = loopback_unless_joining(address)
    autoscaler_requests()  # a bad value is refused before Ray starts
    import ray

    if ray.is_initialized():
        return
    if address:
        _forget_embedded_settings()  # an embedded Ray this process ran before chose them, not this cluster
        check_reachable(address, named)
        try:
            ray.init(address=address, logging_level="WARNING")
        except ConnectionError as exc:  # e.g. address auto with no cluster on this machine
            raise UserError(f"{named} {address}: {_first_line(exc)}") from exc
        return
    include_dashboard = dashboard_wanted()  # a bad value is refused before Ray starts
    _forget_dead_cluster_address()
    # Every process of this Ray inherits these (set before ray.init); a user's own setting wins.
    # - Train's preemption watcher (an actor per worker group, polling for node drains to log them) has nothing
    #   to watch on one embedded node, and cost ~7 CPU-seconds per 2-worker run here (43 -> 36 CPU-s for a
    #   1-epoch digits run, 2 cores).
    # - Ray starts a Python worker per CPU as the driver connects; no rayscale run uses them (Train's controller
    #   and workers carry runtime environments of their own, so each gets a new process anyway): a 1-epoch
    #   digits run took 22.7 -> 21.4 CPU-s and 18.3 -> 17.3 s without them (2 cores).
    # - The embedded Ray has no autoscaler for a run's controller to ask for resources (launch/torch_trainer.py).
    for key in (PREEMPTION_WATCHER_ENV, PRESTART_ENV, AUTOSCALER_REQUESTS_ENV):
        if key not in os.environ:
            os.environ[key] = "0"
            _SET_FOR_EMBEDDED.add(key)
    # Our own GCS port, so the address is known before Ray starts: every process of this cluster gets it
    # as RAY_ADDRESS. Ray's state API (ray.util.state), asked from inside this cluster, otherwise refuses to
    # guess when another Ray runs on the machine ("Found multiple active Ray instances"); Train's own
    # placement-group cleaner, which rayscale no longer starts (launch/torch_trainer.py), was one such caller.
    # Set in this process's environment while Ray starts (its daemons inherit it, and the raylet hands it to
    # every worker), not as the job's runtime environment: with one, Ray starts each worker process through
    # its runtime-environment setup script, a second Python start with its own imports of Ray (0.7 -> 1.2
    # CPU-seconds for an empty actor's process, 2 cores). ray.init(address="local") itself ignores it.
    port = free_loopback_port()
    saved = {name: os.environ.get(name) for name in ("RAY_GCS_SERVER_PORT", "RAY_ADDRESS")}
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    try:
        # address="local": always a fresh embedded instance, never another Ray found on this machine.
        # One logical CPU beyond the workers' reservation, or Ray Data's read tasks never get scheduled.
        # The dashboard stays on (the state API and the user's view of the run), on loopback only, on a port of
        # its own: at Ray's fixed 8265, a second Ray on the machine (another rayscale run) records that address
        # while the first one's dashboard holds it, and state queries sent there reach the wrong cluster (Train's
        # placement-group cleaner, which asked there whether its controller lived, once removed a running
        # group's placement group that way). RAYSCALE_DASHBOARD=0 leaves out its modules (Ray still starts a
        # minimal dashboard process, on the same loopback port): 6.9 -> 5.0 CPU-seconds for an instance started
        # and left idle 35 s on 2 cores, and nothing of rayscale's needs them.
        ray.init(address="local", num_cpus=embedded_cpus(), include_dashboard=include_dashboard,
                 dashboard_host="127.0.0.1",
                 dashboard_port=free_loopback_port(avoid={port}), logging_level="WARNING")
    finally:
        for name, value in saved.items():  # this process keeps what it had: it is connected already
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _forget_embedded_settings() -> None:
    for key in _SET_FOR_EMBEDDED:
        os.environ.pop(key, None)
    _SET_FOR_EMBEDDED.clear()


def check_reachable(address: str, named: str | None = None) -> None:
    """Refuse an address where nothing listens, in seconds: Ray itself retries an absent head for minutes.

    Only a host:port (or ray://host:port) is probed; Ray's own words (auto, local) are left to ray.init."""
    named = named or argument("address")
    import socket
    from urllib.parse import urlsplit

    try:
        where = urlsplit(address if "://" in address else f"//{address}")
        host, port = where.hostname, where.port
    except ValueError as exc:
        raise UserError(f"{named} {address}: expected host:port, e.g. 127.0.0.1:6379 ({exc})") from None
    if address.strip().lower() in ("auto", "local"):
        return  # Ray's own words: ray.init decides
    if not host or port is None:
        raise UserError(f"{named} {address}: expected host:port (e.g. 127.0.0.1:6379), ray://host:port, auto or "
                        f"local")
    try:
        conn = socket.create_connection((host, port), timeout=REACH_TIMEOUT_S)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise UserError(f"{named} {address}: nothing answers at {host}:{port} ({reason}); expected the address "
                        f"of a running Ray head (ray start --head prints it)") from None
    with conn:
        answer = _grpc_answer(conn)
    if answer is not None and answer[:1] in (b"\x15", b"\x16"):  # a TLS alert or handshake record
        raise UserError(f"{named} {address}: the server at {host}:{port} answers only TLS; set RAY_USE_TLS=1 (and "
                        f"Ray's TLS certificate variables) to join a cluster started with TLS")
    if answer is not None and not _is_http2_settings(answer):
        heard = f"it answered {answer.decode('ascii', 'replace')!r}" if answer else "it answered nothing"
        raise UserError(f"{named} {address}: the server at {host}:{port} is not a Ray head ({heard}); expected "
                        f"the address ray start --head prints (port 6379 by default; the dashboard's 8265 is "
                        f"another server)")


# gRPC's HTTP/2 client preface, then an empty SETTINGS frame. A Ray head's GCS (and the Ray Client server a
# ray:// address names) answers with a SETTINGS frame of its own at once; ray.init given any other server that
# listens there (a dashboard, a web server) retried it for minutes.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_FRAME_HEADER = 9  # bytes: length (3), type (1), flags (1), stream (4)


def _grpc_answer(conn) -> bytes | None:
    """The first bytes the server sends back to gRPC's preface; None where nothing can be told (a cluster
    with TLS, RAY_USE_TLS, answers only a TLS handshake: ray.init decides)."""
    if os.environ.get("RAY_USE_TLS", "0").strip().lower() in ("1", "true"):
        return None
    answer = b""
    try:
        conn.sendall(_HTTP2_PREFACE)
        while len(answer) < _FRAME_HEADER and (chunk := conn.recv(_FRAME_HEADER - len(answer))):
            answer += chunk
    except OSError:  # a timeout, or a reset: what came so far is the answer
        pass
    return answer


def _is_http2_settings(answer: bytes) -> bool:
    return len(answer) == _FRAME_HEADER and answer[3] == 0x04 and answer[5:9] == bytes(4)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


# Ray's worker processes take ports 10002-19999 by default; Ray's own random picks, and the local port of every
# outgoing connection on the machine, come from the kernel's ephemeral range (32768 and up on Linux).
OWN_PORTS_FROM = 20000
_PICKER = random.SystemRandom()  # the OS's randomness, whatever a user's script seeded


def _ephemeral_ports_from() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_loopback_port(avoid: Collection[int] = ()) -> int:
    """A loopback port free now and, as far as this machine's habits go, still free when Ray binds it; never
    one of `avoid` (ports picked for the same start and not bound yet).

    A port the kernel hands out (bind to 0) is ephemeral: between our probe and Ray's bind, any process's
    outgoing connection may take it as its local port (a test cluster's GCS once failed with "Address
    already in use" that way, with another Ray busy beside it). So pick at random below the ephemeral range
    and above Ray's worker ports, where only another such pick can land. The operating system's randomness:
    a script that seeded Python's `random` must not make two runs on one machine pick the same ports."""
    import socket

    low, high = OWN_PORTS_FROM, _ephemeral_ports_from() - 1
    for _ in range(64 if high - low >= 1000 else 0):
        port = _PICKER.randint(low, high)
        if port in avoid:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # a machine with an unusual port layout: the kernel's pick
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
