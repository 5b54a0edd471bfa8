"""Synthesise the example recordings with espeak-ng and write examples/manifest.jsonl.

Needs the espeak-ng program (Debian: ``apt-get install espeak-ng``); the generated files are committed,
so the quick start does not. Run: ``python examples/make_examples.py [--out examples]``.

Each recording is a script of utterances (voice, text) and pauses, mixed at 16 kHz over seeded
background noise, then written in its own format, rate and channel count. ``lecture`` is longer than a
30 s model window and holds one stretch of continuous speech longer than 30 s, so windowing has to
make a forced cut with overlap there.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ is not installed

from pipeline.audio.decode import decode_audio
from tests.audio_files import encode_audio

RATE = 16000


@dataclass(frozen=True)
class Say:
    voice: str
    text: str
    pan: float = 0.0  # -1 left .. 1 right, for stereo outputs


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Recording:
    id: str
    extension: str
    sample_rate: int
    channels: int
    bit_rate: int | None
    noise_dbfs: float
    hum_dbfs: float | None
    script: tuple[Say | Pause, ...]
    question: str | None = None
    answer: str | None = None


LECTURE_1 = (
    "Welcome back to the course on data engineering, today we look at how a batch pipeline turns "
    "thousands of long recordings into searchable text, and why the way we cut the audio matters "
    "as much as the model we run on it, because a speech model only sees thirty seconds at a time, "
    "so every hour of audio becomes more than a hundred windows that must be transcribed and then "
    "joined back together without losing or repeating a single word at the seams between them, "
    "which is harder than it sounds when a speaker talks for a long time without taking a breath, "
    "and that is exactly the situation this example recreates, a single sentence that keeps going "
    "well past the length of one window so that the pipeline has no quiet moment to cut in"
)
LECTURE_2 = (
    "The simplest rule is to cut only where nobody speaks. A voice activity detector finds the pauses, "
    "and the windows are packed greedily until the next sentence would not fit. "
    "Silence between the windows is never sent to the model, which saves time and avoids invented text."
)
LECTURE_3 = (
    "When there is no pause at all, the windows overlap by a few seconds and the text is aligned word by word. "
    "That is all for today, thank you for listening."
)

RECORDINGS = (
    Recording(
        "intro",
        ".wav",
        16000,
        1,
        None,
        -55.0,
        None,
        (
            Say("en-us", "Good morning, everyone. Thanks for joining the weekly planning call."),
            Pause(1.2),
            Say("en-us", "Today we will review the budget and then the hiring plan."),
        ),
    ),
    Recording(
        "standup",
        ".flac",
        24000,
        1,
        None,
        -54.0,
        -50.0,
        (
            Say("en-gb+f3", "Yesterday I finished the data export and fixed two bugs in the parser."),
            Pause(0.8),
            Say("en-us+m3", "I am still testing the new dashboard. It should be ready on Thursday."),
            Pause(0.7),
            Say("en-gb+f3", "Great, let me know if you need a review."),
        ),
    ),
    Recording(
        "announcement",
        ".mp3",
        44100,
        2,
        64000,
        -52.0,
        None,
        (
            Say("en-gb-x-rp", "Attention please.", pan=-0.6),
            Pause(0.6),
            Say(
                "en-gb-x-rp",
                "The train to Glasgow will leave from platform four in ten minutes.",
                pan=0.4,
            ),
        ),
    ),
    Recording(
        "library",
        ".ogg",
        48000,
        1,
        32000,
        -50.0,
        None,
        (
            Say("en-us+m3", "When does the library open on Sunday?"),
            Pause(0.9),
            Say("en-us+f2", "It opens at noon and closes at six in the evening."),
        ),
        question="At what time does the library open on Sunday?",
        answer="at noon",
    ),
    Recording(
        "lecture",
        ".m4a",
        16000,
        1,
        48000,
        -50.0,
        None,
        (
            Pause(0.5),
            Say("en-us", LECTURE_1),
            Pause(1.5),
            Say("en-gb", LECTURE_2),
            Pause(1.2),
            Say("en-us", LECTURE_3),
        ),
    ),
)


def speak(voice: str, text: str, workdir: Path) -> np.ndarray:
    """espeak-ng's rendering of ``text``: float32 (n,) mono at RATE."""
    wav = workdir / "say.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(wav), text], check=True)
    return decode_audio(wav, RATE).samples


def render(recording: Recording, workdir: Path) -> np.ndarray:
    """The recording as float (channels, n) at its own sample rate, with noise, in [-1, 1]."""
    rng = np.random.default_rng(sum(map(ord, recording.id)))
    pieces = []
    for part in recording.script:
        if isinstance(part, Pause):
            pieces.append(np.zeros((2, round(part.seconds * RATE))))
        else:
            voice = 0.7 * speak(part.voice, part.text, workdir)
            pieces.append(
                np.stack([voice * (1 - part.pan) / 2, voice * (1 + part.pan) / 2]) * 2 / (1 + abs(part.pan))
            )
    mix = np.concatenate(pieces, axis=1)
    mix += 10 ** (recording.noise_dbfs / 20) * rng.standard_normal(mix.shape)
    if recording.hum_dbfs is not None:  # mains hum with its first harmonic
        t = np.arange(mix.shape[1]) / RATE
        mix += (
            10 ** (recording.hum_dbfs / 20)
            * np.sqrt(2)
            * (np.sin(2 * np.pi * 50 * t) + 0.5 * np.sin(2 * np.pi * 100 * t))
        )
    if recording.channels == 1:
        mix = mix.mean(axis=0, keepdims=True)
    if recording.sample_rate != RATE:
        mix = soxr.resample(mix.T, RATE, recording.sample_rate, quality="VHQ").T
    return np.clip(mix, -1.0, 1.0)


def reference(recording: Recording) -> str:
    return " ".join(part.text for part in recording.script if isinstance(part, Say))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        raise SystemExit(
            "espeak-ng not found: apt-get install espeak-ng (the committed examples need no rebuild)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for recording in RECORDINGS:
            audio = render(recording, Path(tmp))
            path = encode_audio(
                args.out / f"{recording.id}{recording.extension}",
                audio,
                recording.sample_rate,
                bit_rate=recording.bit_rate,
            )
            entry = {
                "id": recording.id,
                "audio": path.name,
                "text": reference(recording),
                "duration_s": round(audio.shape[1] / recording.sample_rate, 2),
                "sample_rate": recording.sample_rate,
                "channels": recording.channels,
                "voices": sorted({part.voice for part in recording.script if isinstance(part, Say)}),
            }
            if recording.question:
                entry |= {"question": recording.question, "answer": recording.answer}
            lines.append(json.dumps(entry))
            print(f"{path.name}: {entry['duration_s']} s, {path.stat().st_size / 1024:.0f} KiB")
    (args.out / "manifest.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
