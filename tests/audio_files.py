"""Encode float audio to a file with PyAV, the format chosen by the file extension, from one array or
block by block (a recording of hours never whole in memory). The product only reads audio; the tests,
examples/make_examples.py and benchmarks/long_recordings.py write it."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import av
import numpy as np

# extension -> (container format, codec)
FORMATS = {
    ".wav": ("wav", "pcm_s16le"),
    ".flac": ("flac", "flac"),
    ".mp3": ("mp3", "libmp3lame"),
    ".ogg": ("ogg", "libopus"),
    ".opus": ("ogg", "libopus"),
    ".m4a": ("ipod", "aac"),
}
_LAYOUTS = {1: "mono", 2: "stereo", 6: "5.1"}
_BLOCK = 4096


def encode_audio(
    path: str | os.PathLike,
    channels: np.ndarray | Iterable[np.ndarray],
    sample_rate: int,
    *,
    codec: str | None = None,
    bit_rate: int | None = None,
) -> Path:
    """Write ``channels`` (float, shape (C, N), C in 1, 2, 6, values in [-1, 1]; or consecutive blocks
    of such arrays) to ``path``.

    ``codec`` overrides the extension's default (e.g. "pcm_f32le" for a float wav); ``bit_rate``
    in bit/s applies to lossy codecs. The stream converts to the codec's sample format and frame size.
    """
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"{path.name}: extension not one of {', '.join(FORMATS)}")
    blocks = iter([channels] if isinstance(channels, np.ndarray) else channels)
    first = next(blocks, None)
    if first is None or first.ndim != 2 or first.shape[0] not in _LAYOUTS:
        shape = None if first is None else first.shape
        raise ValueError(f"channels must have shape (C, N) with C in {sorted(_LAYOUTS)}, got {shape}")
    container_format, default_codec = FORMATS[path.suffix]
    layout = _LAYOUTS[first.shape[0]]
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec or default_codec, rate=sample_rate, layout=layout)
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=sample_rate)
        for block in itertools.chain([first], blocks):
            for start in range(0, block.shape[1], _BLOCK):
                piece = np.ascontiguousarray(block[:, start : start + _BLOCK], dtype=np.float32)
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
                frame.sample_rate = sample_rate
                for converted in resampler.resample(frame):
                    out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return path


def speech_in_silence(
    speech: np.ndarray, seconds: float, every_s: float, sample_rate: int, block_s: float = 60.0
) -> Iterator[np.ndarray]:
    """Blocks (1, n) of a recording ``seconds`` long of digital silence with ``speech`` (float (n,) at
    ``sample_rate``) starting every ``every_s`` seconds, for ``encode_audio``: a day-long room recording,
    mostly silence, made in seconds."""
    total, block, every = (
        round(seconds * sample_rate),
        round(block_s * sample_rate),
        round(every_s * sample_rate),
    )
    for start in range(0, total, block):
        out = np.zeros(min(block, total - start), np.float32)
        first = max(0, -(-(start - len(speech) + 1) // every) * every)  # first island reaching the block
        for at in range(first, start + len(out), every):
            lo, hi = max(at, start), min(at + len(speech), start + len(out))
            out[lo - start : hi - start] = speech[lo - at : hi - at]
        yield out[None]
