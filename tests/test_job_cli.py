"""jobs/transcribe_archive.py as users run it: separate driver processes on a running cluster, a
driver killed mid-run then resumed, two runs on one output folder, ``ray job submit`` with token auth."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from tests.conftest import ROOT, committed_rows, killed_and_resumed, start_job, tone_bursts, write_wav

pytestmark = pytest.mark.slow
JOB = ["jobs/transcribe_archive.py"]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    for i in range(2):
        write_wav(root / f"r{i}.wav", tone_bursts(4.0 + 3 * i))
    (root / "broken.wav").write_bytes(b"RIFF....WAVEfmt nothing else")
    return root


def _driver(archive: Path, output: Path, *extra: str) -> subprocess.Popen:
    """A driver process joining this module's cluster (as ``ray job submit`` drivers do)."""
    env = os.environ | {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    return start_job([sys.executable, *JOB], archive, output, env, *extra)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.usefixtures("ray_local")
def test_second_run_on_a_busy_folder_is_refused_and_killed_driver_resumes(
    archive: Path, tmp_path: Path
) -> None:
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    first = _driver(archive, reference)
    _wait_for(reference / "_lock", first)
    second = _driver(archive, reference)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 2 and "in use by run" in out
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    assert "ok 2, empty 0, failed 1" in out.splitlines()[-1]

    killed_and_resumed(lambda *extra: _driver(archive, killed, *extra))
    for name in ("results", "errors", "stats"):
        assert committed_rows(killed, name) == committed_rows(reference, name), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NOT_UP_YET = ("Failed to connect", "Connection refused", "No available agent")


def test_ray_job_submit_with_token_auth(archive: Path, tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    # docs/pipeline.md's recipe as typed without an activated venv: the venv's ray, the entrypoint's
    # interpreter by absolute path, PATH without the venv
    path = ":".join(p for p in os.environ["PATH"].split(":") if Path(p).resolve() != bin_dir.resolve())
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "VIRTUAL_ENV")}
    env |= {"RAY_AUTH_MODE": "token", "PATH": path}
    dashboard = _free_port()
    ports = {"--port": _free_port(), "--dashboard-port": dashboard}
    for name in (
        "dashboard-agent-listen",
        "dashboard-agent-grpc",
        "metrics-export",
        "runtime-env-agent",
        "ray-client-server",
    ):
        ports[f"--{name}-port"] = _free_port()  # defaults would clash with any other cluster on this machine
    head = subprocess.Popen(
        [bin_dir / "ray", "start", "--head", "--block", "--num-cpus", "2", "--disable-usage-stats",
         *(str(x) for kv in ports.items() for x in kv)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        address = f"http://127.0.0.1:{dashboard}"
        submit = [bin_dir / "ray", "job", "submit", "--address", address, "--working-dir", ".",
                  "--runtime-env-json", '{"excludes": [".git", "*.parquet"]}', "--",
                  str(bin_dir / "python"), *JOB, "--input", str(archive), "--output", str(tmp_path / "out")]  # fmt: skip
        deadline = time.monotonic() + 120  # the dashboard and its job agent take a while to come up
        while True:
            done = subprocess.run(submit, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
            if time.monotonic() > deadline or not any(m in done.stdout + done.stderr for m in _NOT_UP_YET):
                break
            time.sleep(2)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "ok 2, empty 0, failed 1" in done.stdout
        assert len(committed_rows(tmp_path / "out", "results")) == 2
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # ray start --block stops the processes it started
        head.wait(60)
