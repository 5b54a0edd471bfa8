"""Real decoding of files the tests write themselves (stdlib wave, PyAV encoders) or cut from an example."""

from __future__ import annotations

import wave
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.audio.decode import AudioDecodeError, decode_audio
from tests.audio_files import encode_audio

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def tone(seconds: float, rate: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: Path, channels: np.ndarray, rate: int) -> Path:
    """Write int16 PCM with the stdlib; channels: float (C, N) in [-1, 1]."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels.shape[0])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((channels.T * 32767).astype("<i2").tobytes())
    return path


def test_wav_mono_16k_round_trip(tmp_path: Path) -> None:
    x = tone(1.0, 16000)
    audio = decode_audio(write_wav(tmp_path / "a.wav", x[None], 16000))
    assert audio.samples.dtype == np.float32 and audio.samples.shape == (16000,)
    assert (audio.sample_rate, audio.source_rate, audio.source_channels) == (16000, 16000, 1)
    assert audio.duration_s == pytest.approx(1.0)
    np.testing.assert_allclose(audio.samples, x, atol=1e-4)


@pytest.mark.parametrize(("ext", "rate"), [("flac", 44100), ("mp3", 44100), ("opus", 48000), ("m4a", 22050)])
def test_compressed_formats_resampled_and_downmixed(tmp_path: Path, ext: str, rate: int) -> None:
    left = tone(2.0, rate, 440.0, 0.4)
    right = tone(2.0, rate, 440.0, 0.2)
    audio = decode_audio(encode_audio(tmp_path / f"a.{ext}", np.stack([left, right]), rate))
    assert (audio.source_rate, audio.source_channels, audio.sample_rate) == (rate, 2, 16000)
    # Lossy codecs add encoder delay / padding of a few tens of ms.
    assert audio.duration_s == pytest.approx(2.0, abs=0.1)
    middle = audio.samples[8000:24000]
    # Average of the two channels: a 440 Hz tone of amplitude 0.3.
    assert np.sqrt(np.mean(middle**2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.05)
    spectrum = np.abs(np.fft.rfft(middle))
    assert np.argmax(spectrum) * 16000 / len(middle) == pytest.approx(440.0, abs=2.0)


def test_six_channel_96k_is_averaged_and_resampled(tmp_path: Path) -> None:
    rate = 96000
    channels = np.stack([tone(0.5, rate, 1000.0, 0.1 * (c + 1)) for c in range(6)])
    audio = decode_audio(write_wav(tmp_path / "surround.wav", channels, rate), sample_rate=8000)
    assert (audio.source_rate, audio.source_channels, audio.sample_rate) == (96000, 6, 8000)
    assert audio.samples.shape == (4000,)
    expected = tone(0.5, 8000, 1000.0, 0.35)  # mean of amplitudes 0.1..0.6
    np.testing.assert_allclose(audio.samples[200:-200], expected[200:-200], atol=2e-3)


def test_bytes_input_and_float_overshoot_clipped(tmp_path: Path) -> None:
    x = np.stack([tone(0.5, 16000, 300.0, 1.5)])
    path = encode_audio(tmp_path / "loud.wav", x, 16000, codec="pcm_f32le")
    audio = decode_audio(path.read_bytes())
    assert audio.samples.max() == pytest.approx(1.0) and audio.samples.min() == pytest.approx(-1.0)


def test_zero_seconds_is_empty_audio(tmp_path: Path) -> None:
    audio = decode_audio(write_wav(tmp_path / "empty.wav", np.zeros((1, 0)), 16000))
    assert audio.samples.shape == (0,) and audio.duration_s == 0.0
    assert audio.source_rate == 16000


def test_pure_silence_decodes_to_zeros(tmp_path: Path) -> None:
    audio = decode_audio(write_wav(tmp_path / "silence.wav", np.zeros((2, 8000)), 8000))
    assert audio.samples.shape == (16000,) and not audio.samples.any()


def _error(source: object, **kwargs: object) -> str:
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(source, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    assert "no such file" in _error(tmp_path / "nope.wav")
    (tmp_path / "zero.wav").write_bytes(b"")
    assert "empty" in _error(tmp_path / "zero.wav")
    assert "empty" in _error(b"")


def test_text_named_wav(tmp_path: Path) -> None:
    path = tmp_path / "notes.wav"
    path.write_text("these are meeting notes, not audio\n" * 20)
    message = _error(path)
    assert "notes.wav" in message and "not a readable audio file" in message


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_truncated_file(tmp_path: Path, ext: str) -> None:
    data = encode_audio(tmp_path / f"a.{ext}", tone(2.0, 16000)[None], 16000).read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    assert "cut." in _error(cut)
    assert decode_audio(data).duration_s == pytest.approx(2.0)


@pytest.mark.parametrize("source", ["library.ogg", "tone.opus"])
def test_truncated_ogg(tmp_path: Path, source: str) -> None:
    """Ogg declares no duration, so a cut file decodes as a shorter recording unless its end is checked:
    cut inside a page, exactly at the last page boundary (complete pages, no end-of-stream flag) and
    one byte short."""
    if source == "tone.opus":
        path = encode_audio(tmp_path / source, tone(3.0, 48000)[None], 48000)
    else:
        path = EXAMPLES / source
    data = path.read_bytes()
    assert decode_audio(path).duration_s == decode_audio(data).duration_s > 2.9
    last_page = data.rindex(b"OggS")
    for size in (len(data) // 2, last_page, len(data) - 1):
        cut = tmp_path / f"cut-{size}{path.suffix}"
        cut.write_bytes(data[:size])
        message = _error(cut)
        assert cut.name in message and "truncated ogg" in message
        assert "truncated ogg" in _error(data[:size])


def test_nan_samples_rejected(tmp_path: Path) -> None:
    x = tone(1.0, 16000)[None].copy()
    x[0, 9000] = np.nan
    message = _error(encode_audio(tmp_path / "nan.wav", x, 16000, codec="pcm_f32le"), name="rec-7")
    assert message.startswith("rec-7:") and "NaN" in message


def test_no_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "video.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height = 32, 32
        for _ in range(3):
            frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    assert "no audio stream" in _error(path)


def test_max_duration(tmp_path: Path) -> None:
    path = write_wav(tmp_path / "long.wav", tone(3.0, 8000)[None], 8000)
    assert "exceeds the limit" in _error(path, max_duration_s=2.0)
    assert decode_audio(path, max_duration_s=3.5).duration_s == pytest.approx(3.0)


def test_encode_rejects_unknown_extension_and_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extension"):
        encode_audio(tmp_path / "a.xyz", np.zeros((1, 10)), 16000)
    with pytest.raises(ValueError, match="shape"):
        encode_audio(tmp_path / "a.wav", np.zeros(10), 16000)
