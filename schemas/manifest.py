"""The run manifest: what a committed run holds. Readers trust a run only through its manifest.

Written as ``runs/run_id=<id>/part=<n>/_manifest.json`` after every data file of the part is in place:
a run commits its finished recordings in parts, each with its own manifest.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

MANIFEST_VERSION = 2  # 2: a run commits in parts, one manifest each
# A manifest of version 1 (runs/run_id=<id>/_manifest.json, the whole run committed at its end) is read
# as this one part, so output folders written before parts keep their committed work.
LEGACY_VERSION, LEGACY_PART = 1, -1


class ManifestError(ValueError):
    """A manifest is malformed or contradicts the files it lists."""


@dataclass(frozen=True)
class FileEntry:
    """One data file of a run, relative to the run folder."""

    path: str
    rows: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class RecordingEntry:
    recording_id: str
    content_sha256: str
    status: str  # ok | empty | error
    stage: str | None = None  # where an error happened (pipeline.inputs.RETRIED_STAGES are redone)
    # Where the bytes came from and the source's stat when hashed (pipeline.inputs.SeenSources reuses the
    # hash while it holds); -1: unknown.
    source_path: str = ""
    member_offset: int = -1
    source_size: int = -1
    source_mtime_ns: int = -1


@dataclass(frozen=True)
class RunManifest:
    """run_id and part: which part of which run; fingerprint: hash of what makes outputs comparable
    (model, task, reduction, version); config: the JobConfig as a dict; versions: library versions;
    counts (planned/ok/empty/error), files and recordings: this part's."""

    run_id: str
    fingerprint: str
    pipeline_version: str
    presets_version: str
    created_at: str
    config: dict
    reduction: dict
    versions: dict
    files: dict[str, FileEntry]
    counts: dict[str, int]
    recordings: list[RecordingEntry]
    part: int = 0
    manifest_version: int = MANIFEST_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        raw = json.loads(text)
        if raw.get("manifest_version") == LEGACY_VERSION:
            raw["part"] = LEGACY_PART
        elif raw.get("manifest_version") != MANIFEST_VERSION:
            raise ManifestError(f"manifest_version {raw.get('manifest_version')!r} != {MANIFEST_VERSION}")
        try:
            raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
            raw["recordings"] = [RecordingEntry(**r) for r in raw["recordings"]]
            return cls(**raw)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e
