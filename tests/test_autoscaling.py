"""Clusters end to end, as users run them: a cluster that autoscales for a run, and ``ray job submit``.

Both start a Ray head of their own (``ray start --head --block`` on free ports, in a temp dir of its own so
that no other ``ray.init()`` on the machine finds it), and stop it by process id: ``ray stop`` would stop
every Ray cluster on the machine. They take minutes, so they are marked slow and left out of the default
run: ``pytest -m slow tests/test_autoscaling.py``.

- The autoscaling test runs Ray's fake multi-node provider (``fake_multinode``: the autoscaler "launches" a
  node by starting a raylet on this machine) with a 1-CPU head and a 2-CPU worker type (0 to 2 nodes), and
  trains with 2 Train workers of 1.5 CPUs: nothing fits the head, and no node fits both workers. The
  autoscaler must add both nodes, the run must finish, and the nodes must go when idle.
- The job test submits ``jobs/clothing1m.py`` with the README's ``ray job submit --working-dir .`` to a
  2-CPU head, waits for SUCCEEDED and reads the run's metrics.json; it also checks what the working-dir
  upload held (Ray leaves ``.git/`` and ``.venv/`` out by default, and ``.gitignore`` names ``runs/``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import ray.util
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_nodes
from ray.util.state.exception import RayStateApiException

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,  # so that -m "not ray", which replaces the default -m "not slow", leaves them out too
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="stops the head's processes found in /proc"),
]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray` and `raynoisy`, and `python` for the job's entrypoint
HEAD_START_S = 240  # a head starts in ~30 s on a loaded 2-core machine
RUN_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _process_tree(root: int) -> dict[int, str]:
    """pid -> start time of every descendant of ``root``, from /proc (the start time tells a pid reused
    by another process apart)."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        started[pid] = fields[19]
    tree: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            tree[child] = started[child]
            todo.append(child)
    return tree


def _kill_if_same(pid: int, started: str) -> None:
    with contextlib.suppress(OSError, IndexError):
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19] == started:
            os.kill(pid, signal.SIGKILL)


@dataclass
class Head:
    gcs: str  # ip:port, what RAY_ADDRESS takes
    dashboard: str  # http://127.0.0.1:port, what `ray job submit --address` and the State API take
    temp_dir: Path
    process: subprocess.Popen

    def alive_nodes(self) -> int:
        # Counted here: with a filter, the State API counts dead nodes as truncated output and raises.
        return sum(node.state == "ALIVE" for node in list_nodes(address=self.dashboard))


@contextlib.contextmanager
def ray_head(
    log: Path, *args: str, port: int | None = None, env: dict[str, str] | None = None
) -> Iterator[Head]:
    """A Ray head with its dashboard (the jobs API and the State API live there), stopped on exit: SIGTERM
    to ``ray start --block`` stops the head's processes, then whatever of its process tree is left (the
    fake provider's nodes, the job's driver) is killed by pid."""
    port = port or _free_port()
    dashboard = _free_port()
    # Short and private: Ray's socket paths must stay under 108 bytes, and a temp dir of its own keeps
    # this head out of /tmp/ray/ray_current_cluster, where a plain ray.init() would find and join it.
    temp_dir = Path(tempfile.mkdtemp(prefix="rn", dir="/tmp"))
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        f"--port={port}",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        "--include-dashboard=true",
        f"--temp-dir={temp_dir}",
        "--object-store-memory=200000000",
        *args,
    ]
    head_env = os.environ | {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # Ray gives its dashboard 60 s to start, which a loaded 2-core machine can miss.
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(HEAD_START_S),
        # A SIGTERM'd head otherwise waits 30 s for its node to drain; a test's has nothing to drain.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
    head_env |= env or {}
    with log.open("w") as out:
        process = subprocess.Popen(
            command, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    head = Head(
        f"{ray.util.get_node_ip_address()}:{port}", f"http://127.0.0.1:{dashboard}", temp_dir, process
    )
    try:
        _wait_until_up(head, log)
        yield head
    finally:
        tree = _process_tree(process.pid)
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for pid, started in tree.items():
            _kill_if_same(pid, started)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_until_up(head: Head, log: Path) -> None:
    """Until the State API (on the dashboard) lists the head node: the dashboard answers before that."""
    deadline = time.monotonic() + HEAD_START_S
    while time.monotonic() < deadline:
        assert head.process.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError, RayStateApiException):
            if head.alive_nodes() >= 1:
                return
        time.sleep(2)
    pytest.fail(f"the Ray head was not up in {HEAD_START_S} s:\n{log.read_text()[-3000:]}")


def _fake_cluster_config(gcs: str) -> dict:
    """A cluster launcher config for the fake provider: the head (1 CPU, as `ray start` gives it) and one
    worker type of 2 CPUs, 0 to 2 nodes, dropped after 6 s idle. (Ray's own example.yaml for this
    provider is not in the wheel.)"""
    return {
        "cluster_name": "raynoisy-fake",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.1,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs,  # the provider's nodes join this head, not the default port 6379
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
            "cpu2": {
                "resources": {"CPU": 2, "object_store_memory": 150 * 2**20},
                "node_config": {},
                "min_workers": 0,
                "max_workers": 2,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


def test_fake_multinode_cluster_grows_for_a_run_and_shrinks_when_idle(tmp_path):
    port = _free_port()
    config = tmp_path / "fake-cluster.json"
    config.write_text(json.dumps(_fake_cluster_config(f"{ray.util.get_node_ip_address()}:{port}")))
    fake = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    with ray_head(
        tmp_path / "head.log", "--num-cpus=1", f"--autoscaling-config={config}", port=port, env=fake
    ) as head:
        assert head.alive_nodes() == 1
        out, log = tmp_path / "run", tmp_path / "run.log"
        command = [
            str(BIN / "raynoisy"),
            "train",
            "--dataset=digits",
            "--method=ce",
            "--workers=2",
            "--epochs=1",
            f"--output={out}",
            # 2 x 1.5 CPUs: more than the head's 1, and a 2-CPU node holds only one worker
            "--set=scaling.cpus_per_worker=1.5",
            f"--set=data.shard_root={tmp_path / 'shards'}",
        ]
        peak = 1
        with log.open("w") as stream:
            run = subprocess.Popen(
                command, env=os.environ | {"RAY_ADDRESS": head.gcs}, stdout=stream, stderr=subprocess.STDOUT
            )
            deadline = time.monotonic() + RUN_S
            while run.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, RayStateApiException):  # a State API call can time out
                    peak = max(peak, head.alive_nodes())
                time.sleep(2)
            if run.poll() is None:
                run.kill()
                run.wait()
        text = log.read_text()
        assert run.returncode == 0, text[-4000:]
        assert "waiting for Ray's autoscaler to add nodes" in text
        assert peak == 3, f"the autoscaler should have added both worker nodes; at most {peak} node(s) alive"
        metrics = json.loads((out / "metrics.json").read_text())
        assert 0.0 <= metrics["test_accuracy"] <= 1.0
        assert metrics["train_samples_per_second"] > 0

        # Idle nodes go after idle_timeout_minutes (6 s) and an autoscaler update or two.
        deadline = time.monotonic() + 180
        alive = peak
        while alive > 1 and time.monotonic() < deadline:
            time.sleep(2)
            with contextlib.suppress(OSError, RayStateApiException):
                alive = head.alive_nodes()
        assert head.alive_nodes() == 1, "the idle worker nodes were not removed"


def test_ray_job_submit_runs_the_clothing1m_job(tmp_path):
    with ray_head(tmp_path / "head.log", "--num-cpus=2") as head:
        out = tmp_path / "clothing1m"
        submission = f"raynoisy-test-{uuid.uuid4().hex[:8]}"
        command = [
            str(BIN / "ray"),
            "job",
            "submit",
            f"--address={head.dashboard}",
            f"--submission-id={submission}",
            "--working-dir=.",
            "--",
            "python",
            "jobs/clothing1m.py",
            "--epochs=1",
            "--train-subset=280",  # 20 per class: the embedded miniature's ResNet-18 takes ~5 steps
            f"--output={out}",
            f"--set=data.shard_root={tmp_path / 'shards'}",
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_S)
        status = JobSubmissionClient(head.dashboard).get_job_status(submission)
        assert status == JobStatus.SUCCEEDED, (done.stdout + done.stderr)[-4000:]
        assert done.returncode == 0
        assert "test accuracy:" in done.stdout  # the job's own output, streamed back by `ray job submit`
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["dataset"] == "clothing1m"
        assert 0.0 <= metrics["test_accuracy"] <= 1.0

        # The working dir as the cluster unpacked it: the code, without the venv and the run folders.
        unpacked = head.temp_dir / "session_latest/runtime_resources/working_dir_files"
        packages = [folder for folder in unpacked.iterdir() if folder.is_dir()]
        assert len(packages) == 1
        assert (packages[0] / "jobs" / "clothing1m.py").is_file()
        assert (packages[0] / "raynoisy" / "cli.py").is_file()
        assert not (packages[0] / ".venv").exists()
        assert not (packages[0] / "runs").exists()
