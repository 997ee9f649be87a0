"""The cluster path, for real.

- `cluster.yaml` (AWS, GPU workers) validates against Ray's own cluster-config schema and keeps its invariants.
- `clusters/local.yaml` is brought up with `ray up` over an sshd on 127.0.0.1 (the test's own: own host key,
  own authorized key, free port), which runs `ray start --head` on 127.0.0.1. Jobs are submitted to it with
  `ray job submit` exactly as docs/guide/cluster.md says, one is stopped with `ray job stop` and resumed by submitting it
  again, and `ray down` plus a sweep by pid leave no process behind.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from committed import registered_checkpoint

from rayscale.launch.connect import free_loopback_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# ------------------------------------------------------------------------------------------ cluster.yaml

@pytest.mark.parametrize("path", ["cluster.yaml", "clusters/local.yaml"])
def test_cluster_configs_validate_against_rays_schema(path):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(REPO / path)
    jsonschema.validate(raw, _ray_schema())  # the file as written
    validate_config(prepare_config(raw))  # and as `ray up` sees it, merged with the provider's defaults


def _token_auth_is_forced(commands: str, generated: bool = True) -> bool:
    start = commands.index("ray start")
    made = commands.find("ray get-auth-token --generate >/dev/null")  # the token itself never reaches a log
    return -1 < commands.find("RAY_AUTH_MODE=token") < start and (not generated or -1 < made < start)


def test_local_yaml_makes_the_heads_token_before_starting():
    cfg = _load(REPO / "clusters/local.yaml")
    assert _token_auth_is_forced(" ".join(cfg["head_start_ray_commands"]))


def test_cluster_yaml_invariants():
    text = (REPO / "cluster.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg["provider"]["type"] == "aws"

    # Nothing open to the internet but SSH.
    for rule in cfg["provider"]["security_group"]["IpPermissions"]:
        open_to_all = [r for r in rule.get("IpRanges", []) if r["CidrIp"] == "0.0.0.0/0"] + \
                      [r for r in rule.get("Ipv6Ranges", []) if r["CidrIpv6"] == "::/0"]
        if open_to_all:
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule

    # A CPU head, and GPU workers that autoscale.
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert not head.get("resources", {}).get("GPU")
    gpu_types = [t for name, t in types.items() if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "no GPU worker node type"
    assert all(0 <= t["min_workers"] < t["max_workers"] <= cfg["max_workers"] for t in gpu_types)
    assert all(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in gpu_types)

    # Pinned: the image is the Ray version requirements.txt pins; rayscale is installed from the synced copy.
    ray_pin = next(line.split("==")[1].strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                   if line.startswith("ray[") and "==" in line)
    assert cfg["docker"]["image"].startswith(f"rayproject/ray:{ray_pin}-")
    synced = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    setup = " ".join(cfg["setup_commands"])
    assert f"-r {synced}/requirements.txt" in setup and f"-e {synced}" in setup
    assert ".venv" in cfg["rsync_exclude"]

    # The dashboard stays on the head's loopback (reached with `ray dashboard`).
    start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    # Token auth on every node: `ray start` turns it on only where a token exists, so the head makes one before
    # it starts, and each worker gets the head's before its own `ray start`.
    assert _token_auth_is_forced(start) and "disabled" not in text
    assert "~/.ray/auth_token" in cfg["cluster_synced_files"]
    assert _token_auth_is_forced(" ".join(cfg["worker_start_ray_commands"]), generated=False)
    # Nothing secret.
    for secret in ("aws_secret_access_key", "aws_access_key_id", "PRIVATE KEY", "ssh_private_key", "AKIA"):
        assert secret not in text, secret


# What the slow tests below run against the local cluster (cluster.yaml itself is checked by the schema).
EXERCISED = {"up", "rsync-down", "dashboard", "job submit", "job list", "job logs", "job stop", "job status", "down"}


def test_every_ray_command_in_the_readme_cluster_section_is_exercised_here():
    """The cluster guide (docs/guide/cluster.md, linked from the README) shows only `ray` commands run here."""
    guide = (REPO / "docs" / "guide" / "cluster.md").read_text()
    assert guide.startswith("# Run on a cluster\n")
    blocks = re.findall(r"```bash\n(.*?)```", guide, flags=re.S)
    commands = {m.group(1) for block in blocks for line in block.splitlines()
                if (m := re.match(r"\s*ray (job [a-z]+|[a-z-]+)", line))}
    assert {"up", "job submit", "down"} <= commands
    assert commands <= EXERCISED, commands - EXERCISED


# ------------------------------------------------------------------------- processes, by pid, from /proc

def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        found[int(entry.name)] = (parent, command)
    return found


def _with_descendants(roots: set[int], processes: dict[int, tuple[int, str]]) -> set[int]:
    members, grew = set(roots), True
    while grew:
        children = {pid for pid, (parent, _) in processes.items() if parent in members} - members
        members |= children
        grew = bool(children)
    return members


def _cluster_processes(marker: str) -> dict[int, str]:
    """Every process of the test's Ray head: those naming its temp dir (GCS, raylet, dashboard, monitors) and
    all their descendants (workers, agents, job drivers, Train workers; these may rename themselves)."""
    processes = _processes()
    members = _with_descendants({pid for pid, (_, command) in processes.items() if marker in command}, processes)
    return {pid: processes[pid][1] for pid in members}


# ---------------------------------------------------------------------------------- the local cluster

def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def _start_sshd(home: Path) -> tuple[subprocess.Popen, int, Path]:
    """An sshd of the test's own on a free loopback port: own host key, own authorized key, nothing global."""
    if not (Path(SSHD).exists() and shutil.which("rsync")):
        pytest.fail("the cluster test needs openssh-server and rsync: run `make system-deps` (apt-get install "
                    "openssh-server rsync) first")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "host_key")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / "id_ed25519")], check=True)
    shutil.copy(home / "id_ed25519.pub", home / "authorized_keys")
    port = free_loopback_port()
    (home / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {home / 'host_key'}", f"PidFile {home / 'sshd.pid'}",
        f"AuthorizedKeysFile {home / 'authorized_keys'}", "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
        "Subsystem sftp internal-sftp", ""]))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    log = open(home / "sshd.log", "w")
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(home / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    _wait_for_port(port)
    return sshd, port, home / "id_ed25519"


def _render_local_yaml(home: Path, ssh_port: int, key: Path, ports: dict[str, int]) -> Path:
    """clusters/local.yaml with the test's key, sshd port, checkout copy, Ray temp dir and free Ray ports."""
    cfg = _load(REPO / "clusters/local.yaml")
    checkout = home / "rayscale"
    (checkout / ".venv").parent.mkdir(parents=True, exist_ok=True)
    (checkout / ".venv").symlink_to(REPO / ".venv")  # so setup_commands finds a venv instead of building one
    cfg["auth"] = {"ssh_user": cfg["auth"]["ssh_user"], "ssh_private_key": str(key),
                   "ssh_proxy_command": f"{sys.executable} {REPO / 'tests/tcp_relay.py'} 127.0.0.1 {ssh_port}"}
    cfg["file_mounts"] = {str(checkout): str(REPO)}
    rewrite = lambda command: command.replace("~/rayscale", str(checkout))  # noqa: E731
    cfg["setup_commands"] = [rewrite(c) for c in cfg["setup_commands"]]
    # `ray stop` stops every Ray on the machine, not only this cluster's: left out here (the sweep by pid at
    # the end stops this cluster's processes instead).
    starts = [rewrite(c) for c in cfg["head_start_ray_commands"] if not c.strip().endswith("ray stop")]
    assert len(starts) == 1 and "ray start --head" in starts[0]
    # The head gets a home of its own, so the token the client fetches is one its start command made (any
    # earlier ray.init on this machine left one in the real home, which `ray start` would have taken).
    starts[0] = (f"export HOME={home / 'head_home'} && "
                 + starts[0].replace("~/ray_bootstrap_config.yaml", str(Path.home() / "ray_bootstrap_config.yaml")))
    starts[0] = (starts[0].replace("--port=6379", f"--port={ports['gcs']}")
                 .replace("--dashboard-port=8265", f"--dashboard-port={ports['dashboard']}")
                 + f" --dashboard-agent-listen-port={ports['agent']} --ray-client-server-port={ports['client']}"
                 + f" --temp-dir={home / 'ray'} --num-cpus=3")
    cfg["head_start_ray_commands"] = starts
    rendered = home / "local.yaml"
    rendered.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return rendered


def _env(token: Path | None = None) -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)
    if token is not None:  # what the cluster guide tells clients to set
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    return env


def ray_cli(*args: str, token: Path | None = None, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=_env(token), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, **kwargs)


def _running(pid: int) -> bool:
    """Whether the process still runs: an ended child of this process stays a zombie until it is reaped (sshd's,
    until its Popen is polled), and must not hold a wait for it up to the grace period."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_cluster(processes: dict[int, str], also: tuple[int, ...] = ()) -> None:
    """Stop the head's processes (`_cluster_processes`) and `also` by pid, the GCS last, as `ray stop` orders it:
    a GCS sent SIGTERM together with its raylet was seen to outlast a 15 s grace; stopped after, it ends in ~2 s."""
    gcs = [pid for pid, command in processes.items() if "gcs_server" in command]
    _stop_by_pid([pid for pid in processes if pid not in gcs] + list(also))
    _stop_by_pid(gcs)


def _stop_by_pid(pids, grace: float = 15) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.2)


RETRIED_STARTS = ("timed out during startup", "Address already in use", "Failed to start the grpc server")


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.shutdown()  # no embedded Ray of an earlier module may linger
    # A short path: Ray's unix sockets live under the temp dir and must stay below 108 characters.
    home = Path(tempfile.mkdtemp(prefix="rsc-", dir="/tmp"))
    sshd, ssh_port, key = _start_sshd(home)
    state = SimpleNamespace(home=home, sshd=sshd, marker=str(home / "ray"), token=home / "auth_token", down=False)
    try:
        for _ in range(3):
            state.ports = {}
            for name in ("gcs", "dashboard", "agent", "client"):
                state.ports[name] = free_loopback_port(avoid=set(state.ports.values()) | {ssh_port})
            state.config = config = _render_local_yaml(home, ssh_port, key, state.ports)
            state.address = f"http://127.0.0.1:{state.ports['dashboard']}"
            up = ray_cli("up", "-y", str(config), "--no-config-cache", "--disable-usage-stats", timeout=600)
            said = up.stdout + up.stderr
            # Worth another try, and only these: `ray start` gives the head's raylet a fixed 30 s
            # (ray/_private/node.py) to register with the GCS, which a 2-core machine busy with another module's
            # Ray tests can miss; and a port picked free may be taken before the head binds it (another process's
            # pick). Each try renders fresh ports; the head's processes of a failed try are stopped first.
            if up.returncode == 0 or not any(sign in said for sign in RETRIED_STARTS):
                break
            _stop_cluster(_cluster_processes(state.marker))
        assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
        # The cluster guide's next step: copy the head's token (made by its start command) to the client; the
        # guide's ~/.ray/auth_token, in the head's own home here.
        state.fetched = ray_cli("rsync-down", str(config), str(home / "head_home/.ray/auth_token"), str(state.token))
        yield state
    finally:
        if not state.down:  # the last test brings it down and checks; this is the safety net
            if hasattr(state, "config"):
                ray_cli("down", "-y", str(state.config), timeout=300)
            _stop_cluster(_cluster_processes(state.marker), also=(sshd.pid,))
        shutil.rmtree(home, ignore_errors=True)


def _job(cluster, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job ...` against the cluster; while the head's job agent starts, Ray says to try again."""
    deadline = time.time() + 120
    while True:
        result = ray_cli("job", *args[:1], "--address", cluster.address, *args[1:], token=cluster.token,
                         timeout=timeout)
        if "No available agent" not in result.stdout + result.stderr or time.time() > deadline:
            return result
        time.sleep(3)


def _submit(cluster, *entrypoint: str, wait: bool = True, submission_id: str | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    options = ["--working-dir", "."] + ([] if wait else ["--no-wait"]) + \
              (["--submission-id", submission_id] if submission_id else [])
    return _job(cluster, "submit", *options, "--", "python", *entrypoint, timeout=timeout)


def _job_status(cluster, job_id: str) -> str:
    result = _job(cluster, "status", job_id, timeout=60)
    said = (result.stdout + result.stderr).lower()  # e.g. "Job 'x' succeeded", "Job 'x' is currently running"
    for status in ("succeeded", "failed", "stopped", "running", "pending"):
        if status in said:
            return status.upper()
    return "UNKNOWN: " + result.stdout[-500:] + result.stderr[-500:]


@pytest.mark.slow
def test_token_is_fetched_from_the_head_and_required(cluster):
    fetched = cluster.fetched  # `ray rsync-down <config> <head's home>/.ray/auth_token <file>`, run by the fixture
    assert fetched.returncode == 0, fetched.stdout[-2000:] + fetched.stderr[-2000:]
    assert cluster.token.read_text().strip()
    listed = _job(cluster, "list", timeout=120)
    assert listed.returncode == 0, listed.stdout[-2000:] + listed.stderr[-2000:]
    # Without the token the job API refuses: authentication is on.
    refused = subprocess.run([str(BIN / "ray"), "job", "list", "--address", cluster.address],
                             env={**_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0


@pytest.mark.slow
def test_head_listens_on_loopback_only(cluster):
    sockets = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True, check=True).stdout.splitlines()
    pids = set(_cluster_processes(cluster.marker))
    mine = [line for line in sockets if any(f"pid={pid}," in line for pid in pids)]
    assert mine, "found none of the head's listening sockets"
    for line in mine:
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")), line


@pytest.mark.slow
def test_tune_job_succeeds_and_writes_outputs(cluster, tmp_path):
    result = _submit(cluster, "jobs/tune.py", "-c", "configs/digits_mlp.yaml", "--set", "train.epochs=1",
                     "--set", "scaling.num_workers=1", "--set", "tune.num_samples=1",
                     "--set", "tune.space={optim.lr: {grid: [0.2]}}",
                     "--set", f"run.output_dir={tmp_path}", "--set", "run.name=search")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    search_dir = tmp_path / "search"
    assert len((search_dir / "trials.csv").read_text().splitlines()) == 2  # header + 1 trial
    assert (search_dir / "best_config.yaml").exists() and (search_dir / "tune_curves.png").exists()


@pytest.mark.slow
def test_bad_config_job_fails_with_the_one_line_error(cluster, tmp_path):
    result = _submit(cluster, "jobs/train.py", "--set", "optim.lr=-1", "--set", f"run.output_dir={tmp_path}")
    assert result.returncode != 0
    assert "rayscale: error: optim.lr: expected a value greater than 0, got -1" in result.stdout + result.stderr
    assert not any(tmp_path.iterdir())


TRAINING = ("RayTrainWorker", "TrainController", "jobs/train.py")


@pytest.mark.slow
def test_train_job_stops_cleanly_and_resubmitting_resumes(cluster, tmp_path):
    # The stop below must land before the job's last epoch, however fast the machine: until the stop, the
    # digits MLP sleeps 0.05 s per training forward (tests/loop_models.py's paced, which the job's working
    # directory carries), so each epoch of 23 steps takes at least 1.15 s and the 15 after the first at least
    # 17 s; the resumed job, the same config, trains at full speed. At the MLP's own pace, 40 epochs passed in
    # 6 s after the first and a loaded CI run finished the job before the stop.
    epochs = 16
    pace = tmp_path / "pace"
    pace.touch()
    entrypoint = ["jobs/train.py", "-c", "configs/digits_mlp.yaml", "--set", f"train.epochs={epochs}",
                  "--set", "batch.global_batch_size=64", "--set", "model.name=tests.loop_models:paced",
                  "--set", f"model.kwargs={{delay_s: 0.05, pace_file: {pace}}}",
                  "--set", f"run.output_dir={tmp_path}", "--set", "run.name=stopped",
                  "--set", "run.checkpoint_every_seconds=0"]
    first = _submit(cluster, *entrypoint, wait=False, submission_id="rayscale-stop-1")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    deadline, asked = time.time() + 300, time.time()
    while time.time() < deadline:  # stop it once its first epoch-end checkpoint is committed, well before its last
        if registered_checkpoint(tmp_path / "stopped" / "checkpoints"):
            break
        if time.time() > asked + 10:  # a job that failed early fails the test now (each ask is a `ray` CLI)
            assert _job_status(cluster, "rayscale-stop-1") in ("PENDING", "RUNNING")
            asked = time.time()
        time.sleep(0.5)
    else:
        pytest.fail("no checkpoint of the job was committed in time")
    stopped = _job(cluster, "stop", "rayscale-stop-1", timeout=180)
    assert stopped.returncode == 0, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert _job_status(cluster, "rayscale-stop-1") == "STOPPED"

    # No orphans: the driver, its Train controller and workers are gone from the cluster.
    deadline = time.time() + 60
    while time.time() < deadline:
        left = {pid: c for pid, c in _cluster_processes(cluster.marker).items() if any(t in c for t in TRAINING)}
        if not left:
            break
        time.sleep(1)
    assert not left, left
    assert not (tmp_path / "stopped" / "summary.json").exists()  # it did not finish
    pace.unlink()

    # The same job again resumes from the last checkpoint and finishes the run; its log, followed the cluster guide's
    # way, shows the resume and the progress.
    second = _submit(cluster, *entrypoint, wait=False, submission_id="rayscale-stop-2")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    follow = _job(cluster, "logs", "--follow", "rayscale-stop-2")
    assert "resuming at epoch" in follow.stdout, follow.stdout[-3000:] + follow.stderr[-3000:]
    # The driver's own summary: a worker's last progress line can reach the job log after the driver exits.
    assert re.search(rf"samples seen +[\d,]+ in [\d,]+ steps, {epochs} epochs", follow.stdout), follow.stdout[-3000:]
    assert _job_status(cluster, "rayscale-stop-2") == "SUCCEEDED"
    run_dir = tmp_path / "stopped"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "model.pt", "curves.png"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["samples_seen"] == epochs * summary["train_rows"]
    samples = [json.loads(x)["samples_seen"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert samples == sorted(samples)  # nothing logged twice across the stop


@pytest.mark.slow
def test_dashboard_is_reached_through_the_ssh_port_forward(cluster):
    # A port free when picked can be taken before the forward binds it (another Ray on this machine starts
    # workers on random ports): then the forward fails, and what answers there is not HTTP. Up to 3 ports.
    for _ in range(3):
        local_port = free_loopback_port()
        forward = subprocess.Popen([str(BIN / "ray"), "dashboard", str(cluster.config), "--port", str(local_port),
                                    "--remote-port", str(cluster.ports["dashboard"]), "--no-config-cache"],
                                   env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        try:
            url = f"http://127.0.0.1:{local_port}/api/version"
            deadline, refused = time.time() + 60, None
            while time.time() < deadline and refused is None:
                try:
                    urllib.request.urlopen(url, timeout=5)
                    pytest.fail("the dashboard answered without a token")
                except urllib.error.HTTPError as error:  # the forward is up; the dashboard wants the token
                    refused = error.code
                except OSError:  # not up yet (a reset connection included)
                    time.sleep(1)
                except http.client.HTTPException:  # not HTTP: another process holds the port, not the forward
                    break
            if refused is None and time.time() < deadline:
                continue
            assert refused == 401
            token = cluster.token.read_text().strip()
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
            assert b"ray_version" in urllib.request.urlopen(request, timeout=10).read()
            return
        finally:
            os.killpg(forward.pid, signal.SIGTERM)
            forward.wait(timeout=30)
    pytest.fail("three local ports were taken before the forward could bind them")


@pytest.mark.slow
def test_ray_down_and_the_sweep_leave_no_process(cluster):
    """Last in the module: take the cluster down as the cluster guide says, then stop what is left by pid."""
    before = _cluster_processes(cluster.marker)
    assert before
    down = ray_cli("down", "-y", str(cluster.config), timeout=300)
    assert down.returncode == 0, down.stdout[-2000:] + down.stderr[-2000:]
    # The local provider's `ray down` leaves the head's Ray running (seen here): stop it by pid.
    _stop_cluster(_cluster_processes(cluster.marker), also=(cluster.sshd.pid,))
    cluster.down = True
    assert not _cluster_processes(cluster.marker)
    assert not [pid for pid in before if _running(pid)]
    assert cluster.sshd.poll() is not None
