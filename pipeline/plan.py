"""Plan a run: list the input recordings, give each a stable id and a content hash, drop those done.

Inputs: a folder searched recursively for audio files (id = path relative to the folder), a JSONL
manifest of ``{"id": ..., "audio": path, ...}`` lines (paths relative to the manifest), or WebDataset tar
shards (a ``.tar`` file or a folder holding only shards; id = the sample key, members ``<key>.<audio ext>``
and optional ``<key>.json``). A recording is done when a committed run with the same fingerprint (model,
task, reduction, pipeline version) holds its (recording id, content sha256).
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.manifest import RunManifest

PIPELINE_VERSION = "0.1.0"  # bump whenever the same inputs and settings would give different outputs
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"})
_HASH_CHUNK = 1 << 20


class PlanError(ValueError):
    """The input cannot be planned (unknown layout, malformed manifest line, duplicate ids)."""


@dataclass(frozen=True)
class PlannedRecording:
    """One recording to process. ``member_offset``/``member_size`` locate a tar member's bytes in
    ``source_path`` (offset -1: the whole file). ``content_sha256`` is "" when the bytes were unreadable
    at plan time (the CPU stage then reports the read error). ``meta``: extra fields as JSON."""

    recording_id: str
    source_path: str
    content_sha256: str
    member_offset: int = -1
    member_size: int = -1
    meta: str = "{}"

    def to_row(self) -> dict:
        return asdict(self)


def read_bytes(source_path: str, member_offset: int = -1, member_size: int = -1) -> bytes:
    """The recording's bytes: the whole file, or ``member_size`` bytes at ``member_offset`` of a shard."""
    with open(source_path, "rb") as f:
        if member_offset < 0:
            return f.read()
        f.seek(member_offset)
        data = f.read(member_size)
    if len(data) != member_size:
        raise OSError(f"{source_path}: shard member at {member_offset} is cut short")
    return data


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks. Raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_or_empty(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError:
        return ""  # unreadable now: the CPU stage reports the read error for this recording


def _is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS


def _plan_folder(root: Path) -> list[PlannedRecording]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_audio(p))
    return [PlannedRecording(p.relative_to(root).as_posix(), str(p), _hash_or_empty(p)) for p in files]


def _plan_manifest(path: Path) -> list[PlannedRecording]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            rec_id, audio = str(entry.pop("id")), Path(entry.pop("audio"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"{path}:{number}: need a JSON object with 'id' and 'audio' ({e})") from e
        audio = audio if audio.is_absolute() else path.parent / audio
        out.append(
            PlannedRecording(
                rec_id, str(audio), _hash_or_empty(audio), meta=json.dumps(entry, sort_keys=True)
            )
        )
    return out


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is everything before the first dot of the member's basename."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _plan_shard(shard: Path) -> list[PlannedRecording]:
    audio: dict[str, tuple[int, int, str]] = {}
    meta: dict[str, str] = {}
    with tarfile.open(shard, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_key(member.name)
            data = tar.extractfile(member).read()
            if ext == "json":
                meta[key] = json.dumps(json.loads(data), sort_keys=True)
            elif f".{ext}" in AUDIO_EXTENSIONS:
                if key in audio:
                    raise PlanError(f"{shard}: sample {key!r} has more than one audio member")
                audio[key] = (member.offset_data, member.size, sha256_hex(data))
    return [
        PlannedRecording(key, str(shard), digest, offset, size, meta.get(key, "{}"))
        for key, (offset, size, digest) in audio.items()
    ]


def list_recordings(input_path: str | Path) -> list[PlannedRecording]:
    """All recordings of an input, sorted by id. Raises PlanError on an unknown layout or duplicate ids."""
    path = Path(input_path)
    if path.is_file() and path.suffix == ".jsonl":
        recordings = _plan_manifest(path)
    elif path.is_file() and path.suffix == ".tar":
        recordings = _plan_shard(path)
    elif path.is_dir():
        shards = sorted(path.rglob("*.tar"))
        loose = _plan_folder(path)
        if shards and loose:
            raise PlanError(f"{path}: holds both tar shards and loose audio files; give one kind")
        recordings = [r for shard in shards for r in _plan_shard(shard)] if shards else loose
    else:
        raise PlanError(f"{path}: not a folder, a .jsonl manifest or a .tar shard")
    duplicates = sorted(i for i, n in Counter(r.recording_id for r in recordings).items() if n > 1)
    if duplicates:
        raise PlanError(f"{path}: duplicate recording ids {duplicates[:5]}")
    return sorted(recordings, key=lambda r: r.recording_id)


def fingerprint(model: str, task: str, request: dict, reduction: dict, pipeline_version: str) -> str:
    """A short hash of everything besides the input bytes that decides a recording's output."""
    key = {
        "model": model,
        "task": task,
        "request": request,
        "reduction": reduction,
        "version": pipeline_version,
    }
    return sha256_hex(json.dumps(key, sort_keys=True).encode())[:16]


def pending(
    recordings: Iterable[PlannedRecording], done: set[tuple[str, str]]
) -> tuple[list[PlannedRecording], list[PlannedRecording]]:
    """Split into (to do, already done) by (recording id, content sha256)."""
    todo, skipped = [], []
    for r in recordings:
        (skipped if (r.recording_id, r.content_sha256) in done else todo).append(r)
    return todo, skipped


def done_keys(manifests: Iterable[RunManifest], run_fingerprint: str) -> set[tuple[str, str]]:
    """(recording id, content sha256) of every recording committed under ``run_fingerprint``."""
    return {
        (r.recording_id, r.content_sha256)
        for m in manifests
        if m.fingerprint == run_fingerprint
        for r in m.recordings
    }
