"""Peak resident memory and wall time of the archive job on one long recording, by length (issue 27).

Each length gets a FLAC file at 16 kHz of digital silence with the examples' intro (10.2 s of real
speech) every ``--speech-every-s`` seconds, written block by block in seconds (a day-long room
recording, mostly silence: the model sees only the islands). Each run is `jobs/transcribe_archive.py`
in a subprocess with the default settings (the recorded results passed ``--job-args --max-duration-s
1e9`` while the job's flag still defaulted to 4 h; it now has no limit). Peak memory (``peak_rss_bytes``): in-process, the kernel's peak resident
memory of the job (``wait4``'s ru_maxrss); on Ray, the largest sum of proportional set sizes over the
job's session, sampled every 0.2 s (Ray's workers are the raylet's children, in the job's session).
The first committed part is the first part manifest under the output's ``_parts/``.

    python benchmarks/long_recordings.py --hours 1 4 10 24 --work /tmp/long \
        --out benchmarks/long-recordings/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout

from pipeline.audio.decode import decode_audio  # noqa: E402
from tests.audio_files import encode_audio, speech_in_silence  # noqa: E402


def make_recording(folder: Path, hours: float, every_s: float) -> Path:
    """``folder``/room.flac, ``hours`` long, speech every ``every_s`` seconds (reused when there)."""
    path = folder / "room.flac"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        speech = decode_audio(ROOT / "examples" / "intro.wav").samples
        encode_audio(
            path.with_suffix(".part.flac"),
            speech_in_silence(speech, hours * 3600, every_s, 16000),
            16000,
        )
        path.with_suffix(".part.flac").rename(path)
    return path


def _tree_pss(session: int) -> int:
    """Bytes of memory the processes of a session use: the sum of their proportional set sizes, which
    counts a shared page (Ray's object store, mapped by every worker) once in all, not once in each."""
    total = 0
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or os.getsid(int(entry.name)) != session:
                continue
            for line in (entry / "smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ProcessLookupError):
            continue
    return total


def run_job(recording: Path, out: Path, executor: str, extra: list[str], checkout: Path = ROOT) -> dict:
    """One job over the recording's folder: wall s, peak RSS (bytes), s to the first committed part."""
    cmd = [
        sys.executable,
        "jobs/transcribe_archive.py",
        "--input",
        str(recording.parent),
        "--output",
        str(out),
    ]
    cmd += ["--executor", executor, *extra]
    started = time.monotonic()
    job = subprocess.Popen(
        cmd, cwd=checkout, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    first_commit: list[float] = []
    tree_peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            tree_peak[0] = max(tree_peak[0], _tree_pss(job.pid))
            if not first_commit and next(out.glob("_parts/*/*.json"), None) is not None:
                first_commit.append(time.monotonic() - started)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    log = job.stdout.read()
    _, status, usage = os.wait4(job.pid, 0)
    wall = time.monotonic() - started
    done.set()
    watcher.join()
    job.returncode = os.waitstatus_to_exitcode(status)
    if job.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {job.returncode}:\n{log[-4000:]}")
    if not first_commit and next(out.glob("_parts/*/*.json"), None) is not None:
        first_commit.append(wall)
    return {
        "wall_s": round(wall, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024 if executor == "in-process" else tree_peak[0],
        "first_commit_s": round(first_commit[0], 1) if first_commit else None,
        "summary": [line for line in log.splitlines() if "recordings" in line][-1:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hours", type=float, nargs="+", default=[1, 4, 10, 24])
    parser.add_argument("--work", type=Path, required=True, help="folder for the recordings and the outputs")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    parser.add_argument(
        "--speech-every-s", type=float, default=120.0, help="one speech island per this many seconds"
    )
    parser.add_argument("--executor", default="in-process", choices=["in-process", "ray"])
    parser.add_argument(
        "--checkout",
        type=Path,
        default=ROOT,
        help="the checkout whose job runs: an earlier version (git archive) for a baseline",
    )
    parser.add_argument("--job-args", nargs=argparse.REMAINDER, default=[], help="more flags for the job")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.exists() else []
    for hours in args.hours:
        name = f"{hours:g}h-every-{args.speech_every_s:g}s"
        recording = make_recording(args.work / name, hours, args.speech_every_s)
        out = args.work / f"out-{name}-{args.executor}-{int(time.time())}"
        result = {"hours": hours, "speech_every_s": args.speech_every_s, "executor": args.executor}
        result |= {"file_bytes": recording.stat().st_size}
        result |= {"checkout": str(args.checkout)}
        result |= run_job(recording, out, args.executor, args.job_args, args.checkout)
        result |= {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
        print(json.dumps(result), flush=True)
        results.append(result)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
