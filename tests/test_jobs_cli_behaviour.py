"""Every job speaks like the archive job (jobs/common.py): help that lists defaults and keeps the
examples' line breaks, bad arguments refused in one line with exit 2 before any model loads, relative
outputs refused inside a ``ray job submit`` working directory, notices for an empty input and for
files that are not audio, and Ctrl-C ending a run with exit 130 and a rerun that resumes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from jobs import (
    bench,
    evaluate,
    evaluate_longform,
    export_subtitles,
    generate,
    select_layer,
    transcribe_archive,
)
from jobs.common import JobParser, ray_working_dir
from tests.conftest import ROOT, killed_and_resumed, start_job, tone_bursts, write_wav

JOBS = {
    job.__name__.rpartition(".")[2]: job
    for job in (
        transcribe_archive,
        generate,
        evaluate,
        evaluate_longform,
        select_layer,
        bench,
        export_subtitles,
    )
}
MANIFEST = str(ROOT / "examples" / "manifest.jsonl")


def _status(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """The job's exit status, whether it returns it or argparse exits."""
    try:
        return main(argv)
    except SystemExit as exited:
        return exited.code


def _parser(main: Callable[[list[str]], int], argv: list[str], monkeypatch: pytest.MonkeyPatch) -> JobParser:
    """The job's parser, caught as it parses (nothing after parsing runs)."""
    caught: list[JobParser] = []

    def parse(self: JobParser, args: list[str] | None = None) -> None:
        caught.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(JobParser, "parse_args", parse)
    assert _status(main, argv) == 0
    return caught[0]


@pytest.mark.parametrize("name", sorted(JOBS))
def test_help_explains_every_option_with_its_default_and_keeps_the_examples(
    name: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _status(JOBS[name].main, ["--help"]) == 0
    text = capsys.readouterr().out
    assert f"python jobs/{name}.py" in text  # the docstring's example, as written
    if name != "transcribe_archive":  # an example continued on the next line stays two lines
        assert any(line.endswith(" \\") for line in text.splitlines())
    assert "(default: " in text and ("--output" in text or name == "generate")  # generate only prints
    parser = _parser(JOBS[name].main, [], monkeypatch)
    unexplained = [a.option_strings for a in parser._actions if a.option_strings and not a.help]
    assert not unexplained


def test_help_shows_the_defaults_the_issue_named(capsys: pytest.CaptureFixture) -> None:
    _status(transcribe_archive.main, ["--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even inside a model name
    for shown in ("whisper-tiny.en", "3.0", "300.0", "1000", "auto"):
        assert f"(default:{shown})" in text
    assert "(default:nolimit;" in text  # --max-duration-s: none unless asked for
    _status(generate.main, ["--help"])
    assert "seedoftherandommethods(default:0)" in "".join(capsys.readouterr().out.split())  # 0 is shown
    assert "(default:None)" not in text  # an option without a default says what its absence means


def _one_line_refusal(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert err.startswith("refused: ") and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    ("name", "argv", "message"),
    [
        ("transcribe_archive", ["--input", "missing", "--output", "o"], "missing: no such file or folder"),
        (
            "transcribe_archive",
            ["--input", MANIFEST, "--output", "o", "--model", "whisper-tny"],
            "unknown model",
        ),
        ("transcribe_archive", ["--input", MANIFEST], "required: --output"),
        ("generate", [MANIFEST], "required: --model"),
        ("generate", [MANIFEST, "--model", "whisper-tiny.en"], "not a decoder-only SpeechLM"),
        ("generate", ["missing.wav", "--model", "tiny-random-qwen2-audio"], "no such file"),
        ("generate", ["examples/lecture.m4a", "--model", "tiny-random-qwen2-audio"], "exceeds the limit 30"),
        ("evaluate", ["--manifest", "missing.jsonl", "--out", "o"], "missing.jsonl: no such file"),
        ("evaluate", ["--manifest", MANIFEST, "--output", "o", "--model", "whisper-tny"], "unknown model"),
        ("evaluate", ["--manifest", MANIFEST, "--output", "o", "--methods", "FastV2"], "unknown methods"),
        ("evaluate_longform", ["--input", str(ROOT / "examples"), "--output", "o"], "no audio file with a"),
        (
            "select_layer",
            ["--manifest", MANIFEST, "--task", "asr", "--out", "o", "--model", "x/y/z"],
            "unknown model",
        ),
        ("bench", ["--shape", "huge", "--output", "o"], "invalid choice: 'huge'"),
        ("export_subtitles", ["--output", "examples"], "holds no run's output"),
    ],
)
def test_bad_arguments_are_refused_in_one_line_before_any_model_loads(
    name: str, argv: list[str], message: str, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(JOBS[name], "load_model", None, raising=False)  # a refusal that loads fails here
    assert _status(JOBS[name].main, argv) == 2
    assert message in _one_line_refusal(capsys)
    assert not Path("o").exists()


def test_a_ray_job_working_directory_is_recognised() -> None:
    job_dir = "/tmp/ray/session_2026-12-06_10-00-00_1_1/runtime_resources/working_dir_files/_ray_pkg_ab12"
    assert ray_working_dir(job_dir) and ray_working_dir(job_dir + "/jobs")
    assert not ray_working_dir("/home/me/fastadasp") and not ray_working_dir("/tmp/ray/session_latest")


@pytest.mark.parametrize(
    "name", ["transcribe_archive", "evaluate", "evaluate_longform", "select_layer", "bench"]
)
def test_a_relative_output_in_a_ray_job_working_directory_is_refused(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_dir = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_ab12"
    job_dir.mkdir(parents=True)
    (job_dir / "in").mkdir()
    monkeypatch.chdir(job_dir)
    inputs = {"evaluate": ["--manifest", MANIFEST], "select_layer": ["--manifest", MANIFEST, "--task", "lid"]}
    argv = [*inputs.get(name, [] if name == "bench" else ["--input", "in"]), "--output", "out"]
    assert _status(JOBS[name].main, argv) == 2
    assert "Ray's temporary copy of the working directory" in _one_line_refusal(capsys)
    assert not (job_dir / "out").exists()


def test_an_empty_input_is_a_notice_and_files_not_audio_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "in").mkdir()
    for name in ("a.txt", "b.txt", "c.pdf"):
        (tmp_path / "in" / name).write_text("no audio")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        assert transcribe_archive.main(["--input", str(tmp_path / "in"), "--output", str(out)]) == 0
    assert f"notice: no recordings in {tmp_path / 'in'}" in caplog.text
    assert "skipped 3 files not audio (.txt 2, .pdf 1)" in caplog.text  # the plan line
    line = capsys.readouterr().out.strip()
    assert "ok 0, empty 0, failed 0" in line and "skipped 3 files not audio (.txt 2, .pdf 1)" in line
    assert line.endswith(f"output {out.resolve()}")


@pytest.mark.slow
def test_ctrl_c_ends_a_run_with_130_and_what_it_committed_and_a_rerun_resumes(tmp_path: Path) -> None:
    """SIGINT, as Ctrl-C sends, to the in-process run once its first part is committed."""
    archive = tmp_path / "archive"
    for i in range(6):  # enough that the signal lands mid-run
        write_wav(archive / f"r{i}.wav", tone_bursts(3.0))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the in-process executor
    launcher = [sys.executable, "jobs/transcribe_archive.py"]
    kept, out = killed_and_resumed(
        lambda *extra: start_job(launcher, archive, tmp_path / "out", env, *extra), sig=signal.SIGINT
    )
    assert 0 < kept < 6 and "ok " in out.splitlines()[-1]


def test_subprocess_refusal_prints_no_traceback(tmp_path: Path) -> None:
    """As a shell runs it: one line on stderr, exit 2."""
    run = subprocess.run(
        [sys.executable, "jobs/generate.py", str(tmp_path / "x.wav")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and run.stderr.startswith("refused: ") and len(run.stderr.splitlines()) == 1
