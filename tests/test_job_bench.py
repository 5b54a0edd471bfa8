"""jobs/bench.py runs every system side by side and writes its tables (smoke: tiny shape, CPU)."""

from __future__ import annotations

import json

from jobs import bench


def test_bench_rows_ratios_and_files(tmp_path):
    argv = [
        "--shape",
        "tiny",
        "--device",
        "cpu",
        "--audio-seconds",
        "4",
        "--batch",
        "2",
        "--max-new-tokens",
        "4",
    ]
    argv += ["--methods", "none", "fastadasp", "h2o", "--levels", "0.3", "--fit", "--memory-gb", "0.01"]
    bench.main([*argv, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    systems = [(r["system"], r.get("method")) for r in rows]
    assert systems[:4] == [
        ("transformers", None),
        ("engine", "none"),
        ("engine", "fastadasp"),
        ("engine", "h2o"),
    ]
    merged = rows[2]
    assert merged["kv_bytes"] < rows[1]["kv_bytes"]
    assert merged["predicted_speedup"] > 1 and merged["speedup_vs_transformers"] > 0
    fit = {r["method"]: r["batch"] for r in rows if r["system"] == "engine-fit"}
    assert set(fit) == {"none", "fastadasp", "h2o"} and min(fit.values()) >= 1
    assert "| engine | fastadasp | 30% |" in (tmp_path / "bench.md").read_text()
