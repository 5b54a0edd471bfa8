"""What every job's command line shares, so that they all behave like the archive job: help that shows
each option's default and keeps the docstring's examples as written, bad arguments refused in one line
(exit 2), Ctrl-C answered with a short message (exit 130), and output paths that survive
``ray job submit``.

A job defines ``_run(argv)`` and exposes ``main(argv) = run_job(_run, argv, interrupted=...)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from pipeline.errors import Refusal
from pipeline.publish import PublishError

log = logging.getLogger(__name__)

# What a job refuses before (or instead of) doing work: one line on stderr, exit 2.
EXIT_REFUSED, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130  # 130 = 128 + SIGINT, as shells report Ctrl-C
# Where `ray job submit --working-dir` unpacks its upload: a temporary copy deleted with the cluster.
RAY_WORKING_DIR = "runtime_resources/working_dir_files"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description (the job's docstring) keeps its line breaks; every option with a default says it.
    Options without one (None) or flags (False) say nothing: their help tells what absence means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        unshown = any(default is v for v in (None, False, argparse.SUPPRESS))  # `is`: 0 == False
        if not action.option_strings or unshown or "%(default)" in text:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class JobParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``refused: ...``, and exit 2 (argparse prints the
    usage first; a refusal should fit in a log line)."""

    def __init__(self, doc: str) -> None:
        super().__init__(description=doc, formatter_class=HelpFormatter)

    def error(self, message: str) -> NoReturn:
        print(f"refused: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_REFUSED)


def ray_working_dir(cwd: str) -> bool:
    """Whether ``cwd`` is the temporary copy of a working directory that ``ray job submit`` uploaded."""
    return RAY_WORKING_DIR in Path(cwd).as_posix()


def output_folder(value: str) -> Path:
    """argparse type of an output folder: a relative path inside a Ray job's working directory is
    refused, since it would land in Ray's temporary copy and vanish with the cluster."""
    if not os.path.isabs(value) and ray_working_dir(os.getcwd()):
        raise argparse.ArgumentTypeError(
            f"{value!r} is relative and this job runs in Ray's temporary copy of the working directory "
            f"({os.getcwd()}), deleted when the cluster stops; give an absolute path on a shared file system"
        )
    return Path(value)


def input_path(value: str) -> Path:
    """argparse type of an input: one that does not exist is refused; a relative one inside a Ray job's
    working directory is read from the uploaded copy (as the quick start's ``examples``), which is said."""
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"{value}: no such file or folder")
    if not os.path.isabs(value) and ray_working_dir(os.getcwd()):
        log.warning(
            "%s is read from Ray's uploaded copy of the working directory (%s); an archive belongs on a "
            "shared file system, given by its absolute path",
            value,
            os.path.abspath(value),
        )
    return Path(value)


def add_manifest(parser: argparse.ArgumentParser) -> None:
    """The evaluation jobs' ``--manifest``: utterances with their references (clips of any length)."""
    parser.add_argument(
        "--manifest",
        type=input_path,
        required=True,
        help="JSONL: id, audio (path relative to the manifest) and the task's reference field",
    )


def run_job(
    run: Callable[[list[str] | None], int | None], argv: list[str] | None = None, interrupted: str = ""
) -> int:
    """Run a job's ``run(argv)`` the way every job ends: its exit status (None: 0); a refusal as one
    line ``refused: ...`` and 2; a failed write as ``failed: ...`` and 1 (what was committed stays);
    Ctrl-C as ``interrupted: <what was kept and how to resume>`` and 130. A KeyboardInterrupt raised with
    a message (``workers.archive_job.RunInterrupted``) says it instead of ``interrupted``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(argv) or 0
    except Refusal as err:
        print(f"refused: {err}", file=sys.stderr, flush=True)
        return EXIT_REFUSED
    except PublishError as err:  # a full disk, say: the message names the folder and the cause
        print(f"failed: {err}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except KeyboardInterrupt as err:
        print(f"interrupted: {str(err) or interrupted}", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
