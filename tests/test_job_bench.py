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
    argv += ["--methods", "none", "fastadasp", "h2o", "--fit", "--memory-gb", "0.01"]
    # 0.99 is out of a 2-layer constant schedule's reach: an error row.
    argv += ["--levels", "0.3", "0.99", "--ragged"]
    bench.main([*argv, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    systems = [(r["system"], r.get("method")) for r in rows]
    assert systems[:6] == [
        ("transformers", None),
        ("engine", "none"),
        ("engine", "fastadasp"),
        ("engine", "fastadasp"),
        ("engine", "h2o"),
        ("engine", "h2o"),
    ]
    assert "unreachable" in rows[3]["error"] and "decode_tokens_per_s" not in rows[3]
    # A real generate step on CPU takes milliseconds (not the clamp of a negative difference).
    assert rows[0]["decode_ms_per_step"] > 0.05 and rows[0]["prefill_s"] > 0
    merged = rows[2]
    assert merged["kv_bytes"] < rows[1]["kv_bytes"]
    assert merged["predicted_speedup"] > 1 and merged["speedup_vs_transformers"] > 0
    fit = {r["method"]: r["batch"] for r in rows if r["system"] == "engine-fit" and "error" not in r}
    ragged = [r for r in rows if r["system"] == "engine-ragged" and "error" not in r]
    assert [(r["method"], r["level"]) for r in ragged] == [
        ("none", 0.0),
        ("fastadasp", 0.3),
        ("h2o", 0.3),
        ("h2o", 0.99),
    ]
    assert all(r["speedup_vs_one_by_one"] > 0 and r["decode_tokens_per_s"] > 0 for r in ragged)
    failed = [(r["method"], r["level"]) for r in rows if r["system"] == "engine-fit" and "error" in r]
    assert failed == [("fastadasp", 0.99)]
    assert set(fit) == {"none", "fastadasp", "h2o"} and min(fit.values()) >= 1
    table = (tmp_path / "bench.md").read_text()
    assert "| engine | fastadasp | 30% |" in table and "ValueError: target=0.99" in table
