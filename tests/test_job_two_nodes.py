"""Scheduling over two simulated nodes, each with one logical GPU: one model actor per GPU, on
both nodes. The GPUs are logical, so the actors fall back to CPU (no CUDA here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from pipeline.publish import read_committed
from schemas.job_config import JobConfig
from tests.conftest import tone_bursts, write_wav
from workers.archive_job import run_archive

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_gpu_nodes() -> Iterator[list[str]]:
    """A head with one CPU and no GPU, plus two nodes with 1 CPU + 1 logical GPU each; their node ids."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    workers = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield [w.node_id for w in workers]
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_one_model_actor_per_gpu_node(two_gpu_nodes: list[str], tmp_path: Path) -> None:
    for i in range(6):
        write_wav(tmp_path / "in" / f"r{i}.wav", tone_bursts(3.0 + i))
    summary = run_archive(
        JobConfig(
            str(tmp_path / "in"), str(tmp_path / "out"), model_actors=2, gpus_per_actor=1.0, batch_size=1
        )
    )
    assert summary.ok == 6
    # where Ray placed the model actors (which of them decoded what depends on which was ready first)
    actors = [a for a in list_actors(detail=True) if "WindowPredictor" in a.class_name]
    assert sorted(a.node_id for a in actors) == sorted(two_gpu_nodes)
    stats = read_committed(tmp_path / "out", "stats").to_pylist()
    assert {s["node"] for s in stats} <= set(two_gpu_nodes)  # never on the head, which has no GPU
    assert all(s["device_name"].startswith("cpu") for s in stats)
