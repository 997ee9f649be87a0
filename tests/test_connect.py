"""Joining a cluster: an address where nothing answers is refused in seconds, naming where it came from.

Loopback only: a port that was free a moment ago has nothing listening; a listening socket stands in for a head.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time

import pytest

from rayscale.errors import UserError
from rayscale.launch import connect as connecting
from rayscale.launch.connect import (
    AUTOSCALER_REQUESTS_ENV,
    PREEMPTION_WATCHER_ENV,
    PRESTART_ENV,
    autoscaler_requests,
    check_reachable,
    connect,
    free_loopback_port,
)

SETTINGS_FRAME = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x03\x00\x00\x00\x64"  # as a Ray head's first


@contextlib.contextmanager
def server_answering(answer: bytes | None):
    """A loopback server that reads what a client sends and answers `answer` to every connection (b"": closes it;
    None: says nothing and keeps it open); yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # closed: the test is over
                return
            held.append(conn)
            conn.recv(1024)
            if answer == b"":
                conn.close()
            elif answer is not None:
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def listening_port():
    """A stand-in for a Ray head: it answers gRPC's preface as a head's GCS does."""
    with server_answering(SETTINGS_FRAME) as port:
        yield port


@pytest.mark.parametrize("address", [
    pytest.param("127.0.0.1:{port}", id="host-port"),
    pytest.param("ray://127.0.0.1:{port}", id="ray-client"),
    pytest.param("localhost:{port}", id="a-name"),
])
def test_an_address_that_answers_as_a_ray_head_passes(address, listening_port):
    check_reachable(address.format(port=listening_port))


@pytest.mark.parametrize("answer, heard", [
    pytest.param(b"HTTP/1.0 400 Bad Request\r\n\r\n", "it answered 'HTTP/1.0 '", id="a-web-server"),
    pytest.param(b"", "it answered nothing", id="closes-at-once"),
    pytest.param(None, "it answered nothing", id="says-nothing"),
])
def test_a_server_that_is_not_a_ray_head_is_refused_in_seconds_in_one_line(monkeypatch, answer, heard):
    """Given a port where another server listens (the dashboard's, a web server), ray.init retried for minutes."""
    monkeypatch.setattr(connecting, "REACH_TIMEOUT_S", 0.5)
    with server_answering(answer) as port:
        started = time.monotonic()
        with pytest.raises(UserError) as info:
            check_reachable(f"127.0.0.1:{port}", "--address")
    assert time.monotonic() - started < 5
    assert str(info.value) == (f"--address 127.0.0.1:{port}: the server at 127.0.0.1:{port} is not a Ray head "
                               f"({heard}); expected the address ray start --head prints (port 6379 by default; "
                               f"the dashboard's 8265 is another server)")


def test_a_head_that_answers_only_tls_is_refused_saying_how_to_join_it():
    with server_answering(b"\x15\x03\x03\x00\x02\x02\x32") as port:  # a TLS alert: decode error
        with pytest.raises(UserError, match=rf"^--address 127.0.0.1:{port}: the server at 127.0.0.1:{port} answers "
                                            r"only TLS; set RAY_USE_TLS=1"):
            check_reachable(f"127.0.0.1:{port}", "--address")


def test_with_tls_the_handshake_is_left_to_ray(monkeypatch):
    monkeypatch.setenv("RAY_USE_TLS", "1")  # a TLS head answers only a TLS handshake
    with server_answering(None) as port:
        check_reachable(f"127.0.0.1:{port}")


@pytest.mark.parametrize("address, named, message", [
    pytest.param("127.0.0.1:{port}", "--address", "--address 127.0.0.1:{port}: nothing answers at "
                 "127.0.0.1:{port} (Connection refused); expected the address of a running Ray head", id="refused"),
    pytest.param("ray://127.0.0.1:{port}", "RAY_ADDRESS", "RAY_ADDRESS ray://127.0.0.1:{port}: nothing answers at "
                 "127.0.0.1:{port}", id="client-address-from-the-environment"),
    pytest.param("127.0.0.1:x", "--address", "--address 127.0.0.1:x: expected host:port", id="port-not-a-number"),
    pytest.param("127.0.0.1:99999", "--address", "--address 127.0.0.1:99999: expected host:port",
                 id="port-out-of-range"),
    pytest.param("garbage!!", "--address", "--address garbage!!: expected host:port", id="no-port"),
    pytest.param("ray://", "RAY_ADDRESS", "RAY_ADDRESS ray://: expected host:port", id="no-host"),
])
def test_an_address_where_nothing_answers_is_one_line(address, named, message):
    port = free_loopback_port()
    with pytest.raises(UserError, match=re.escape(message.format(port=port))) as info:
        check_reachable(address.format(port=port), named)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("address", ["auto", "local"])
def test_rays_own_words_are_left_to_ray(address):
    check_reachable(address)  # no host:port to probe: ray.init decides


def test_rays_connection_error_is_one_line_naming_the_flag_or_from_python_the_parameter(monkeypatch):
    import ray

    from rayscale.errors import on_the_command_line

    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to.\n"
                              "more detail")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    with on_the_command_line(), pytest.raises(UserError, match=r"^--address auto: Could not find any running Ray "
                                                                r"instance\. .*to\.$"):
        connect("auto")
    with pytest.raises(UserError, match=r"^address auto: Could not find any running Ray instance\."):
        connect("auto")  # rayscale.train(address="auto") names its parameter


def test_a_picked_port_lies_below_the_kernels_ephemeral_range_and_is_free():
    from rayscale.launch.connect import OWN_PORTS_FROM, _ephemeral_ports_from

    for _ in range(20):
        port = free_loopback_port()
        assert OWN_PORTS_FROM <= port < _ephemeral_ports_from()  # no outgoing connection takes one of these
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))


def test_with_no_room_below_the_ephemeral_range_the_kernel_picks(monkeypatch):
    import rayscale.launch.connect as connect_module

    kernels = connect_module._ephemeral_ports_from()
    monkeypatch.setattr(connect_module, "_ephemeral_ports_from", lambda: connect_module.OWN_PORTS_FROM + 10)
    assert free_loopback_port() >= kernels  # too few ports to pick from at random: bind to 0


def test_a_pick_skips_the_ports_picked_beside_it_and_ignores_pythons_seeded_generator(monkeypatch):
    import random

    import rayscale.launch.connect as connect_module

    def seeded(*args):
        raise AssertionError("the global random generator, which a user's script may have seeded")

    monkeypatch.setattr(random, "randint", seeded)
    monkeypatch.setattr(random, "random", seeded)
    low = connect_module.OWN_PORTS_FROM
    monkeypatch.setattr(connect_module, "_ephemeral_ports_from", lambda: low + 1001)
    avoid = set(range(low, low + 1000))  # all but one of the range: most picks must be passed over
    for _ in range(10):
        assert free_loopback_port(avoid) not in avoid


@pytest.mark.parametrize("value", ["yes", "", "2", "off"])
def test_a_dashboard_setting_other_than_0_or_1_is_one_line_before_ray_starts(monkeypatch, value):
    import ray

    monkeypatch.setenv("RAYSCALE_DASHBOARD", value)
    ray.shutdown()
    with pytest.raises(UserError, match=r"^RAYSCALE_DASHBOARD='.*': expected 0 \(no dashboard for the embedded "
                                        r"Ray\) or 1$"):
        connect(None)
    assert not ray.is_initialized()


@pytest.mark.slow
def test_the_embedded_ray_without_its_dashboard_starts_none_of_its_modules(monkeypatch):
    """RAYSCALE_DASHBOARD=0 (the tests' setting, tests/conftest.py): Ray's minimal dashboard process, still on
    loopback, but none of the module processes the full dashboard forks. The full one is tested where it is
    used (tests/test_pipeline.py: the state API, loopback only)."""
    import ray  # noqa: I001 - first: it puts its own copy of psutil on the path
    import psutil

    monkeypatch.setenv("RAYSCALE_DASHBOARD", "0")
    ray.shutdown()
    connect(None)
    try:
        commands = [" ".join(child.cmdline()) for child in psutil.Process().children(recursive=True)]
        dashboards = [command for command in commands if "ray/dashboard/dashboard.py" in command]
        assert len(dashboards) == 1 and "--host=127.0.0.1" in dashboards[0]
        assert not [command for command in commands if "ray.dashboard.subprocesses" in command]
        assert ray.cluster_resources()["CPU"] >= 2  # a working Ray
        check_reachable(ray.get_runtime_context().gcs_address)  # a real GCS answers gRPC's preface as expected
    finally:
        ray.shutdown()


def test_the_embedded_rays_settings_reach_its_processes_and_joining_a_cluster_drops_them(monkeypatch,
                                                                                        listening_port):
    """For the embedded Ray's processes (set before ray.init, which they inherit): Train's preemption watcher off,
    no prestarted workers, no autoscaler requests; a user's own setting wins. Its own address as RAY_ADDRESS,
    in the environment while Ray starts, not as a runtime environment (with one, every worker process starts
    twice over), and gone from this process's environment afterwards. A cluster joined later in the same
    process (a notebook) gets none of what connect set: it has drains to watch and may have an autoscaler."""
    import ray

    keys = (PREEMPTION_WATCHER_ENV, PRESTART_ENV, AUTOSCALER_REQUESTS_ENV)
    for key in (*keys, "RAY_ADDRESS", "RAY_GCS_SERVER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(PRESTART_ENV, "1")  # the user's own
    monkeypatch.setattr(connecting, "_SET_FOR_EMBEDDED", set())
    seen, addresses = [], []

    def init(**kwargs):
        seen.append({key: os.environ.get(key) for key in keys})
        addresses.append((kwargs, os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_GCS_SERVER_PORT")))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)

    connect(None)
    assert seen == [{PREEMPTION_WATCHER_ENV: "0", PRESTART_ENV: "1", AUTOSCALER_REQUESTS_ENV: "0"}]
    (kwargs, address, port), = addresses
    assert kwargs["address"] == "local" and "runtime_env" not in kwargs and address == f"127.0.0.1:{port}"
    assert "RAY_ADDRESS" not in os.environ and "RAY_GCS_SERVER_PORT" not in os.environ
    assert not autoscaler_requests()
    connect(f"127.0.0.1:{listening_port}")
    assert seen[1] == {PREEMPTION_WATCHER_ENV: None, PRESTART_ENV: "1", AUTOSCALER_REQUESTS_ENV: None}
    assert autoscaler_requests()


@pytest.mark.parametrize("value", ["yes", "", "false", "2"])
def test_an_autoscaler_requests_setting_other_than_0_or_1_is_one_line_before_ray_starts(monkeypatch, value):
    import ray

    monkeypatch.setenv("RAYSCALE_AUTOSCALER_REQUESTS", value)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: pytest.fail("Ray started"))
    for address in (None, "127.0.0.1:6379"):
        with pytest.raises(UserError, match=r"^RAYSCALE_AUTOSCALER_REQUESTS='.*': expected 0 \(fixed-size runs ask "
                                            r"no autoscaler for their workers' resources\) or 1$"):
            connect(address)
