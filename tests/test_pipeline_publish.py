"""Publishing: the output lock, staging, validation against the plan, atomic commit in parts, committed
reads, a full disk."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.inputs import PlannedRecording
from pipeline.publish import (
    LOCK_NAME,
    InFlight,
    OutputLock,
    OutputLockedError,
    PublishError,
    RunWriter,
    StagingWriter,
    committed_manifests,
    crashed,
    current_generation,
    manifest_path,
    publish,
    read_committed,
    remove_abandoned,
    staging_dir,
    upgrade_layout,
    validate,
)
from schemas.manifest import RunManifest
from schemas.tables import RECORD_SCHEMA, split_records


def _records(run_id: str, rows: list[tuple[str, str, str]]) -> pa.Table:
    """Stitch-stage rows: (recording id, status, text or error)."""
    out = []
    for rid, status, text in rows:
        row = {
            "recording_id": rid,
            "source_path": f"/in/{rid}",
            "content_sha256": f"h-{rid}",
            "run_id": run_id,
        }
        if status == "error":
            row |= {"status": "error", "stage": "decode", "error": text}
        else:
            row |= {
                "status": status, "task": "asr", "text": text, "segments": [], "model": "m", "reduction": "{}",
                "pipeline_version": "v", "meta": "{}", "audio_seconds": 1.0, "windows": 1, "audio_tokens_in": 0,
                "audio_tokens_kept": 0.0, "kv_bytes_full": 0, "kv_bytes_kept": 0, "encode_s": 0.0,
                "prefill_s": 0.0, "decode_s": 0.0, "generated_tokens": 0, "device_name": "cpu", "node": "n",
            }  # fmt: skip
        out.append(row)
    return pa.Table.from_pylist(out, schema=RECORD_SCHEMA)


def _template(run_id: str) -> RunManifest:
    return RunManifest(
        run_id=run_id, fingerprint="fp", pipeline_version="v", presets_version="p", created_at="t", config={},
        reduction={}, versions={}, files={}, counts={}, recordings=[],
    )  # fmt: skip


def _stage_and_publish(output: Path, run_id: str, rows: list[tuple[str, str, str]]) -> RunManifest:
    writer = StagingWriter(output, run_id)
    writer.add(_records(run_id, rows[:1]))
    writer.add(_records(run_id, rows[1:]))
    files = writer.close()
    counts = validate([(r, f"h-{r}") for r, _, _ in rows], writer.recordings, files)
    manifest = replace(_template(run_id), files=files, counts=vars(counts), recordings=writer.recordings)
    publish(output, manifest)
    return manifest


def _plan(ids: str) -> list[PlannedRecording]:
    return [PlannedRecording(i, f"/in/{i}", f"h-{i}") for i in ids]


def test_publish_commits_three_tables_and_latest_run_wins(tmp_path: Path) -> None:
    m1 = _stage_and_publish(
        tmp_path, "r1", [("a", "ok", "first"), ("b", "error", "bad header"), ("c", "empty", "")]
    )
    assert m1.counts == {"planned": 3, "ok": 1, "empty": 1, "error": 1}
    assert not staging_dir(tmp_path, "r1", 0).exists()
    assert read_committed(tmp_path, "results")["recording_id"].to_pylist() == ["a", "c"]
    assert read_committed(tmp_path, "errors").to_pylist()[0]["error"] == "bad header"
    assert read_committed(tmp_path, "stats").num_rows == 2
    _stage_and_publish(tmp_path, "r2", [("a", "ok", "second")])
    results = read_committed(tmp_path, "results")
    assert sorted(zip(results["recording_id"].to_pylist(), results["text"].to_pylist(), strict=True)) == [
        ("a", "second"),
        ("c", ""),
    ]
    assert [m.run_id for m in committed_manifests(tmp_path)] == ["r1", "r2"]
    with pytest.raises(PublishError, match="never overwritten"):
        _stage_and_publish(tmp_path, "r1", [("a", "ok", "again")])
    assert read_committed(tmp_path, "results")["text"].to_pylist() == ["", "second"]


def test_a_recording_reads_from_its_latest_run_in_every_table(tmp_path: Path) -> None:
    _stage_and_publish(tmp_path, "r1", [("a", "ok", "first"), ("b", "error", "bad header")])
    assert read_committed(tmp_path, "errors").num_rows == 1
    # r2: b fixed, a replaced by a broken file; neither's older row may show through
    m2 = _stage_and_publish(tmp_path, "r2", [("a", "error", "empty file"), ("b", "ok", "fixed")])
    assert [(r.recording_id, r.status, r.stage) for r in m2.recordings] == [
        ("a", "error", "decode"),
        ("b", "ok", None),
    ]
    assert read_committed(tmp_path, "results")["text"].to_pylist() == ["fixed"]
    assert read_committed(tmp_path, "stats")["recording_id"].to_pylist() == ["b"]
    assert read_committed(tmp_path, "errors")["error"].to_pylist() == ["empty file"]
    _stage_and_publish(tmp_path, "r3", [("a", "ok", "back")])
    errors = read_committed(tmp_path, "errors")  # no errors left: an empty table, not a failure
    assert errors.num_rows == 0 and errors.schema.names[0] == "recording_id"
    assert sorted(read_committed(tmp_path, "results")["text"].to_pylist()) == ["back", "fixed"]


def test_validate_refuses_missing_and_duplicated_rows(tmp_path: Path) -> None:
    writer = StagingWriter(tmp_path, "r")
    writer.add(_records("r", [("a", "ok", "x"), ("a", "ok", "x")]))
    files = writer.close()
    with pytest.raises(PublishError, match=r"1 missing .* 1 duplicated"):
        validate([("a", "h-a"), ("b", "h-b")], writer.recordings, files)


def test_uncommitted_runs_are_invisible_and_removed(tmp_path: Path) -> None:
    _stage_and_publish(tmp_path, "r1", [("a", "ok", "x")])
    writer = StagingWriter(tmp_path, "dead")  # a run killed before publishing
    writer.add(_records("dead", [("b", "ok", "y")]))
    writer.close()
    # killed after building generation 2 and writing its manifest, before the switch to it
    _stage_and_publish(tmp_path, "half", [("c", "ok", "z")])
    (tmp_path / "_tables" / "current").unlink()
    (tmp_path / "_tables" / "current").symlink_to("g000001")
    assert current_generation(tmp_path) == 1
    assert read_committed(tmp_path, "results")["recording_id"].to_pylist() == ["a"]
    assert [m.run_id for m in committed_manifests(tmp_path)] == ["r1"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in remove_abandoned(tmp_path)) == [
        "_parts/half/00000.json",
        "_staging/dead-00000",
        "_tables/g000002",
    ]
    assert not (tmp_path / "_parts" / "half").exists()  # a run folder left with no part goes too
    assert read_committed(tmp_path, "results")["recording_id"].to_pylist() == ["a"]
    assert pq.read_table(tmp_path / "results")["recording_id"].to_pylist() == ["a"]


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path: Path) -> None:
    with OutputLock(tmp_path, "first"), pytest.raises(OutputLockedError, match="first"):
        OutputLock(tmp_path, "second").acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    holder = OutputLock(tmp_path, "crashed").holder | {"pid": int(dead.stdout)}
    (tmp_path / LOCK_NAME).write_text(json.dumps(holder))
    with OutputLock(tmp_path, "next"):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["run_id"] == "next"


def _contend(output: str, barrier: mp.Barrier, wins: mp.Queue) -> None:
    lock = OutputLock(Path(output), "contender")
    try:
        lock.acquire()
        won = True
    except OutputLockedError:
        won = False
    barrier.wait()  # everyone has tried before the winner lets go
    wins.put(won)
    if won:
        lock.release()


def test_concurrent_runs_get_exactly_one_lock(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    n = 6
    barrier, wins = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), barrier, wins)) for _ in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert sorted(wins.get() for _ in range(n)) == [False] * (n - 1) + [True]


def test_parts_commit_as_they_fill_or_age_and_are_read_at_once(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path, _template("r1"), _plan("abcde"), every_n=2, every_s=3600.0)
    writer.add(_records("r1", [("a", "ok", "A")]))
    assert committed_manifests(tmp_path) == []  # one recording staged: below both limits
    writer.add(_records("r1", [("b", "error", "bad"), ("c", "ok", "C")]))
    (part,) = committed_manifests(str(tmp_path))
    assert (part.part, part.counts) == (0, {"planned": 3, "ok": 2, "empty": 0, "error": 1})
    assert sorted(read_committed(str(tmp_path), "results")["recording_id"].to_pylist()) == ["a", "c"]
    assert part.recordings[0].source_path == "/in/a"  # where the bytes came from, for the next plan
    assert part.extra["peak_rss_bytes"] > 10 * 2**20  # this process's peak, for a nightly operator
    writer.every_s = 0.05
    writer.add(_records("r1", [("d", "ok", "D")]))
    time.sleep(0.1)
    writer.add(_records("r1", []))  # nothing new, but the part is old enough
    assert [m.part for m in committed_manifests(tmp_path)] == [0, 1]
    with pytest.raises(PublishError, match="1 planned recordings never arrived"):
        writer.finish()
    assert sorted(read_committed(tmp_path, "results")["recording_id"].to_pylist()) == ["a", "c", "d"]


def test_a_part_that_contradicts_the_plan_is_removed_and_the_committed_ones_stay(tmp_path: Path) -> None:
    writer = RunWriter(tmp_path, _template("r1"), _plan("ab"), every_n=1, every_s=3600.0)
    writer.add(_records("r1", [("a", "ok", "A")]))
    with pytest.raises(PublishError, match="1 unplanned"):
        writer.add(_records("r1", [("x", "ok", "X")]))
    assert not any((tmp_path / "_staging").iterdir()) and not manifest_path(tmp_path, "r1", 1).exists()
    assert read_committed(tmp_path, "results")["recording_id"].to_pylist() == ["a"]


_FILL_DISK = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from pipeline.publish import LOCK_NAME, OutputLock, OutputWriteError, RunWriter, read_committed
    from tests.test_pipeline_publish import _plan, _records, _template

    out = Path(sys.argv[1])
    ids = [f"r{i:04d}" for i in range(5000)]
    writer = RunWriter(out, _template("r1"), [p for i in ids for p in _plan([i])], every_n=20, every_s=3600)
    try:
        for i in ids:
            writer.add(_records("r1", [(i, "ok", "words " * 200)]))
        sys.exit("the disk never filled")
    except OutputWriteError as e:
        print("ERROR", e)
    print("COMMITTED", len(writer.committed), read_committed(out, "results").num_rows)
    print("LEFT", sorted(p.name for p in (out / "_staging").rglob("*")))
    try:
        OutputLock(out, "next").acquire()
    except OSError as e:
        print("LOCK", type(e).__name__)
    print("LOCK_TMP", [p.name for p in out.glob(LOCK_NAME + ".tmp-*")])
    """
)


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare to mount a small tmpfs")
def test_a_full_disk_fails_naming_folder_and_cause_and_keeps_the_committed_parts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    script = f"mount -t tmpfs -o size=1m tmpfs {out} && {sys.executable} -c '{_FILL_DISK}' {out}"
    run = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, cwd=Path(__file__).parents[1]
    )
    if "mount" in run.stderr and run.returncode and "ERROR" not in run.stdout:
        pytest.skip(f"cannot mount a tmpfs here: {run.stderr.strip()}")
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert run.returncode == 0, run.stderr
    assert f"into {out} failed: No space left on device" in lines["ERROR"]
    committed, rows = map(int, lines["COMMITTED"].split())
    assert committed >= 1 and rows == 20 * committed  # the parts before the full disk stay readable
    assert lines["LEFT"] == "[]"  # no staging files of the failed part
    assert lines["LOCK_TMP"] == "[]"  # the lock's temp file is removed when writing it fails


def _legacy_part(output: Path, run_id: str, part: int | None, rows: list[tuple[str, str, str]]) -> None:
    """A part as the runs/ layout wrote it (part None: a version-1 run, one manifest beside its tables)."""
    folder = output / "runs" / f"run_id={run_id}" / ("" if part is None else f"part={part:05d}")
    folder.mkdir(parents=True)
    files = {}
    for name, table in split_records(_records(run_id, rows)).items():
        pq.write_table(table, folder / f"{name}.parquet")
        files[name] = {"path": f"{name}.parquet", "rows": table.num_rows, "bytes": 0, "sha256": ""}
    recordings = [
        {
            "recording_id": r,
            "content_sha256": f"h-{r}",
            "status": st,
            "stage": "decode" if st == "error" else None,
        }
        for r, st, _ in rows
    ]
    manifest = json.loads(_template(run_id).to_json()) | {"files": files, "recordings": recordings}
    del manifest["generation"]
    if part is None:
        del manifest["part"]
    version = {"manifest_version": 1 if part is None else 2} | ({} if part is None else {"part": part})
    (folder / "_manifest.json").write_text(json.dumps(manifest | version))


def test_folders_of_the_runs_layout_are_read_then_upgraded_in_place(tmp_path: Path) -> None:
    """An output folder of the runs/ layout (version-1 runs, one manifest each, and parts) keeps its
    committed work: read as it is, upgraded by the next run into table folders holding the same view
    (uncommitted leftovers dropped), and later parts override it recording by recording."""
    _legacy_part(tmp_path, "r0", None, [("a", "ok", "old a"), ("b", "ok", "old b")])
    _legacy_part(tmp_path, "r1", 0, [("b", "error", "bad"), ("c", "ok", "old c")])
    (tmp_path / "runs" / "run_id=r1" / "part=00001").mkdir()  # killed before its manifest
    assert [(m.run_id, m.part) for m in committed_manifests(tmp_path)] == [("r0", -1), ("r1", 0)]
    before = {t: read_committed(tmp_path, t) for t in ("results", "stats", "errors")}
    assert sorted(before["results"]["text"].to_pylist()) == ["old a", "old c"]
    assert before["errors"]["recording_id"].to_pylist() == ["b"]
    assert upgrade_layout(tmp_path) and not upgrade_layout(tmp_path)
    assert not (tmp_path / "runs").exists()
    for table, rows in before.items():
        assert read_committed(tmp_path, table).equals(rows)
        assert pq.read_table(tmp_path / table).sort_by("recording_id").equals(rows.sort_by("recording_id"))
    assert [(m.run_id, m.part, m.generation) for m in committed_manifests(tmp_path)] == [
        ("r0", -1, 1),
        ("r1", 0, 1),
    ]
    _stage_and_publish(tmp_path, "r2", [("a", "ok", "new a"), ("b", "ok", "fixed b")])
    assert sorted(read_committed(tmp_path, "results")["text"].to_pylist()) == ["fixed b", "new a", "old c"]
    assert read_committed(tmp_path, "errors").num_rows == 0


def test_a_recording_in_flight_when_two_runs_died_is_named_for_the_next(tmp_path: Path) -> None:
    def died(run_id: str, ids: str) -> None:  # a run killed outright: its file stays
        inflight = InFlight(tmp_path, run_id).__enter__()
        for rid in ids:
            inflight.start(rid)
        inflight.finish("a")  # a finished before the death

    died("r1", "abx")
    assert crashed(tmp_path, []) == {}  # one death blames nobody
    died("r2", "axy")
    assert crashed(tmp_path, []) == {"x": ["r1", "r2"]}
    m3 = _stage_and_publish(tmp_path, "r3", [("x", "error", "crash")])  # the next run sets x aside
    assert crashed(tmp_path, [m3]) == {}
    assert sorted(p.name for p in (tmp_path / "_inflight").iterdir()) == ["r1.json", "r2.json"]  # b, y
    _stage_and_publish(tmp_path, "r4", [("b", "ok", "b"), ("y", "ok", "y")])
    assert crashed(tmp_path, committed_manifests(tmp_path)) == {}
    assert not list((tmp_path / "_inflight").iterdir())  # nothing left to blame: the files go
    with InFlight(tmp_path, "r5") as inflight:  # a run that ends by itself leaves no file
        inflight.start("z")
    assert not list((tmp_path / "_inflight").iterdir())
