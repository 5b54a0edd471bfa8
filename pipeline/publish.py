"""Stage, validate and atomically publish a run's tables in parts; the output folder's lock; committed
reads.

Layout of an output folder ``DIR``::

    DIR/_lock                                          held by the one run writing to DIR (stale if its pid died)
    DIR/staging/run_id=<id>/part=<n>/<table>.parquet   a part in progress (never read)
    DIR/runs/run_id=<id>/part=<n>/<table>.parquet      a published part ...
    DIR/runs/run_id=<id>/part=<n>/_manifest.json       ... committed once this file exists (written last)

A run commits its finished recordings in parts as it goes (``RunWriter``), each part atomically, so a
crash loses at most the part in flight. Concurrency: a run holds ``_lock`` (created by an atomic hard
link, so never half-written) from planning to its last part, so two runs on one folder never plan the
same recordings; the second is refused with the holder's pid/host. A lock left by a dead process on this
host is taken over. Ray's own ``write_parquet`` is not used for the final tables: it is not atomic and
cannot split one stream into three tables, so the driver streams the stitched rows into staging itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.inputs import PlannedRecording, latest_entries, sha256_file
from schemas.manifest import LEGACY_PART, FileEntry, ManifestError, RecordingEntry, RunManifest
from schemas.tables import TABLES, split_records

MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_lock"
_BREAKER_STALE_S = 60.0


class PublishError(RuntimeError):
    """Staged outputs contradict the plan, or a publish step failed; nothing was committed."""


class OutputWriteError(PublishError):
    """Writing into the output folder failed (full disk, permissions); the part in flight was removed,
    the parts committed before it stay."""


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder's lock."""


def new_run_id() -> str:
    """Sortable and unique: UTC time to the second plus 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def staging_dir(output: Path, run_id: str, part: int) -> Path:
    return output / "staging" / f"run_id={run_id}" / f"part={part:05d}"


def part_dir(output: Path, run_id: str, part: int) -> Path:
    run = output / "runs" / f"run_id={run_id}"
    return run if part == LEGACY_PART else run / f"part={part:05d}"


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (tells a reused pid apart), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _holder_alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # cannot check another host's processes: assume alive
    return _process_start(int(holder.get("pid", -1))) == holder.get("start")


class OutputLock:
    """Exclusive lock on an output folder: ``with OutputLock(dir, run_id): ...``."""

    def __init__(self, output: Path, run_id: str) -> None:
        self.path = output / LOCK_NAME
        pid = os.getpid()
        self.holder = {
            "pid": pid,
            "start": _process_start(pid),
            "host": socket.gethostname(),
            "run_id": run_id,
        }

    def _try_create(self) -> bool:
        """Create the lock with its content in one step: link a complete temp file (fails if it exists)."""
        tmp = self.path.with_name(f"{LOCK_NAME}.tmp-{secrets.token_hex(4)}")
        try:
            tmp.write_text(json.dumps(self.holder))
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)  # also after a failed write (full disk): no temp file is left
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._try_create():
            return
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            holder = {}  # released in the meantime
        if holder and _holder_alive(holder):
            raise OutputLockedError(
                f"{self.path.parent} is in use by run {holder.get('run_id')} "
                f"(pid {holder.get('pid')} on {holder.get('host')})"
            )
        self._break_stale(holder)
        if not self._try_create():
            raise OutputLockedError(f"{self.path.parent}: another run took over the stale lock first")

    def _break_stale(self, holder: dict) -> None:
        """Remove the lock only if it still names ``holder``; a breaker file serialises the breakers."""
        breaker = self.path.with_name(f"{LOCK_NAME}.break")
        with contextlib.suppress(FileNotFoundError):
            if time.time() - breaker.stat().st_mtime > _BREAKER_STALE_S:
                breaker.unlink()
        try:
            os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return  # someone else is breaking it; our create attempt decides
        try:
            with contextlib.suppress(OSError, json.JSONDecodeError):
                if json.loads(self.path.read_text() or "{}") == holder:
                    self.path.unlink()
        finally:
            breaker.unlink()

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()) == self.holder:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_abandoned(output: Path) -> list[Path]:
    """Delete staging folders and uncommitted parts left by dead runs (their committed parts stay).
    Call only under the lock."""
    abandoned = [p for p in (output / "staging").glob("run_id=*") if p.is_dir()]
    abandoned += [p for p in (output / "runs").glob("run_id=*/part=*") if not (p / MANIFEST_NAME).exists()]
    for p in abandoned:
        shutil.rmtree(p)
    for run in (output / "runs").glob("run_id=*"):
        if run.is_dir() and not any(run.iterdir()):
            run.rmdir()
    return abandoned


class StagingWriter:
    """Streams stitched record batches (schemas.tables.RECORD_SCHEMA) into one part's staging tables,
    ``ROW_GROUP`` records at a time (batches arrive a few records each; one row group apiece would
    bloat the files)."""

    ROW_GROUP = 256

    def __init__(self, output: Path, run_id: str, part: int = 0) -> None:
        self.dir = staging_dir(output, run_id, part)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.writers = {
            name: pq.ParquetWriter(self.dir / f"{name}.parquet", schema) for name, schema in TABLES.items()
        }
        self.recordings: list[RecordingEntry] = []
        self._buffer: list[pa.Table] = []

    def _flush(self) -> None:
        if self._buffer:
            for name, table in split_records(pa.concat_tables(self._buffer)).items():
                if table.num_rows:
                    self.writers[name].write_table(table)
        self._buffer = []

    def add(self, records: pa.Table) -> None:
        self._buffer.append(records)
        if sum(t.num_rows for t in self._buffer) >= self.ROW_GROUP:
            self._flush()
        self.recordings += [
            RecordingEntry(r["recording_id"], r["content_sha256"], r["status"], r["stage"])
            for r in records.select(["recording_id", "content_sha256", "status", "stage"]).to_pylist()
        ]

    def close(self) -> dict[str, FileEntry]:
        """Close the files, fsync them, and describe them for the manifest."""
        self._flush()
        entries = {}
        for name, writer in self.writers.items():
            writer.close()
            path = self.dir / f"{name}.parquet"
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            rows = pq.read_metadata(path).num_rows
            entries[name] = FileEntry(path.name, rows, path.stat().st_size, sha256_file(path))
        return entries

    def abort(self) -> None:
        """Close the files without caring how (the part is being thrown away)."""
        for writer in self.writers.values():
            with contextlib.suppress(Exception):
                writer.close()


@dataclass(frozen=True)
class Counts:
    planned: int
    ok: int
    empty: int
    error: int


def validate(
    planned: list[tuple[str, str]], recordings: list[RecordingEntry], files: dict[str, FileEntry]
) -> Counts:
    """Check that every planned (id, sha256) is exactly one output row and the files agree. Raises PublishError."""
    got = [(r.recording_id, r.content_sha256) for r in recordings]
    missing, extra = set(planned) - set(got), set(got) - set(planned)
    duplicates = len(got) - len(set(got))
    if missing or extra or duplicates:
        raise PublishError(
            f"outputs do not match the plan: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
            f"{len(extra)} unplanned, {duplicates} duplicated"
        )
    status = [r.status for r in recordings]
    counts = Counts(len(planned), status.count("ok"), status.count("empty"), status.count("error"))
    if files["results"].rows != counts.ok + counts.empty or files["errors"].rows != counts.error:
        raise PublishError(f"file row counts {files} disagree with the recordings {counts}")
    if files["stats"].rows != files["results"].rows:
        raise PublishError("stats and results row counts differ")
    return counts


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(output: Path, manifest: RunManifest) -> Path:
    """Move the staged part into ``runs/`` (one rename) and commit it by writing its manifest last."""
    src = staging_dir(output, manifest.run_id, manifest.part)
    dst = part_dir(output, manifest.run_id, manifest.part)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise PublishError(f"{dst} exists; parts are never overwritten")
    os.rename(src, dst)
    _fsync_dir(dst.parent)
    with contextlib.suppress(OSError):  # the run's staging folder, once it holds no part
        src.parent.rmdir()
    tmp = dst / f"{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, dst / MANIFEST_NAME)
    _fsync_dir(dst)
    return dst


class RunWriter:
    """Stages a run's stitched records and commits them in parts, each atomically (``publish``): once
    ``every_n`` recordings are staged or the part is ``every_s`` seconds old, whichever comes first
    (checked as records arrive), and what is left at ``finish``.

    ``template``: the run's manifest without files, counts or recordings (filled per part).
    ``planned``: the run's plan; each part is validated against it, and ``finish`` checks that every
    planned recording was committed exactly once. A failed write (full disk, permissions) removes the
    part in flight and raises OutputWriteError naming the folder and the cause; committed parts stay.
    """

    def __init__(
        self,
        output: Path,
        template: RunManifest,
        planned: list[PlannedRecording],
        every_n: int,
        every_s: float,
    ) -> None:
        self.output, self.template = output, template
        self.planned = {r.recording_id: r for r in planned}
        self.every_n, self.every_s = every_n, every_s
        self.committed: list[RunManifest] = []
        self.done: set[str] = set()
        self._writer: StagingWriter | None = None
        self._opened = time.monotonic()

    @property
    def part(self) -> int:
        return len(self.committed)

    def add(self, records: pa.Table) -> None:
        """Stage records (RECORD_SCHEMA; none is fine: the part's age is checked all the same)."""
        if records.num_rows:
            with self._failing_part():
                if self._writer is None:
                    self._writer = StagingWriter(self.output, self.template.run_id, self.part)
                    self._opened = time.monotonic()
                self._writer.add(records)
        if self._writer is not None and (
            len(self._writer.recordings) >= self.every_n or time.monotonic() - self._opened >= self.every_s
        ):
            self.commit()

    def commit(self) -> RunManifest | None:
        """Commit the staged part (None: nothing staged)."""
        if self._writer is None:
            return None
        staged = self._writer.recordings
        with self._failing_part():
            files = self._writer.close()
            expected = [
                (r.recording_id, self.planned[r.recording_id].content_sha256)
                for r in staged
                if r.recording_id in self.planned and r.recording_id not in self.done
            ]
            counts = validate(expected, staged, files)
            manifest = replace(
                self.template,
                part=self.part,
                created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                files=files,
                counts=vars(counts),
                recordings=sorted((self._with_source(r) for r in staged), key=lambda e: e.recording_id),
            )
            publish(self.output, manifest)
        self._writer = None
        self.committed.append(manifest)
        self.done.update(r.recording_id for r in staged)
        return manifest

    def finish(self) -> Counts:
        """Commit the rest; the run's counts over all its parts. Raises PublishError when a planned
        recording never arrived (the parts committed stay; the next run does the rest)."""
        self.commit()
        missing = sorted(set(self.planned) - self.done)
        if missing:
            raise PublishError(f"{len(missing)} planned recordings never arrived (e.g. {missing[:3]})")
        return Counts(
            *(sum(m.counts[k] for m in self.committed) for k in ("planned", "ok", "empty", "error"))
        )

    def _with_source(self, entry: RecordingEntry) -> RecordingEntry:
        """Where the bytes came from and their stat at hashing (lets the next run skip hashing them)."""
        p = self.planned[entry.recording_id]
        return replace(
            entry,
            source_path=p.source_path,
            member_offset=p.member_offset,
            source_size=p.source_size,
            source_mtime_ns=p.source_mtime_ns,
        )

    def discard(self) -> None:
        """Remove the part in flight: its staged files, or its folder in ``runs/`` if the manifest was
        never written."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        run_id = self.template.run_id
        for folder in (staging_dir(self.output, run_id, self.part), part_dir(self.output, run_id, self.part)):
            if not (folder / MANIFEST_NAME).exists():
                shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # only if empty
            staging_dir(self.output, run_id, self.part).parent.rmdir()

    @contextlib.contextmanager
    def _failing_part(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            self.discard()
            raise OutputWriteError(
                f"writing part {self.part} of run {self.template.run_id} into {self.output} failed: "
                f"{os.strerror(e.errno) if e.errno else e}; nothing of this part is left, the "
                f"{self.part} parts committed before it stay"
            ) from e
        except PublishError:
            self.discard()
            raise

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is not None:  # the run failed: leave no staged part behind
            self.discard()


def committed_manifests(output: str | Path) -> list[RunManifest]:
    """Manifests of committed parts, oldest first (by run, then part). A part folder without a manifest
    is not committed."""
    runs = Path(output) / "runs"
    manifests = []  # runs of the single-commit layout (one manifest per run) read as one part each
    for path in sorted(
        [*runs.glob(f"run_id=*/{MANIFEST_NAME}"), *runs.glob(f"run_id=*/part=*/{MANIFEST_NAME}")]
    ):
        try:
            manifests.append(RunManifest.from_json(path.read_text()))
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from e
    return sorted(manifests, key=lambda m: (m.run_id, m.part))


def read_committed(output: str | Path, table: str) -> pa.Table:
    """One table over all committed parts. A recording's rows come from its latest committed entry
    (``pipeline.inputs.latest_entries``, what the done-set is made of), in every table alike: a recording
    that failed and then succeeded has results and no errors."""
    output = Path(output)
    manifests = committed_manifests(output)
    owner = {rid: (m.run_id, m.part) for rid, (m, _) in latest_entries(manifests).items()}
    parts = []
    for m in manifests:
        part = pq.read_table(part_dir(output, m.run_id, m.part) / m.files[table].path, schema=TABLES[table])
        own = pa.array([rid for rid, key in owner.items() if key == (m.run_id, m.part)], pa.string())
        parts.append(part.filter(pc.is_in(part["recording_id"], value_set=own)))
    return pa.concat_tables(parts) if parts else TABLES[table].empty_table()
