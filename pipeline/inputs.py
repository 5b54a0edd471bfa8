"""The inputs of a run: list the recordings, give each a stable id and a content hash, drop those done.

Inputs: a folder searched recursively for audio files (id = path relative to the folder), a JSONL
manifest of ``{"id": ..., "audio": path, ...}`` lines (paths relative to the manifest), or WebDataset tar
shards (a ``.tar`` file or a folder holding only shards; id = the sample key, members ``<key>.<audio ext>``
and optional ``<key>.json``). A recording is done when its latest committed entry (the one
``pipeline.publish.read_committed`` shows) has the run's fingerprint (model, task, request, windowing,
reduction, pipeline version) and the bytes now planned, unless it failed in a way a later run may not
(``RETRIED_STAGES``): the done-set and the committed view agree by construction.

Planning reads every byte only once: a source whose size and modification time equal what a committed
run recorded keeps that run's content hash (``SeenSources``), so a nightly run over a large archive
hashes only new and changed files. (Touching a file rehashes it; rewriting it in place with its old
size and mtime restored would go unnoticed, as with make or rsync.)

One bad item never stops the plan: a manifest line that is no JSON object, a file name that is no
UTF-8, a null or empty id, a cut-short shard, a sample without audio or with two audio members, a
dangling symlink or a symlink loop, an id given by two sources (in the input, or in the input and the
output's committed runs) become recordings carrying ``plan_error``, which the CPU stage reports as their
errors row.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import BinaryIO

from pipeline.errors import Refusal
from schemas.manifest import RecordingEntry, RunManifest

PIPELINE_VERSION = "0.1.0"  # bump whenever the same inputs and settings would give different outputs
# Audio files by name: what the FFmpeg inside PyAV's wheels decodes (containers and codecs of audio).
AUDIO_EXTENSIONS = frozenset(
    {".wav", ".w64", ".flac", ".mp3", ".mp2", ".ogg", ".oga", ".opus", ".spx", ".m4a", ".m4b", ".aac"}
    | {".ac3", ".aif", ".aiff", ".amr", ".caf", ".mka", ".webm", ".wma", ".wv"}
)
_HASH_CHUNK = 1 << 20
# Error stages redone by the next run: transient (I/O, a model batch), set by an option (the duration
# limit), or about the input listing itself (re-reported while the input stays broken). Errors in
# decoding, VAD or windowing the same bytes under the same settings would only fail again.
RETRIED_STAGES = frozenset({"plan", "read", "limit", "model"})


class PlanError(Refusal, ValueError):
    """The input cannot be planned (unknown layout, malformed manifest line, duplicate ids)."""


@dataclass(frozen=True)
class PlannedRecording:
    """One recording to process. ``member_offset``/``member_size`` locate a tar member's bytes in
    ``source_path`` (offset -1: the whole file). ``content_sha256`` is "" when the bytes were unreadable
    at plan time (the CPU stage then reports the read error). ``meta``: extra fields as JSON.
    ``plan_error``: why the item could not be planned ("" when it could). ``source_size`` /
    ``source_mtime_ns``: the source file's stat when it was hashed (-1: not stat'ed)."""

    recording_id: str
    source_path: str
    content_sha256: str
    member_offset: int = -1
    member_size: int = -1
    meta: str = "{}"
    plan_error: str = ""
    source_size: int = -1
    source_mtime_ns: int = -1

    def to_row(self) -> dict:
        return asdict(self)


class _Member(io.RawIOBase):
    """``size`` bytes at ``offset`` of a file (a tar shard's member), read and seeked as a file of its own."""

    def __init__(self, path: str, offset: int, size: int) -> None:
        if os.path.getsize(path) < offset + size:
            raise OSError(f"{path}: shard member at {offset} is cut short")
        self._file, self._offset, self._size, self._pos = open(path, "rb"), offset, size, 0  # noqa: SIM115

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = min(max(0, base + pos), self._size)
        return self._pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        self._file.seek(self._offset + self._pos)
        n = self._file.readinto(memoryview(buffer)[: max(0, self._size - self._pos)])
        self._pos += n
        return n

    def close(self) -> None:
        self._file.close()
        super().close()


def open_source(path: str | os.PathLike, span: tuple[int, int] | None = None) -> BinaryIO:
    """The bytes of a recording as a binary file: the whole file at ``path``, or with ``span`` (offset,
    size) only those bytes of it. Raises OSError (a member cut short included)."""
    return _Member(os.fspath(path), *span) if span else open(path, "rb")


def sha256_file(path: str | Path, span: tuple[int, int] | None = None) -> str:
    """Hex sha256 of a file's bytes (with ``span``, of that member's), read in chunks. Raises OSError."""
    digest = hashlib.sha256()
    with open_source(path, span) as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _hash_or_empty(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return ""  # unreadable now: the CPU stage reports the read error for this recording


class SeenSources:
    """Content hashes that committed runs recorded, by (source path, member offset) with the source's
    stat at the time; ``digest`` returns one while the source's size and mtime are unchanged."""

    def __init__(self, entries: Iterable[RecordingEntry] = ()) -> None:
        self._known = {
            (e.source_path, e.member_offset): e
            for e in entries
            if e.content_sha256 and e.source_mtime_ns >= 0
        }

    def digest(self, source: str, member_offset: int, stat: os.stat_result) -> str | None:
        e = self._known.get((source, member_offset))
        if e is None or (e.source_size, e.source_mtime_ns) != (stat.st_size, stat.st_mtime_ns):
            return None
        return e.content_sha256


def _is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS


def _unplannable(recording_id: str, source: str, why: str) -> PlannedRecording:
    return PlannedRecording(recording_id, source, "", plan_error=why)


def _plan_source(rec_id: str, path: Path, seen: SeenSources, meta: str = "{}") -> PlannedRecording:
    try:
        stat = path.stat()  # before hashing: a change after it shows as a new stat next time
    except OSError:
        return PlannedRecording(rec_id, str(path), "", meta=meta)  # the CPU stage reports the read error
    digest = seen.digest(str(path), -1, stat) or _hash_or_empty(path)
    return PlannedRecording(
        rec_id, str(path), digest, meta=meta, source_size=stat.st_size, source_mtime_ns=stat.st_mtime_ns
    )


def _plan_file(root: Path, path: Path, seen: SeenSources) -> PlannedRecording:
    rec_id = path.relative_to(root).as_posix()
    try:
        rec_id.encode()
    except UnicodeEncodeError:  # undecodable bytes in the name (os.fsdecode's surrogates): no Arrow string
        shown = os.fsencode(rec_id).decode(errors="backslashreplace")
        return _unplannable(shown, str(root / shown), "file name is not UTF-8; rename the file")
    return _plan_source(rec_id, path, seen)


def _broken_link(path: Path) -> str:
    """Why a symlink named like audio leads to no file ("" when it does, or is no link)."""
    if not path.is_symlink():
        return ""
    try:
        path.stat()
    except FileNotFoundError:
        return f"dangling symlink to {os.readlink(path)}"
    except OSError as e:  # ELOOP
        return f"symlink loop ({e.strerror})"
    return ""


@dataclass(frozen=True)
class Listing:
    """An input's recordings, and the files of a folder input left out as not audio (by extension,
    ``(none)`` for a name without one)."""

    recordings: list[PlannedRecording]
    not_audio: dict[str, int]


def _plan_folder(root: Path, seen: SeenSources, not_audio: Counter[str]) -> list[PlannedRecording]:
    out = []
    for p in sorted(root.rglob("*")):
        if not _is_audio(p):
            if p.is_file():
                not_audio[p.suffix.lower() or "(none)"] += 1
            continue
        if why := _broken_link(p):  # is_file() is False for these: they would vanish from the plan
            out.append(_unplannable(p.relative_to(root).as_posix(), str(p), why))
        elif p.is_file():
            out.append(_plan_file(root, p, seen))
    return out


def _plan_manifest(path: Path, seen: SeenSources) -> list[PlannedRecording]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rec_id, audio = entry.pop("id"), Path(entry.pop("audio"))
            if isinstance(rec_id, bool) or not isinstance(rec_id, str | int) or str(rec_id) == "":
                raise TypeError(f"id {rec_id!r} is no non-empty string")
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            why = f"line {number}: need a JSON object with 'id' and 'audio' ({type(e).__name__}: {e})"
            out.append(_unplannable(f"{path.name}:{number}", str(path), why))
            continue
        audio = audio if audio.is_absolute() else path.parent / audio
        out.append(_plan_source(str(rec_id), audio, seen, json.dumps(entry, sort_keys=True)))
    return out


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the member's basename."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _plan_shard(shard: Path, seen: SeenSources) -> list[PlannedRecording]:
    """The shard's samples; what cannot be read (where a cut-short or corrupt shard breaks off, a bad
    ``.json``, a sample without audio) is planned as an error, the rest as usual."""
    audio: dict[str, tuple[int, int, str]] = {}
    two_audio: set[str] = set()  # samples with more than one audio member
    meta: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    bad: list[PlannedRecording] = []
    key = None  # the sample being read when the shard breaks off
    try:
        stat = shard.stat()
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = _split_key(member.name)
                members.setdefault(key, []).append(member.name)
                if ext == "json":
                    try:
                        meta[key] = json.dumps(json.loads(tar.extractfile(member).read()), sort_keys=True)
                    except ValueError as e:
                        why = f"{member.name}: not JSON ({e})"
                        bad.append(_unplannable(key, str(shard), why))
                elif f".{ext}" in AUDIO_EXTENSIONS:
                    if key in audio:
                        two_audio.add(key)
                        key = None
                        continue
                    digest = seen.digest(str(shard), member.offset_data, stat)
                    if digest is None:
                        digest = sha256_hex(tar.extractfile(member).read())
                    audio[key] = (member.offset_data, member.size, digest)
                key = None
    except (tarfile.TarError, OSError) as e:  # keeps the samples read before the damage
        why = f"the shard breaks off here ({type(e).__name__}: {e}); no later sample can be read"
        bad.append(_unplannable(key or str(shard), str(shard), why))
    for sample in sorted(two_audio - {r.recording_id for r in bad}):
        names = [n for n in members[sample] if f".{_split_key(n)[1]}" in AUDIO_EXTENSIONS]
        bad.append(_unplannable(sample, str(shard), f"more than one audio member: {names}"))
    failed = {r.recording_id for r in bad}
    for sample, names in members.items():
        if sample not in audio and sample not in failed:
            why = f"no audio member among {names} (keys contain no dots; audio: {sorted(AUDIO_EXTENSIONS)})"
            bad.append(_unplannable(sample, str(shard), why))
    planned = [
        PlannedRecording(
            sample,
            str(shard),
            digest,
            offset,
            size,
            meta.get(sample, "{}"),
            source_size=stat.st_size,
            source_mtime_ns=stat.st_mtime_ns,
        )
        for sample, (offset, size, digest) in audio.items()
        if sample not in failed
    ]
    return planned + bad


def check_input(path: str | Path) -> None:
    """Raises PlanError when the input does not exist (cheap: runs before a job starts anything)."""
    if not Path(path).exists():
        raise PlanError(f"{path}: no such file or folder")


def _source(r: PlannedRecording) -> str:
    return r.source_path if r.member_offset < 0 else f"{r.source_path} (member at {r.member_offset})"


def _unique_ids(recordings: list[PlannedRecording]) -> list[PlannedRecording]:
    """An id given by several items becomes one plan error naming every source: which of them the
    id means is not ours to guess, and the rest of the input runs."""
    by_id: dict[str, list[PlannedRecording]] = {}
    for r in recordings:
        by_id.setdefault(r.recording_id, []).append(r)
    return [
        group[0]
        if len(group) == 1
        else _unplannable(
            rec_id,
            group[0].source_path,
            f"recording id given by {len(group)} items ({', '.join(_source(r) for r in group)}); "
            "ids must be unique",
        )
        for rec_id, group in by_id.items()
    ]


def list_recordings(input_path: str | Path, seen: SeenSources | None = None) -> list[PlannedRecording]:
    """All recordings of an input, sorted by id, hashed unless ``seen`` knows them unchanged; source
    paths are absolute (they tell sources apart across runs). Raises PlanError on a missing input or an
    unknown layout."""
    return list_input(input_path, seen).recordings


def list_input(input_path: str | Path, seen: SeenSources | None = None) -> Listing:
    """``list_recordings``, and the files of a folder input skipped as not audio."""
    path, seen = Path(os.path.abspath(input_path)), seen or SeenSources()
    not_audio: Counter[str] = Counter()
    check_input(path)
    if path.is_file() and path.suffix == ".jsonl":
        recordings = _plan_manifest(path, seen)
    elif path.is_file() and path.suffix == ".tar":
        recordings = _plan_shard(path, seen)
    elif path.is_dir():
        shards = sorted(path.rglob("*.tar"))
        if shards and any(p.is_file() and _is_audio(p) for p in path.rglob("*")):
            raise PlanError(f"{path}: holds both tar shards and loose audio files; give one kind")
        recordings = (
            [r for shard in shards for r in _plan_shard(shard, seen)]
            if shards
            else _plan_folder(path, seen, not_audio)
        )
    else:
        raise PlanError(f"{path}: not a folder, a .jsonl manifest or a .tar shard")
    return Listing(sorted(_unique_ids(recordings), key=lambda r: r.recording_id), dict(not_audio))


def fingerprint(
    model: str, task: str, request: dict, windowing: dict, reduction: dict, pipeline_version: str
) -> str:
    """A short hash of everything besides the input bytes that decides a recording's output."""
    key = {
        "model": model,
        "task": task,
        "request": request,
        "windowing": windowing,
        "reduction": reduction,
        "version": pipeline_version,
    }
    return sha256_hex(json.dumps(key, sort_keys=True).encode())[:16]


def latest_entries(manifests: Iterable[RunManifest]) -> dict[str, tuple[RunManifest, RecordingEntry]]:
    """Each recording id's latest committed entry and its manifest (``manifests`` oldest first): what
    the committed view shows, and so what the done-set is made of."""
    return {r.recording_id: (m, r) for m in manifests for r in m.recordings}


def _is_plan_error(entry: RecordingEntry) -> bool:
    return entry.status == "error" and entry.stage == "plan"


def pending(
    recordings: Iterable[PlannedRecording],
    manifests: list[RunManifest],
    run_fingerprint: str,
    retry_errors: bool = False,
) -> tuple[list[PlannedRecording], list[PlannedRecording]]:
    """Split into (to do, already done). Done: the id's latest committed entry has ``run_fingerprint``
    and the planned bytes, and is no error of ``RETRIED_STAGES`` (no error at all with
    ``retry_errors``). To do with a plan error instead: new bytes for an id whose committed result came
    from another source (two inputs written into one output would silently replace each other)."""
    latest = latest_entries(manifests)
    owners = {
        r.recording_id: r.source_path
        for m in manifests
        for r in m.recordings
        if r.source_path and not _is_plan_error(r)
    }
    todo, skipped = [], []
    for r in recordings:
        m, entry = latest.get(r.recording_id, (None, None))
        if (
            entry is not None
            and m.fingerprint == run_fingerprint
            and entry.content_sha256 == r.content_sha256
            and (entry.status != "error" or not (retry_errors or entry.stage in RETRIED_STAGES))
        ):
            skipped.append(r)
            continue
        owner = owners.get(r.recording_id, r.source_path)
        if owner != r.source_path and not r.plan_error:
            why = f"recording id already committed from {owner}, now given by {r.source_path}; use another output"
            r = replace(r, plan_error=why)
        todo.append(r)
    return todo, skipped
