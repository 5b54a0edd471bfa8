"""Decode any common audio file (wav, flac, mp3, ogg/opus, m4a, ...) to mono float32 at the model rate.

Decoding streams: frames are converted to float and gathered into blocks of about ``_BLOCK_S`` seconds,
each block checked for non-finite samples, downmixed by averaging the channels and fed to a soxr
resampler, so a long multichannel recording at a high rate never sits in memory at its source rate.
Blocks, not frames, because a frame is ~20 ms: per-frame numpy and resampler calls cost as much as
decoding itself (16 min of mp3: ~68,000 frames). ``AudioStream`` yields those blocks one by one, so a
recording of any length decodes in the memory of a block (the archive job's CPU stage); ``decode_audio``
gathers them into one array (a short recording, whole). A tar shard's member is read in place.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np
import soxr

from pipeline.errors import Refusal
from pipeline.inputs import open_source

# Integer sample formats -> the value that maps to full scale 1.0 (u8 is offset by 128).
_INT_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2147483648.0, "s64": 9223372036854775808.0}
# A stream that decodes to less than this share of its header's duration is truncated.
_MIN_DECODED_SHARE = 0.98
_TRUNCATION_SLACK_S = 0.1
_HEADER_BYTES = 4096
_OGG_MAX_PAGE_BYTES = 27 + 255 + 255 * 255  # header, segment table, data: the tail that holds the last page
_BLOCK_S = 10.0


class AudioDecodeError(Refusal, ValueError):
    """The input cannot be used as audio; the message names the input and what is wrong with it."""


class DurationLimitError(AudioDecodeError):
    """Longer than the ``max_duration_s`` asked for: depends on that setting, not only on the bytes."""


@dataclass
class Audio:
    """Decoded audio.

    samples: float32, shape (n,), mono at ``sample_rate``, finite, in [-1, 1].
    source_rate / source_channels: what the file held before resampling and downmixing.
    """

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int
    duration_s: float


def _wav_missing_bytes(head: bytes, size: int) -> int:
    """Bytes a RIFF/WAVE file's data chunk declares beyond the end of the file (0 if none or unknown).

    FFmpeg clamps the data chunk to the file size, so a truncated wav would otherwise decode silently short.
    """
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(head):
        chunk_id, chunk_size = head[pos : pos + 4], int.from_bytes(head[pos + 4 : pos + 8], "little")
        if chunk_id == b"data":
            if chunk_size in (0, 0xFFFFFFFF):  # size left unset by a streaming writer
                return 0
            return max(0, pos + 8 + chunk_size - size)
        pos += 8 + chunk_size + (chunk_size & 1)
    return 0


def _ogg_cut_short(tail: bytes) -> bool:
    """Whether an Ogg file ending in ``tail`` lacks its end: its last page must run exactly to the end of
    the file and carry the end-of-stream flag.

    Ogg declares no duration, so without this a file cut short would decode as a shorter recording.
    """
    pos = tail.rfind(b"OggS")
    while pos >= 0:  # 'OggS' can also occur inside page data: take the last page start that fits the end
        table = pos + 27
        if table <= len(tail) and tail[pos + 4] == 0:  # stream structure version 0
            segments = tail[table : table + tail[pos + 26]]
            if table + tail[pos + 26] + sum(segments) == len(tail):
                return not tail[pos + 5] & 0x04
        pos = tail.rfind(b"OggS", 0, pos)
    return True


@contextlib.contextmanager
def _open(
    source: str | os.PathLike | bytes, name: str, span: tuple[int, int] | None
) -> Iterator[av.container.InputContainer]:
    if isinstance(source, bytes | bytearray | memoryview):
        file: BinaryIO | str = io.BytesIO(bytes(source))
    elif not os.path.isfile(source):
        raise AudioDecodeError(f"{name}: no such file")
    else:  # a whole file is opened by FFmpeg itself, a member through Python
        file = open_source(source, span) if span else os.fspath(source)
    with open(file, "rb") if isinstance(file, str) else contextlib.nullcontext(file) as handle:
        size = handle.seek(0, io.SEEK_END)
        handle.seek(0)
        head, tail = handle.read(_HEADER_BYTES), b""
        if head.startswith(b"OggS"):
            handle.seek(max(0, size - _OGG_MAX_PAGE_BYTES))
            tail = handle.read()
        handle.seek(0)
    if size == 0:
        raise AudioDecodeError(f"{name}: empty file (0 bytes)")
    missing = _wav_missing_bytes(head, size)
    if missing:
        raise AudioDecodeError(f"{name}: truncated wav, {missing} bytes of audio data missing")
    if tail and _ogg_cut_short(tail):
        raise AudioDecodeError(
            f"{name}: truncated ogg, no end-of-stream page at the end of the file (cut short in a copy, "
            "or its writer never finished it; a remux, e.g. ffmpeg -c copy, closes a finished one)"
        )
    with contextlib.closing(file) if not isinstance(file, str) else contextlib.nullcontext():
        try:
            container = av.open(file, mode="r")
        except av.FFmpegError as err:
            raise AudioDecodeError(f"{name}: not a readable audio file ({err})") from err
        with container:
            yield container


def _frame_to_float(frame: av.AudioFrame) -> np.ndarray:
    """Return the frame as float64 of shape (channels, samples), integer formats scaled to [-1, 1)."""
    channels = frame.layout.nb_channels
    data = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: (1, samples * channels), channels interleaved
        data = data.reshape(-1, channels).T
    kind = frame.format.name.rstrip("p")
    if kind in _INT_SCALE:
        data = data.astype(np.float64)
        if kind == "u8":
            data -= 128.0
        return data / _INT_SCALE[kind]
    return data.astype(np.float64)


def _header_duration_s(container: av.container.InputContainer, stream: av.AudioStream) -> float | None:
    """Duration the file declares, or None when the container does not state one."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return float(Fraction(container.duration, av.time_base))
    return None


class AudioStream:
    """A recording decoded block by block: iterating yields float32 mono blocks at ``sample_rate`` (finite,
    in [-1, 1], about ``_BLOCK_S`` seconds each), so a recording of any length is never whole in memory.

    source: a path or the file's bytes; ``span`` (offset, size): only those bytes of the file at the path
    (a tar shard's member). Iterating raises AudioDecodeError as ``decode_audio`` says, a truncation found
    only after the last block. ``source_rate``, ``source_channels`` are set once iteration starts,
    ``samples`` counts the samples yielded so far. Each iteration decodes the file anew.
    """

    def __init__(
        self,
        source: str | os.PathLike | bytes,
        sample_rate: int = 16000,
        max_duration_s: float | None = None,
        *,
        name: str | None = None,
        span: tuple[int, int] | None = None,
    ) -> None:
        self.source, self.sample_rate, self.max_duration_s, self.span = (
            source,
            sample_rate,
            max_duration_s,
            span,
        )
        self.name = name or (os.fspath(source) if isinstance(source, str | os.PathLike) else "<bytes>")
        self.source_rate, self.source_channels, self.samples = sample_rate, 1, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        label, limit = self.name, self.max_duration_s
        self.samples = 0
        with _open(self.source, label, self.span) as container:
            if not container.streams.audio:
                raise AudioDecodeError(f"{label}: no audio stream")
            stream = container.streams.audio[0]
            declared_s = _header_duration_s(container, stream)
            if limit is not None and declared_s is not None and declared_s > limit:
                raise DurationLimitError(f"{label}: duration {declared_s:.1f} s exceeds the limit {limit} s")
            source_rate, source_channels = stream.rate, stream.channels
            self.source_rate, self.source_channels = source_rate or self.sample_rate, source_channels or 1
            resampler = soxr.ResampleStream(
                self.source_rate, self.sample_rate, 1, dtype="float64", quality="VHQ"
            )
            block: list[np.ndarray] = []  # frames (channels, samples) not yet resampled
            decoded = 0  # source samples
            block_start = 0  # source sample where ``block`` starts

            def flush(last: bool = False) -> np.ndarray:
                nonlocal block, block_start
                data = np.concatenate(block, axis=1) if block else np.zeros((1, 0))
                bad = np.flatnonzero(~np.isfinite(data).all(axis=0))
                if bad.size:
                    near = (block_start + bad[0]) / source_rate
                    raise AudioDecodeError(f"{label}: NaN or infinite samples near {near:.2f} s")
                block, block_start = [], decoded
                # Resampling can overshoot full scale on clipped input; float sources can exceed it outright.
                out = np.clip(resampler.resample_chunk(data.mean(axis=0), last=last), -1.0, 1.0)
                self.samples += len(out)
                return out.astype(np.float32)

            try:
                for frame in container.decode(stream):
                    if frame.sample_rate != source_rate or frame.layout.nb_channels != source_channels:
                        raise AudioDecodeError(
                            f"{label}: format changes mid-stream ({source_rate} Hz x {source_channels} -> "
                            f"{frame.sample_rate} Hz x {frame.layout.nb_channels})"
                        )
                    block.append(_frame_to_float(frame))
                    decoded += block[-1].shape[1]
                    if limit is not None and decoded > limit * source_rate:
                        raise DurationLimitError(f"{label}: duration exceeds the limit {limit} s")
                    if decoded - block_start >= _BLOCK_S * source_rate:
                        yield flush()
                if decoded:
                    yield flush(last=True)
            except av.FFmpegError as err:
                raise AudioDecodeError(f"{label}: corrupt audio data ({err})") from err
        decoded_s = decoded / source_rate if source_rate else 0.0
        if declared_s is not None and decoded_s < _MIN_DECODED_SHARE * declared_s - _TRUNCATION_SLACK_S:
            raise AudioDecodeError(
                f"{label}: truncated, header declares {declared_s:.2f} s, decoded {decoded_s:.2f} s"
            )

    @property
    def duration_s(self) -> float:
        """Seconds yielded so far: the recording's duration once iteration has ended."""
        return self.samples / self.sample_rate


def decode_audio(
    source: str | os.PathLike | bytes,
    sample_rate: int = 16000,
    max_duration_s: float | None = None,
    *,
    name: str | None = None,
) -> Audio:
    """Decode ``source`` (a path or the file's bytes) to mono float32 at ``sample_rate``, whole.

    Raises AudioDecodeError for a missing, empty, truncated or corrupt file, input that is not audio,
    no audio stream, NaN/inf samples, or a duration above ``max_duration_s``. ``name`` labels the
    input in error messages (default: the path, or "<bytes>").
    """
    stream = AudioStream(source, sample_rate, max_duration_s, name=name)
    blocks = list(stream)
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return Audio(
        samples=samples,
        sample_rate=sample_rate,
        source_rate=stream.source_rate,
        source_channels=stream.source_channels,
        duration_s=len(samples) / sample_rate,
    )
