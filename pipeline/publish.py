"""Stage, validate and atomically publish a run's tables; the output folder's lock; committed reads.

Layout of an output folder ``DIR``::

    DIR/_lock                              held by the one run writing to DIR (O_EXCL; stale if its pid died)
    DIR/staging/run_id=<id>/<table>.parquet  a run in progress (never read)
    DIR/runs/run_id=<id>/<table>.parquet     a published run ...
    DIR/runs/run_id=<id>/_manifest.json      ... committed once this file exists (written last)

Concurrency: a run holds ``_lock`` (created by an atomic hard link, so never half-written) from
planning to publishing, so two runs on one folder never plan the
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
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.plan import sha256_file
from schemas.manifest import FileEntry, ManifestError, RecordingEntry, RunManifest
from schemas.tables import TABLES, split_records

MANIFEST_NAME = "_manifest.json"
LOCK_NAME = "_lock"
_BREAKER_STALE_S = 60.0


class PublishError(RuntimeError):
    """Staged outputs contradict the plan, or a publish step failed; nothing was committed."""


class OutputLockedError(RuntimeError):
    """Another live run holds the output folder's lock."""


def new_run_id() -> str:
    """Sortable and unique: UTC time to the second plus 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def staging_dir(output: Path, run_id: str) -> Path:
    return output / "staging" / f"run_id={run_id}"


def run_dir(output: Path, run_id: str) -> Path:
    return output / "runs" / f"run_id={run_id}"


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
        tmp.write_text(json.dumps(self.holder))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
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
    """Delete staging folders and uncommitted run folders left by dead runs. Call only under the lock."""
    abandoned = [p for p in (output / "staging").glob("run_id=*") if p.is_dir()]
    abandoned += [p for p in (output / "runs").glob("run_id=*") if not (p / MANIFEST_NAME).exists()]
    for p in abandoned:
        shutil.rmtree(p)
    return abandoned


class StagingWriter:
    """Streams stitched record batches (schemas.tables.RECORD_SCHEMA) into the run's staging tables."""

    def __init__(self, output: Path, run_id: str) -> None:
        self.dir = staging_dir(output, run_id)
        self.dir.mkdir(parents=True, exist_ok=False)
        self.writers = {
            name: pq.ParquetWriter(self.dir / f"{name}.parquet", schema) for name, schema in TABLES.items()
        }
        self.recordings: list[RecordingEntry] = []

    def add(self, records: pa.Table) -> None:
        for name, table in split_records(records).items():
            if table.num_rows:
                self.writers[name].write_table(table)
        self.recordings += [
            RecordingEntry(r["recording_id"], r["content_sha256"], r["status"], r["stage"])
            for r in records.select(["recording_id", "content_sha256", "status", "stage"]).to_pylist()
        ]

    def close(self) -> dict[str, FileEntry]:
        """Close the files, fsync them, and describe them for the manifest."""
        entries = {}
        for name, writer in self.writers.items():
            writer.close()
            path = self.dir / f"{name}.parquet"
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            rows = pq.read_metadata(path).num_rows
            entries[name] = FileEntry(path.name, rows, path.stat().st_size, sha256_file(path))
        return entries


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
    """Move the staged run into ``runs/`` (one rename) and commit it by writing its manifest last."""
    src, dst = staging_dir(output, manifest.run_id), run_dir(output, manifest.run_id)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        raise PublishError(f"{dst} exists; runs are never overwritten")
    os.rename(src, dst)
    _fsync_dir(dst.parent)
    tmp = dst / f"{MANIFEST_NAME}.tmp"
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, dst / MANIFEST_NAME)
    _fsync_dir(dst)
    return dst


def committed_manifests(output: Path) -> list[RunManifest]:
    """Manifests of committed runs, oldest first. A run folder without a manifest is not committed."""
    manifests = []
    for path in sorted((output / "runs").glob(f"run_id=*/{MANIFEST_NAME}")):
        try:
            manifests.append(RunManifest.from_json(path.read_text()))
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from e
    return sorted(manifests, key=lambda m: m.run_id)


def read_committed(output: Path, table: str) -> pa.Table:
    """One table over all committed runs. A recording's rows come from the latest run that processed it,
    in every table alike: a recording that failed and then succeeded has results and no errors."""
    manifests = committed_manifests(output)
    latest = {r.recording_id: m.run_id for m in manifests for r in m.recordings}  # oldest first
    parts = []
    for m in manifests:
        part = pq.read_table(run_dir(output, m.run_id) / m.files[table].path, schema=TABLES[table])
        own = pa.array([rid for rid, run in latest.items() if run == m.run_id], pa.string())
        parts.append(part.filter(pc.is_in(part["recording_id"], value_set=own)))
    return pa.concat_tables(parts) if parts else TABLES[table].empty_table()
