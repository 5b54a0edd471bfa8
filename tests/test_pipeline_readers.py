"""The output folder read by the readers users have (pandas, pyarrow.dataset, DuckDB, Polars): each
table's folder holds exactly the committed view ``read_committed`` returns, after several runs, a run
killed with SIGKILL mid-way, a retried error and a changed file, and holds few files however many
parts were committed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from pipeline.publish import MAX_FILES, RunWriter, committed_manifests, read_committed, remove_abandoned
from schemas.tables import RESULTS_SCHEMA
from tests.test_pipeline_publish import _plan, _records, _template

# What identifies a row's content in each table (the readers convert nested columns each their own way).
_KEYS = {"results": ["recording_id", "run_id", "text"], "stats": ["recording_id", "run_id", "audio_seconds"]}
_KEYS["errors"] = ["recording_id", "run_id", "error"]


def _run(out: Path, run_id: str, rows: list[tuple[str, str, str]], every_n: int = 1) -> None:
    writer = RunWriter(out, _template(run_id), _plan([r for r, _, _ in rows]), every_n, 3600.0)
    with writer:
        for row in rows:
            writer.add(_records(run_id, [row]))
        writer.finish()


def _rows(table: pa.Table | pd.DataFrame | pl.DataFrame, keys: list[str]) -> list[tuple]:
    if isinstance(table, pa.Table):
        table = table.to_pandas()
    if isinstance(table, pl.DataFrame):
        return sorted(table.select(keys).rows())
    return sorted(table[keys].itertuples(index=False, name=None))


def _readers_agree(out: Path) -> dict[str, int]:
    counts = {}
    for table, keys in _KEYS.items():
        expected = _rows(read_committed(out, table), keys)
        folder = out / table
        assert _rows(pd.read_parquet(folder), keys) == expected, table
        assert _rows(ds.dataset(folder, format="parquet", partitioning="hive").to_table(), keys) == expected
        assert _rows(duckdb.sql(f"select * from read_parquet('{folder}/*.parquet')").df(), keys) == expected
        assert _rows(pl.read_parquet(f"{folder}/*.parquet"), keys) == expected, table
        counts[table] = len(expected)
    return counts


_SLOW_RUN = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from pipeline.publish import RunWriter
    from tests.test_pipeline_publish import _plan, _records, _template

    out, ids = Path(sys.argv[1]), "vwxyz"
    writer = RunWriter(out, _template("r3-killed"), _plan(ids), every_n=1, every_s=3600.0)
    for rid in ids:
        writer.add(_records("r3-killed", [(rid, "ok", "killed run " + rid)]))
        time.sleep(0.3)
    """
)


def test_every_reader_gets_the_committed_view(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _run(out, "r1", [("a", "ok", "first a"), ("b", "error", "bad header"), ("c", "ok", "first c")])
    assert _readers_agree(out) == {"results": 2, "stats": 2, "errors": 1}
    _run(out, "r2", [("d", "ok", "d"), ("e", "empty", "")])
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(out)], cwd=Path(__file__).parents[1])
    deadline = time.monotonic() + 60
    while len(committed_manifests(out)) < 7 and time.monotonic() < deadline:  # r1 3 parts, r2 2, then 2
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _readers_agree(out)  # whatever the kill left half-done is invisible already
    assert killed["results"] >= 6 and killed["errors"] == 1
    remove_abandoned(out)
    assert _readers_agree(out) == killed
    # the next night: b retried and fixed, c's file changed, a new recording
    _run(out, "r4", [("b", "ok", "fixed b"), ("c", "ok", "changed c"), ("f", "ok", "f")])
    after = _readers_agree(out)
    assert after["errors"] == 0 and after["results"] == killed["results"] + 2
    texts = dict(_rows(read_committed(out, "results"), ["recording_id", "text"]))
    assert (texts["b"], texts["c"]) == ("fixed b", "changed c")
    # many more parts: each table's folder keeps at most MAX_FILES files
    _run(out, "r5", [(f"n{i:02d}", "ok", f"n{i}") for i in range(40)])
    assert max(len(list((out / t).glob("*.parquet"))) for t in _KEYS) <= MAX_FILES
    assert _readers_agree(out)["results"] == after["results"] + 40


def test_files_of_an_older_schema_are_rewritten_in_the_current_one(tmp_path: Path) -> None:
    """A column added by a later release: the next commit rewrites the files written before it, so the
    folder keeps one schema (the old rows read the new column as null)."""
    out = tmp_path / "out"
    _run(out, "r1", [("a", "ok", "a")])
    (old,) = (out / "results").glob("*.parquet")
    older = pq.read_table(old).drop_columns(["language"])
    old.unlink()  # a file as the previous release wrote it
    pq.write_table(older, old)
    _run(out, "r2", [("b", "ok", "b")])
    assert {pq.read_schema(f).equals(RESULTS_SCHEMA) for f in (out / "results").glob("*.parquet")} == {True}
    assert pd.read_parquet(out / "results")["language"].isna().all()
    assert _readers_agree(out)["results"] == 2
