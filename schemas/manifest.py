"""The run manifest: what a committed part of a run holds (pipeline/publish.py writes it as
``_parts/<run_id>/<part>.json``; the part is committed once the table generation it names is current).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from pipeline.errors import Refusal

# 3: a part is committed by the table generation it names; 2: a part committed by its manifest in
# runs/run_id=<id>/part=<n>/ (the layout before table folders; upgraded by pipeline/publish.py)
MANIFEST_VERSION = 3
READ_VERSIONS = (1, 2, 3)
# A manifest of version 1 (runs/run_id=<id>/_manifest.json, the whole run committed at its end) is read
# as this one part, so output folders written before parts keep their committed work.
LEGACY_VERSION, LEGACY_PART = 1, -1


class ManifestError(Refusal, ValueError):
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
    counts (planned/ok/empty/error), files and recordings: this part's; generation: the table generation
    that committed it (0 in a folder of the runs/ layout, not yet upgraded)."""

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
    generation: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunManifest:
        raw = json.loads(text)
        if raw.get("manifest_version") == LEGACY_VERSION:
            raw["part"] = LEGACY_PART
        elif raw.get("manifest_version") not in READ_VERSIONS:
            raise ManifestError(
                f"manifest_version {raw.get('manifest_version')!r} is none of {READ_VERSIONS}"
            )
        try:
            raw["files"] = {k: FileEntry(**v) for k, v in raw["files"].items()}
            raw["recordings"] = [RecordingEntry(**r) for r in raw["recordings"]]
            return cls(**raw)
        except (KeyError, TypeError) as e:
            raise ManifestError(f"malformed manifest: {e}") from e
