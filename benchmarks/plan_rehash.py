"""What reusing committed content hashes saves a nightly run's planning (pipeline.inputs.SeenSources).

    python benchmarks/plan_rehash.py --files 40 --mb 50

Writes ``--files`` random files of ``--mb`` MB into a temporary folder, then plans it as the first
run does (every byte hashed) and as the next night does (hashes reused for files whose size and mtime
are unchanged, new ones hashed), alternating, best of ``--rounds``; checks both plans agree. The
page cache holds the files, so the first number is a lower bound: on a network or spinning disk, the
hashing plan also waits for every byte to arrive.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pipeline.inputs import SeenSources, list_recordings
from schemas.manifest import RecordingEntry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--mb", type=float, default=50.0)
    parser.add_argument("--new", type=int, default=2, help="files added since the last run")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.files):
            (root / f"rec{i:04d}.wav").write_bytes(os.urandom(int(args.mb * 2**20)))
        seen = SeenSources(
            RecordingEntry(
                r.recording_id, r.content_sha256, "ok", None, r.source_path, r.member_offset,
                r.source_size, r.source_mtime_ns,
            )
            for r in list_recordings(root)[args.new :]  # the first --new files count as new tonight
        )  # fmt: skip
        best = {"hash all": float("inf"), "reuse hashes": float("inf")}
        plans = {}
        for _ in range(args.rounds):
            for name, known in (("hash all", None), ("reuse hashes", seen)):
                start = time.perf_counter()
                plans[name] = list_recordings(root, known)
                best[name] = min(best[name], time.perf_counter() - start)
    assert plans["hash all"] == plans["reuse hashes"], "the plans differ"
    result = {
        "files": args.files,
        "gb": args.files * args.mb / 1024,
        **{f"{k} s": round(v, 3) for k, v in best.items()},
        "speedup": round(best["hash all"] / best["reuse hashes"], 1),
    }
    print(result)
    return result


if __name__ == "__main__":
    main()
