"""Stage, validate and atomically publish a run's tables in parts; the output folder's lock; committed
reads.

Layout of an output folder ``DIR`` (what plain Parquet readers see is one folder per table)::

    DIR/results/ DIR/stats/ DIR/errors/     links to the current generation's table folders: every
                                            committed row, each recording once (its latest entry)
    DIR/_tables/current                     link to the current generation, g<N>: the commit point
    DIR/_tables/g<N>/<table>/*.parquet      generation N's files (unchanged files hard-linked across
                                            generations; at most MAX_FILES per table)
    DIR/_parts/<run_id>/<part>.json         each part's manifest (what it committed, its generation)
    DIR/_staging/<run_id>-<part>/           a part in progress (never read)
    DIR/_lock                               held by the one run writing to DIR (stale if its pid died)

A run commits its finished recordings in parts as it goes (``RunWriter``). Committing a part builds
the next generation beside the current one: the part's new files, the files that held rows its
recordings supersede rewritten without them, every other file hard-linked, small files merged so the
count stays bounded; then the part's manifest naming that generation, then one ``rename`` of the
``current`` link. Readers of ``DIR/results`` therefore see either the generation before or after, never
a part in flight, a superseded row or another table's rows; a crash at any step loses at most the part
in flight (``remove_abandoned`` clears what it left). The generation before the current one stays on
disk so that a reader who listed it can still open its files.

Concurrency: a run holds ``_lock`` (created by an atomic hard link, so never half-written) from
planning to its last part, so two runs on one folder never plan the same recordings; the second is
refused with the holder's pid/host. A lock left by a dead process on this host is taken over. Ray's own
``write_parquet`` is not used: it is not atomic and cannot split one stream into three tables.

Folders of the layout before table folders (``DIR/runs/run_id=<id>/part=<n>/``) are read as they are
and upgraded in place by the next run (``upgrade_layout``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import Refusal
from pipeline.inputs import PlannedRecording, latest_entries, sha256_file
from pipeline.stats import peak_rss_bytes
from schemas.manifest import (
    LEGACY_PART,
    MANIFEST_VERSION,
    FileEntry,
    ManifestError,
    RecordingEntry,
    RunManifest,
)
from schemas.tables import TABLES, split_records

LOCK_NAME = "_lock"
MAX_FILES = 8  # per table and generation: readers open few files however many nights accumulate
_BREAKER_STALE_S = 60.0
_GENERATION = re.compile(r"g(\d{6})")


class PublishError(RuntimeError):
    """Staged outputs contradict the plan, or a publish step failed; nothing was committed."""


class OutputWriteError(PublishError):
    """Writing into the output folder failed (full disk, permissions); the part in flight was removed,
    the parts committed before it stay."""


class OutputLockedError(Refusal, RuntimeError):
    """Another live run holds the output folder's lock."""


def new_run_id() -> str:
    """Sortable and unique: UTC time to the second plus 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


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


def staging_dir(output: Path, run_id: str, part: int) -> Path:
    return output / "_staging" / f"{run_id}-{part:05d}"


def manifest_path(output: Path, run_id: str, part: int) -> Path:
    return output / "_parts" / run_id / f"{part:05d}.json"


def _generations(output: Path) -> Path:
    return output / "_tables"


def current_generation(output: Path) -> int:
    """The committed generation's number; 0 before the first commit."""
    try:
        return int(_GENERATION.fullmatch(os.readlink(_generations(output) / "current"))[1])
    except FileNotFoundError:
        return 0


def _generation_dir(output: Path, generation: int) -> Path:
    return _generations(output) / f"g{generation:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_link(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` in one rename (readers see the old or the new target)."""
    tmp = link.with_name(f"{link.name}.tmp-{secrets.token_hex(4)}")
    os.symlink(target, tmp)
    os.replace(tmp, link)
    _fsync(link.parent)


def _table_files(folder: Path) -> list[Path]:
    """A generation's files of one table, in commit order (their names start with the generation
    that first wrote them)."""
    return sorted(folder.glob("*.parquet"))


def _write(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, row_group_size=StagingWriter.ROW_GROUP)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _merge_smallest(files: list[Path], schema: pa.Schema) -> None:
    """Keep at most MAX_FILES (in commit order) by merging the adjacent pair with the fewest bytes
    into the older one's name: parts pile up geometrically, so a commit rewrites small files, rarely
    large ones, and the order of rows stays the order of commits."""
    while len(files) > MAX_FILES:
        sizes = [f.stat().st_size for f in files]
        i = min(range(len(files) - 1), key=lambda k: (sizes[k] + sizes[k + 1], -k))
        older, newer = files[i], files[i + 1]
        table = pa.concat_tables([pq.read_table(older, schema=schema), pq.read_table(newer, schema=schema)])
        older.unlink()  # a hard link to the previous generation's file: never written through
        newer.unlink()
        _write(table, older)
        del files[i + 1]


def _build_generation(output: Path, new: Path, staged: dict[str, Path], prefix: str, ids: set[str]) -> None:
    """Generation ``new``: the current one's files (without rows of ``ids``, which the staged files
    supersede) plus the staged files named ``<prefix>-<table>.parquet``."""
    current = _generation_dir(output, current_generation(output))
    shutil.rmtree(new, ignore_errors=True)  # a build a crash left behind
    for table, schema in TABLES.items():
        (new / table).mkdir(parents=True)
        files = []
        for old in _table_files(current / table):
            superseded = _rows_of(old, ids)
            if superseded is None and pq.read_schema(old).equals(schema):
                os.link(old, new / table / old.name)
                files.append(new / table / old.name)
                continue
            # Rewritten without the superseded rows, and in the table's schema of this release (a
            # column added since reads as null), so that readers of the folder see one schema.
            kept = pq.read_table(old, schema=schema)
            kept = kept if superseded is None else kept.filter(pc.invert(superseded))
            if kept.num_rows:
                _write(kept, new / table / old.name)
                files.append(new / table / old.name)
        if pq.read_metadata(staged[table]).num_rows or not files:  # an empty table keeps its schema
            os.link(staged[table], new / table / f"{prefix}.parquet")
            files.append(new / table / f"{prefix}.parquet")
        _merge_smallest(files, schema)
        _fsync(new / table)
    _fsync(new)


def _rows_of(path: Path, ids: set[str]) -> pa.ChunkedArray | None:
    """Mask of the file's rows whose recording is in ``ids``; None when it has none (read no further)."""
    if not ids:
        return None
    mask = pc.is_in(pq.read_table(path, columns=["recording_id"])["recording_id"], pa.array(sorted(ids)))
    return mask if pc.any(mask).as_py() else None


def _ensure_table_links(output: Path) -> None:
    for table in TABLES:
        if not (output / table).is_symlink():
            _replace_link(output / table, f"_tables/current/{table}")


def _switch(output: Path, generation: int) -> None:
    """Make ``generation`` current (the commit point) and drop the generations before the previous."""
    previous = current_generation(output)
    _replace_link(_generations(output) / "current", _generation_dir(output, generation).name)
    _ensure_table_links(output)
    for folder in _generations(output).glob("g*"):
        if int(folder.name[1:]) < previous:
            shutil.rmtree(folder, ignore_errors=True)


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


def publish(output: Path, manifest: RunManifest) -> RunManifest:
    """Commit the staged part: build the next generation, write the part's manifest naming it, switch
    to it. Returns the manifest as committed."""
    path = manifest_path(output, manifest.run_id, manifest.part)
    if path.exists() and RunManifest.from_json(path.read_text()).generation <= current_generation(output):
        raise PublishError(f"{path} exists; parts are never overwritten")
    staging = staging_dir(output, manifest.run_id, manifest.part)
    generation = current_generation(output) + 1
    ids = {r.recording_id for r in manifest.recordings}
    prefix = f"{generation:06d}-{manifest.run_id}-{manifest.part:05d}"
    staged = {table: staging / f"{table}.parquet" for table in TABLES}
    _build_generation(output, _generation_dir(output, generation), staged, prefix, ids)
    manifest = replace(manifest, generation=generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync(path.parent)
    _switch(output, generation)
    shutil.rmtree(staging)
    return manifest


def _read_manifest(path: Path) -> RunManifest:
    try:
        return RunManifest.from_json(path.read_text())
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from e


def committed_manifests(output: str | Path) -> list[RunManifest]:
    """Manifests of committed parts in commit order (a folder of the runs/ layout: by run, then part)."""
    output = Path(output)
    current = current_generation(output)
    if not current:
        return _legacy_manifests(output)
    manifests = [_read_manifest(p) for p in (output / "_parts").glob("*/*.json")]
    committed = [m for m in manifests if m.generation <= current]
    return sorted(committed, key=lambda m: (m.generation, m.run_id, m.part))


def read_committed(output: str | Path, table: str) -> pa.Table:
    """One table over all committed parts: a recording's row from its latest committed entry
    (``pipeline.inputs.latest_entries``, what the done-set is made of), in every table alike; a
    recording that failed and then succeeded has results and no errors. The rows plain readers of
    ``DIR/<table>`` get, in the same order."""
    output = Path(output)
    if not current_generation(output):
        return _legacy_view(output, table)
    files = _table_files(output / table)
    return pa.concat_tables(pq.read_table(f, schema=TABLES[table]) for f in files)


def remove_abandoned(output: Path) -> list[Path]:
    """Delete what dead runs left uncommitted: staging parts, manifests and generations newer than the
    current one, temporary links, the runs/ layout once upgraded. Call only under the lock."""
    current = current_generation(output)
    abandoned = [p for p in (output / "_staging").glob("*") if p.is_dir()]
    abandoned += [p for p in (output / "_parts").glob("*/*.json*") if _uncommitted(p, current)]
    abandoned += [p for p in _generations(output).glob("g*") if int(p.name[1:]) > current]
    abandoned += list(_generations(output).glob("current.tmp-*"))
    abandoned += [p for p in output.glob("*.tmp-*") if p.is_symlink()]
    if current or not _legacy_manifests(output):  # what an upgrade or an uncommitted old part left
        abandoned += [p for p in (output / "runs", output / "staging") if p.exists()]
    for p in abandoned:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    for run in (output / "_parts").glob("*"):
        if run.is_dir() and not any(run.iterdir()):
            run.rmdir()
    return abandoned


def _uncommitted(path: Path, current: int) -> bool:
    return path.suffix != ".json" or RunManifest.from_json(path.read_text()).generation > current


def upgrade_layout(output: Path) -> bool:
    """Rewrite a folder of the runs/ layout as table folders (one generation holding its committed view,
    its manifests moved to _parts/); True if there was one. Call only under the lock: a crash midway
    leaves the old layout in charge, and the next run upgrades again."""
    if current_generation(output):
        return False
    legacy = _legacy_manifests(output)
    if not legacy:
        return False
    shutil.rmtree(_generations(output), ignore_errors=True)
    shutil.rmtree(output / "_parts", ignore_errors=True)
    staging = output / "_staging" / "upgrade"
    staging.mkdir(parents=True, exist_ok=True)
    staged = {table: staging / f"{table}.parquet" for table in TABLES}
    for table, path in staged.items():
        _write(_legacy_view(output, table), path)
    _build_generation(output, _generation_dir(output, 1), staged, "000001-upgrade", set())
    for m in legacy:
        path = manifest_path(output, m.run_id, m.part)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(replace(m, generation=1, manifest_version=MANIFEST_VERSION).to_json())
    _switch(output, 1)
    for p in (staging, output / "runs", output / "staging"):
        shutil.rmtree(p, ignore_errors=True)
    return True


def _legacy_part_dir(output: Path, run_id: str, part: int) -> Path:
    run = output / "runs" / f"run_id={run_id}"
    return run if part == LEGACY_PART else run / f"part={part:05d}"


def _legacy_manifests(output: Path) -> list[RunManifest]:
    """The runs/ layout's committed manifests, oldest first; version-1 runs (one manifest per run)
    read as one part each."""
    runs = output / "runs"
    paths = [*runs.glob("run_id=*/_manifest.json"), *runs.glob("run_id=*/part=*/_manifest.json")]
    return sorted((_read_manifest(p) for p in paths), key=lambda m: (m.run_id, m.part))


def _legacy_view(output: Path, table: str) -> pa.Table:
    """The runs/ layout's committed view of ``table``: each recording from its latest entry's part."""
    manifests = _legacy_manifests(output)
    owner = {rid: (m.run_id, m.part) for rid, (m, _) in latest_entries(manifests).items()}
    parts = [TABLES[table].empty_table()]
    for m in manifests:
        path = _legacy_part_dir(output, m.run_id, m.part) / m.files[table].path
        own = pa.array([rid for rid, key in owner.items() if key == (m.run_id, m.part)], pa.string())
        part = pq.read_table(path, schema=TABLES[table])
        parts.append(part.filter(pc.is_in(part["recording_id"], value_set=own)))
    return pa.concat_tables(parts)


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
        self.stage_peaks: dict[str, int] = {}  # Ray runs: each stage's peak resident memory so far

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
                # the writing process's peak so far: an in-process run's whole job, a Ray run's driver
                extra=self.template.extra
                | {"peak_rss_bytes": peak_rss_bytes()}
                | ({"stage_peak_rss_bytes": dict(self.stage_peaks)} if self.stage_peaks else {}),
            )
            manifest = publish(self.output, manifest)
        self._writer = None
        self.committed.append(manifest)
        self.done.update(r.recording_id for r in staged)
        return manifest

    def missing(self) -> list[PlannedRecording]:
        """Planned recordings neither committed nor staged yet."""
        staged = {r.recording_id for r in self._writer.recordings} if self._writer else set()
        return [p for rid, p in self.planned.items() if rid not in self.done and rid not in staged]

    def finish(self) -> Counts:
        """Commit the rest; the run's counts over all its parts. Raises PublishError when a planned
        recording never arrived (the parts committed stay; the next run does the rest)."""
        self.commit()
        missing = sorted(r.recording_id for r in self.missing())
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
        """Remove the part in flight: its staged files, and its manifest and generation if the switch to
        that generation never happened."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        remove_abandoned(self.output)

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


class InFlight:
    """The recordings a run has started and not finished, in ``DIR/_inflight/<run_id>.json``, rewritten
    (whole, by rename) as the set changes: a run killed outright (kill -9, the kernel's memory killer,
    a native crash in a decoder) leaves the file naming them, and the next runs set aside a recording
    that was in flight when two runs died (``crashed``). Written without fsync: those deaths keep the
    page cache; a machine that loses power loses the file, and with it one count of a crash. A run that
    ends by itself, well or with an error raised, removes its file. Thread-safe: the window cutter
    starts recordings on its own thread."""

    def __init__(self, output: Path, run_id: str) -> None:
        self.path = output / "_inflight" / f"{run_id}.json"
        self.run_id = run_id
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "recordings": sorted(self._ids)}))
        os.replace(tmp, self.path)

    def start(self, recording_id: str) -> None:
        with self._lock:
            self._ids.add(recording_id)
            self._write()

    def finish(self, recording_ids: Iterable[str]) -> None:
        with self._lock:
            before = len(self._ids)
            self._ids.difference_update(recording_ids)
            if len(self._ids) != before:
                self._write()

    def __enter__(self) -> InFlight:
        self._write()
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def crashed(output: Path, manifests: list[RunManifest], runs: int = 2) -> dict[str, list[str]]:
    """Recordings in flight when ``runs`` or more runs died since their latest committed entry: id ->
    those runs' ids (oldest first). Files of dead runs whose recordings all have a later committed
    entry are deleted. Call only under the lock (every in-flight file left then is a dead run's)."""
    latest = {rid: m.run_id for rid, (m, _) in latest_entries(manifests).items()}
    deaths: dict[str, list[str]] = {}
    for path in sorted((output / "_inflight").glob("*.json")):
        dead = json.loads(path.read_text())
        pending = [rid for rid in dead["recordings"] if latest.get(rid, "") < dead["run_id"]]
        if not pending:
            path.unlink()
        for rid in pending:
            deaths.setdefault(rid, []).append(dead["run_id"])
    return {rid: ids for rid, ids in deaths.items() if len(ids) >= runs}
