"""Fault injection and scale smoke for the archive job (jobs/transcribe_archive.py), with real kill -9.

    python benchmarks/fault_injection.py faults --work /tmp/fi [--short 30] [--long 2] [--seed 0]
        [--cases driver model cpu progress disk crash] [--executor ray|in-process] [--results ...]
    python benchmarks/fault_injection.py scale --work /tmp/scale [--recordings 2000] [--results ...]

Recordings are cut (seeded) from the speech of examples/ and written as wav. Every run is the job as a
subprocess in a session of its own (its local Ray cluster included), so a kill reaches exactly that
run's processes and cleaning up after it is ``kill -9`` of its session.

faults: a clean run first (the reference view and wall time), then per case a fresh output folder:
- driver: kill -9 the driver at a seeded random moment of the run, ``--kills`` times, then a run that
  is left to finish;
- model / cpu / progress: kill -9 the model actor / a CPU-stage worker / the progress tally actor at a
  seeded moment once recordings are being finished; the run must finish by itself;
- disk: the output folder on a tmpfs (a private mount namespace, ``unshare -rm``) about half the size
  the clean output needs: the run must fail (exit 1) naming the folder, then the same folder grown (the
  operator freed space) and the job run again;
- crash (in-process): the longest recording renamed to come last; kill -9 the driver whenever it records
  that recording alone in flight, twice; the third run must set it aside as a ``crash`` error row and
  do the rest.
Each case must end with the committed view equal to the clean run's (same ids, texts, labels, statuses,
one stats row per recording; crash: but for its one error row). Per case: exit statuses, recordings redone (per killed run: those the
model stage had finished, by its last progress line, less those it committed), extra wall time.

scale: one run over many 1-2 s recordings; the driver's peak resident memory (VmHWM) and the time to
the first committed part.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.audio.decode import decode_audio  # noqa: E402
from pipeline.publish import committed_manifests, read_committed  # noqa: E402
from tests.conftest import alone_in_flight, write_wav  # noqa: E402

SAMPLE_RATE = 16000
# Process titles Ray gives the workers (the CPU stage runs as tasks of its own because its CPU share
# differs from the model actor's: workers.ray_run.CPU_STAGE_CPUS).
TARGETS = {"model": "WindowPredictor", "cpu": "MapBatches(cut_windows)", "progress": "ray::Tally"}
JOB_ARGS = ["--num-cpus", "2", "--batch-size", "4", "--progress-every-s", "1"]
_PROGRESS = re.compile(r"progress: (\d+)/(\d+) recordings")
_PLANNED = re.compile(r"plan: (\d+) recordings to process")


def _speech() -> np.ndarray:
    """The examples' speech, end to end, at 16 kHz."""
    names = sorted(p for p in (ROOT / "examples").iterdir() if p.suffix in {".wav", ".flac", ".mp3", ".ogg"})
    return np.concatenate([decode_audio(p, SAMPLE_RATE).samples for p in names])


def make_archive(folder: Path, short: int, long: int, seed: int, short_s: tuple[float, float]) -> int:
    """``short`` recordings of ``short_s`` seconds and ``long`` of 65-80 s cut from the examples'
    speech at seeded offsets; returns how many."""
    rng, speech = random.Random(seed), _speech()
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(short + long):
        seconds = rng.uniform(*short_s) if i < short else rng.uniform(65.0, 80.0)
        n = round(seconds * SAMPLE_RATE)
        start = rng.randrange(len(speech))
        clip = np.resize(np.roll(speech, -start), n)  # wraps around: long ones repeat the examples
        write_wav(folder / f"{'short' if i < short else 'long'}-{i:05d}.wav", clip)
    return short + long


def descendants(pid: int) -> list[int]:
    """Processes started, directly or not, by ``pid`` (a test's own Ray cluster, say)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        found += (kids := children.get(todo.pop(), []))
        todo += kids
    return found


def session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (a run's driver and every Ray process it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


def find(pids: list[int], needle: str) -> list[int]:
    """Those of ``pids`` whose command line (Ray's process title) contains ``needle``."""
    found = []
    for pid in pids:
        try:
            if needle.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class RunRecord:
    exit_status: int
    wall_s: float
    planned: int | None  # recordings the run planned (None: killed before planning)
    committed: int  # recordings the run committed
    model_done: int  # recordings the model stage had finished, per the run's last progress line
    fault: str = ""
    tail: str = ""


def _parse(log: str) -> tuple[int | None, int]:
    planned = _PLANNED.findall(log)
    done = _PROGRESS.findall(log)
    return (int(planned[-1]) if planned else None), (int(done[-1][0]) if done else 0)


def _committed_by(output: Path, known: set[str]) -> int:
    """Recordings committed by runs not in ``known`` (the run just ended); adds them to ``known``."""
    if not (output / "_tables").exists():
        return 0
    new = [m for m in committed_manifests(output) if m.run_id not in known]
    known.update(m.run_id for m in new)
    return sum(len(m.recordings) for m in new)


def job_command(archive: Path, output: Path, extra: list[str], options: list[str] = JOB_ARGS) -> list[str]:
    script = str(ROOT / "jobs" / "transcribe_archive.py")
    return [sys.executable, script, "--input", str(archive), "--output", str(output), *options, *extra]


class Job:
    """One run of the job as a subprocess leading its own session."""

    def __init__(
        self, archive: Path, output: Path, log: Path, extra: list[str], options: list[str] = JOB_ARGS
    ) -> None:
        self.log = log
        self.started = time.monotonic()
        with open(log, "w") as f:
            self.proc = subprocess.Popen(
                job_command(archive, output, extra, options),
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def model_done(self) -> int:
        return _parse(self.text())[1]

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            rc = -999
        kill_session(self.proc.pid)  # whatever of Ray outlived the driver
        self.wall_s = time.monotonic() - self.started
        return rc

    def watch(self, timeout: float) -> tuple[int, float]:
        """Wait for the run to end; its exit status and how long its model stage was finishing
        recordings (from the first to the last; Ray's start and shutdown are not part of it)."""
        first_s = last_s = 0.0
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            planned, done = _parse(self.text())
            now = time.monotonic() - self.started
            first_s = first_s or (now if done >= 1 else 0.0)
            last_s = last_s or (now if planned and done >= planned else 0.0)
            time.sleep(0.2)
        return self.wait(max(1.0, deadline - time.monotonic())), last_s - first_s

    def kill_driver(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def record(self, rc: int, output: Path, known: set[str], fault: str = "") -> RunRecord:
        planned, done = _parse(self.text())
        tail = "\n".join(self.text().splitlines()[-3:])
        return RunRecord(rc, round(self.wall_s, 1), planned, _committed_by(output, known), done, fault, tail)


def view(output: Path) -> dict:
    """The committed view: per recording its status, text and label (or error stage), stats rows."""
    results = {
        r["recording_id"]: (r["status"], r["text"], r["label"])
        for r in read_committed(output, "results").to_pylist()
    }
    errors = {r["recording_id"]: ("error", r["stage"]) for r in read_committed(output, "errors").to_pylist()}
    stats = read_committed(output, "stats")["recording_id"].to_pylist()
    return {"recordings": results | errors, "stats_rows": len(stats), "stats_ids": sorted(set(stats))}


@dataclass
class CaseResult:
    case: str
    runs: list[RunRecord] = field(default_factory=list)
    same_view: bool = False
    note: str = ""

    def redone(self) -> list[int]:
        """Per killed run: recordings its model stage finished that it did not commit."""
        return [max(0, r.model_done - r.committed) for r in self.runs if r.fault]

    def extra_wall_s(self, clean_s: float) -> float:
        return round(sum(r.wall_s for r in self.runs) - clean_s, 1)


def _run_plain(archive: Path, output: Path, log: Path, extra: list[str], timeout: float) -> tuple[Job, int]:
    job = Job(archive, output, log, extra)
    return job, job.wait(timeout)


def _wait_busy(job: Job, deadline: float) -> None:
    """Until the run's model stage has finished a recording (or the run ended)."""
    while job.proc.poll() is None and time.monotonic() < deadline and job.model_done() < 1:
        time.sleep(0.2)


def case_driver(archive: Path, output: Path, logs: Path, extra: list[str], rng: random.Random, kills: int,
                kill_by: float, timeout: float) -> CaseResult:  # fmt: skip
    """Kill -9 the driver ``kills`` times, each once its model stage has finished a seeded number of the
    recordings the run planned, drawn from the first ``kill_by`` of them (so the kill lands mid-run
    whatever the machine's speed), then let a run finish."""
    result, known = CaseResult("driver"), set()
    for i in range(kills):
        job = Job(archive, output, logs / f"driver-{i}.log", extra)
        deadline = time.monotonic() + timeout
        while job.proc.poll() is None and time.monotonic() < deadline and _parse(job.text())[0] is None:
            time.sleep(0.1)
        planned = _parse(job.text())[0] or 0
        if planned < 2:  # nothing left to interrupt
            break
        target = rng.randrange(1, max(2, round(planned * kill_by)))
        while job.proc.poll() is None and time.monotonic() < deadline and job.model_done() < target:
            time.sleep(0.1)
        if job.proc.poll() is not None:  # it finished first: nothing was killed
            result.runs.append(job.record(job.wait(timeout), output, known))
            return result
        job.kill_driver()
        moment = time.monotonic() - job.started
        rc = job.wait(timeout)
        fault = f"driver killed at {moment:.1f} s ({target} of {planned} finished)"
        result.runs.append(job.record(rc, output, known, fault=fault))
    job, rc = _run_plain(archive, output, logs / "driver-final.log", extra, timeout)
    result.runs.append(job.record(rc, output, known))
    return result


def case_worker(name: str, archive: Path, output: Path, logs: Path, extra: list[str], rng: random.Random,
                timeout: float) -> CaseResult:  # fmt: skip
    """Kill -9 one process of the run (model actor, CPU-stage worker, tally actor) after a seeded delay
    from when the model stage has finished a recording (the CPU stage runs ahead of the model: from the
    start); the run must finish by itself."""
    result, known = CaseResult(name), set()
    job = Job(archive, output, logs / f"{name}.log", extra)
    deadline, fault = time.monotonic() + timeout, ""
    if name != "cpu":
        _wait_busy(job, deadline)
    time.sleep(rng.uniform(0.0, 2.0))
    while job.proc.poll() is None and time.monotonic() < deadline and not fault:
        if targets := find(session_pids(job.proc.pid), TARGETS[name]):
            os.kill(targets[0], signal.SIGKILL)
            fault = f"{name} process killed at {time.monotonic() - job.started:.1f} s"
        time.sleep(0.05)
    rc = job.wait(max(1.0, deadline - time.monotonic()))
    record = job.record(rc, output, known, fault=fault)
    record.model_done = record.committed  # the run went on: nothing it finished was lost
    result.runs.append(record)
    result.note = "" if fault else f"no {TARGETS[name]!r} process seen while the run lasted"
    return result


def case_disk(archive: Path, output: Path, logs: Path, extra: list[str], clean_bytes: int,
              timeout: float) -> CaseResult:  # fmt: skip
    """Output on a tmpfs about half the size the job needs: run (fails), grow the tmpfs, run again."""
    result = CaseResult("disk")
    if shutil.which("unshare") is None:
        result.note = "skipped: no unshare"
        return result
    output.mkdir(parents=True)
    copy = output.with_name(output.name + "-copy")
    size_k = max(8, clean_bytes // 2048)
    cmd = " ".join(f"'{c}'" for c in job_command(archive, output, extra))

    def run(i: int) -> str:  # the job, its exit status and wall milliseconds, a copy of the output
        return (
            f"s=$(date +%s%N); {cmd} > {logs / f'disk-{i}.log'} 2>&1; rc=$?; e=$(date +%s%N); "
            f"echo rc{i}=$rc wall{i}=$(( (e - s) / 1000000 )); mkdir -p {copy}-{i}; cp -a {output}/. {copy}-{i}/; "
        )

    script = (
        f"mount -t tmpfs -o size={size_k}k tmpfs {output} || exit 99; "
        f"{run(0)} mount -o remount,size=64m {output} && {run(1)}"
    )
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=2 * timeout
    )
    if done.returncode == 99:
        result.note = f"skipped: cannot mount a tmpfs ({done.stderr.strip()})"
        return result
    values = dict(re.findall(r"(\w+)=([-\d.]+)", done.stdout))
    known: set[str] = set()
    for i in (0, 1):
        log = (logs / f"disk-{i}.log").read_text()
        planned, model_done = _parse(log)
        committed = _committed_by(Path(f"{copy}-{i}"), known)
        rc, wall_s = int(values.get(f"rc{i}", -1)), int(values.get(f"wall{i}", 0)) / 1000
        fault = f"output on a tmpfs of {size_k} KiB" if i == 0 else ""
        tail = "\n".join(log.splitlines()[-2:])
        result.runs.append(RunRecord(rc, round(wall_s, 1), planned, committed, model_done, fault, tail))
    shutil.rmtree(output, ignore_errors=True)
    Path(f"{copy}-1").rename(output)
    return result


def case_crash(archive: Path, output: Path, logs: Path, extra: list[str], timeout: float) -> CaseResult:
    """The recording a run dies on every night (in-process): the archive with its longest recording
    renamed to come last in the plan (so that it is once alone in flight); kill -9 the driver whenever
    it records that recording alone in flight, twice; the third run must set it aside as a ``crash``
    error row and do the rest. ``note``: the original name of the recording."""
    result, known = CaseResult("crash"), set()
    longest = max(archive.iterdir(), key=lambda p: p.stat().st_size)
    copy = output.with_name(output.name + "-archive")
    shutil.copytree(archive, copy)
    victim = (copy / longest.name).rename(copy / f"zz-{longest.name}").name
    for i in range(2):
        since, job = time.time(), Job(copy, output, logs / f"crash-{i}.log", extra)
        if alone_in_flight(job.proc, output, victim, since, timeout) is None:
            result.note = f"{victim} was never alone in flight"
            result.runs.append(job.record(job.wait(timeout), output, known))
            return result
        job.kill_driver()
        moment = time.monotonic() - job.started
        result.runs.append(
            job.record(job.wait(timeout), output, known, fault=f"driver killed at {moment:.1f} s")
        )
    job, rc = _run_plain(copy, output, logs / "crash-final.log", extra, timeout)
    result.runs.append(job.record(rc, output, known))
    result.note = longest.name
    return result


def _crash_view(reference: dict, victim: str) -> dict:
    """The clean run's view with ``victim`` (renamed zz-<victim>) set aside as a crash error row."""
    stats = [r for r in reference["stats_ids"] if r != victim]
    recordings = {k: v for k, v in reference["recordings"].items() if k != victim}
    return {
        "recordings": recordings | {f"zz-{victim}": ("error", "crash")},
        "stats_rows": len(stats),
        "stats_ids": stats,
    }


def disk_bytes(folder: Path) -> int:
    """What ``folder`` takes on a tmpfs: each file once, however many hard links the table generations
    hold to it (links themselves, to files or folders, take no data blocks)."""
    inodes = {(st.st_dev, st.st_ino): st.st_blocks for p in folder.rglob("*") if (st := p.lstat())}
    return sum(inodes.values()) * 512


def faults(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    logs.mkdir(parents=True)
    archive = work / "archive"
    count = make_archive(archive, args.short, args.long, args.seed, (1.0, 3.0))
    extra = ["--commit-every-n", str(args.commit_every_n), "--commit-every-s", str(args.commit_every_s)]
    extra += ["--executor", args.executor]
    if args.executor != "ray" and set(args.cases) & set(TARGETS):
        raise SystemExit(f"cases {', '.join(TARGETS)} kill Ray workers: they need --executor ray")
    if args.executor != "in-process" and "crash" in args.cases:
        raise SystemExit("case crash needs --executor in-process (the driver cuts the windows there)")
    timeout = args.timeout_s
    clean_job = Job(archive, work / "clean", logs / "clean.log", extra)
    rc, busy_s = clean_job.watch(timeout)
    if rc != 0:
        raise SystemExit(f"the clean run failed ({rc}):\n{clean_job.text()[-2000:]}")
    clean_s, reference = clean_job.wall_s, view(work / "clean")
    clean_bytes = disk_bytes(work / "clean")
    rng = random.Random(args.seed)
    cases = []
    for name in args.cases:
        output = work / name
        if name == "driver":
            case = case_driver(archive, output, logs, extra, rng, args.kills, args.kill_by, timeout)
        elif name == "disk":
            case = case_disk(archive, output, logs, extra, clean_bytes, timeout)
        elif name == "crash":
            case = case_crash(archive, output, logs, extra, timeout)
        else:
            case = case_worker(name, archive, output, logs, extra, rng, timeout)
        if case.runs and case.runs[-1].exit_status == 0:
            expected = _crash_view(reference, case.note) if name == "crash" else reference
            case.same_view = view(output) == expected
        cases.append(case)
        print(f"{name}: {[r.exit_status for r in case.runs]}, redone {case.redone()}, "
              f"extra wall {case.extra_wall_s(clean_s)} s, same view {case.same_view} {case.note}", flush=True)  # fmt: skip
    return {
        "recordings": count,
        "short": args.short,
        "long": args.long,
        "seed": args.seed,
        "commit_every_n": args.commit_every_n,
        "clean_wall_s": round(clean_s, 1),
        "clean_busy_s": round(busy_s, 1),
        "clean_output_bytes": clean_bytes,
        "reference_ok": sum(1 for v in reference["recordings"].values() if v[0] != "error"),
        "cases": [asdict(c) | {"redone": c.redone(), "extra_wall_s": c.extra_wall_s(clean_s)} for c in cases],
    }


def _vm_hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    found = re.search(r"VmHWM:\s+(\d+)", status)
    return int(found.group(1)) if found else 0  # an exited (zombie) process has no memory lines


def scale(args: argparse.Namespace) -> dict:
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "logs").mkdir(parents=True)
    count = make_archive(work / "archive", args.recordings, 0, args.seed, (1.0, 2.0))
    output = work / "out"
    extra = ["--commit-every-n", str(args.commit_every_n), "--commit-every-s", str(args.commit_every_s)]
    # The job's defaults (CPU stage fused into the model actors), one model actor per core.
    options = ["--num-cpus", "2", "--model-actors", "2"]
    job = Job(work / "archive", output, work / "logs" / "scale.log", extra, options)
    peak_kib, first_part_s, parts_during = 0, None, 0
    while job.proc.poll() is None:
        peak_kib = max(peak_kib, _vm_hwm_kib(job.proc.pid))
        parts = committed_manifests(output)
        if parts and first_part_s is None:
            first_part_s = time.monotonic() - job.started
        parts_during = len(parts)
        time.sleep(0.5)
    rc = job.wait(1.0)
    manifests = committed_manifests(output) if rc == 0 else []
    return {
        "recordings": count,
        "exit_status": rc,
        "wall_s": round(job.wall_s, 1),
        "driver_peak_rss_mib": round(peak_kib / 1024, 1),
        "first_part_s": round(first_part_s, 1) if first_part_s is not None else None,
        "parts_seen_while_running": parts_during,
        "parts": len(manifests),
        "committed_recordings": sum(len(m.recordings) for m in manifests),
        "commit_every_n": args.commit_every_n,
        "commit_every_s": args.commit_every_s,
        "job_options": options,
        "summary": job.text().strip().splitlines()[-1],
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("faults")
    f.add_argument("--short", type=int, default=30)
    f.add_argument("--long", type=int, default=2)
    f.add_argument(
        "--cases",
        nargs="+",
        default=["driver", "model", "cpu", "progress", "disk"],
        choices=["driver", "model", "cpu", "progress", "disk", "crash"],
    )
    f.add_argument("--kills", type=int, default=3, help="driver kills before the run left to finish")
    f.add_argument("--kill-by", type=float, default=1.0, help="driver kills: after at most this share")
    f.add_argument("--commit-every-n", type=int, default=4)
    f.add_argument("--commit-every-s", type=float, default=300.0)
    f.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    f.add_argument("--executor", default="ray", choices=("ray", "in-process"), help="the job's --executor")
    s = sub.add_parser("scale")
    s.add_argument("--recordings", type=int, default=2000)
    s.add_argument("--commit-every-n", type=int, default=1000)
    s.add_argument("--commit-every-s", type=float, default=60.0)
    for q in (f, s):
        q.add_argument("--work", required=True, help="scratch folder (emptied first)")
        q.add_argument("--seed", type=int, default=0)
        q.add_argument("--results", help="folder to write <command>.json into")
    args = p.parse_args(argv)
    out = faults(args) if args.command == "faults" else scale(args)
    if args.results:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        (Path(args.results) / f"{args.command}.json").write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    print(json.dumps(main(), indent=1))
