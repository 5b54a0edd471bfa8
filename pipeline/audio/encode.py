"""Encode float audio to a file with PyAV, the format chosen by the file extension (examples, tests)."""

from __future__ import annotations

import os
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
    channels: np.ndarray,
    sample_rate: int,
    *,
    codec: str | None = None,
    bit_rate: int | None = None,
) -> Path:
    """Write ``channels`` (float, shape (C, N), C in 1, 2, 6, values in [-1, 1]) to ``path``.

    ``codec`` overrides the extension's default (e.g. "pcm_f32le" for a float wav); ``bit_rate``
    in bit/s applies to lossy codecs. The stream converts to the codec's sample format and frame size.
    """
    path = Path(path)
    if path.suffix not in FORMATS:
        raise ValueError(f"{path.name}: extension not one of {', '.join(FORMATS)}")
    if channels.ndim != 2 or channels.shape[0] not in _LAYOUTS:
        raise ValueError(
            f"channels must have shape (C, N) with C in {sorted(_LAYOUTS)}, got {channels.shape}"
        )
    container_format, default_codec = FORMATS[path.suffix]
    layout = _LAYOUTS[channels.shape[0]]
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec or default_codec, rate=sample_rate, layout=layout)
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=sample_rate)
        for start in range(0, channels.shape[1], _BLOCK):
            block = np.ascontiguousarray(channels[:, start : start + _BLOCK], dtype=np.float32)
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=layout)
            frame.sample_rate = sample_rate
            for converted in resampler.resample(frame):
                out.mux(stream.encode(converted))
        out.mux(stream.encode(None))
    return path
