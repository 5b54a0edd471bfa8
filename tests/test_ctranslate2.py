"""CTranslate2 model.bin reading and Whisper conversion: synthetic files we write (whole and split in
two, as packages ship them), plus the shipped models."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from pipeline.models.ctranslate2 import (
    CTranslate2FormatError,
    Part,
    ShippedFile,
    check_shipped,
    file_sha256,
    load_converted_whisper,
    read_model_bin,
    whisper_config,
    whisper_state_dict,
)
from pipeline.models.whisper import BASE, PACKAGED, TINY_EN, PackagedWhisper, packaged_files

DTYPE_IDS = {
    torch.float32: 0,
    torch.int8: 1,
    torch.int16: 2,
    torch.int32: 3,
    torch.float16: 4,
    torch.bfloat16: 5,
}
SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"]


def _string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def write_model_bin(
    path: Path, variables: dict[str, torch.Tensor], aliases: dict[str, str], version: int = 6
) -> None:
    """Write the CTranslate2 binary layout (the format description in pipeline/models/ctranslate2.py)."""
    out = [struct.pack("<I", version), _string("WhisperSpec"), struct.pack("<I", 3)]
    out.append(struct.pack("<I", len(variables)))
    for name, value in sorted(variables.items()):
        data = (
            value.contiguous().view(torch.uint8).numpy().tobytes()
            if value.dim()
            else value.reshape(1).view(torch.uint8).numpy().tobytes()
        )
        out += [_string(name), struct.pack("<B", value.dim()), *(struct.pack("<I", d) for d in value.shape)]
        out += [struct.pack("<BI", DTYPE_IDS[value.dtype], len(data)), data]
    out.append(struct.pack("<I", len(aliases)))
    for alias, target in aliases.items():
        out += [_string(alias), _string(target)]
    path.write_bytes(b"".join(out))


def tiny_hf_whisper(seed: int = 0) -> WhisperForConditionalGeneration:
    torch.manual_seed(seed)
    config = WhisperConfig(
        vocab_size=40, num_mel_bins=4, d_model=8, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=12, decoder_ffn_dim=12,
        max_source_positions=6, max_target_positions=10, pad_token_id=30, eos_token_id=30,
        bos_token_id=31, decoder_start_token_id=31,
    )  # fmt: skip
    return WhisperForConditionalGeneration(config).half()


def ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The WhisperSpec layout of a transformers Whisper: fused projections, zero k bias, scalars."""
    sd, cfg = model.state_dict(), model.config
    out: dict[str, torch.Tensor] = {}

    def lin(dst: str, src: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def norm(dst: str, src: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = sd[f"{src}.weight"], sd[f"{src}.bias"]

    def fused(dst: str, src: str, letters: str) -> None:
        out[f"{dst}/weight"] = torch.cat([sd[f"{src}.{x}_proj.weight"] for x in letters])
        zero = torch.zeros(cfg.d_model, dtype=torch.float16)
        out[f"{dst}/bias"] = torch.cat([sd.get(f"{src}.{x}_proj.bias", zero) for x in letters])

    for stack, layers in (("encoder", cfg.encoder_layers), ("decoder", cfg.decoder_layers)):
        norm(f"{stack}/layer_norm", f"model.{stack}.layer_norm")
        out[f"{stack}/num_heads"] = torch.tensor(2, dtype=torch.int16)
        for i in range(layers):
            dst, src = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            fused(f"{dst}/self_attention/linear_0", f"{src}.self_attn", "qkv")
            lin(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            if stack == "decoder":
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
                lin(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
                fused(f"{dst}/attention/linear_1", f"{src}.encoder_attn", "kv")
                lin(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
            lin(f"{dst}/ffn/linear_0", f"{src}.fc1")
            lin(f"{dst}/ffn/linear_1", f"{src}.fc2")
    lin("encoder/conv1", "model.encoder.conv1")
    lin("encoder/conv2", "model.encoder.conv2")
    out["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    out["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    out["decoder/activation"] = torch.tensor(3, dtype=torch.int8)
    out["decoder/scale_embeddings"] = torch.tensor(0, dtype=torch.int8)
    out["decoder/alignment_heads"] = torch.tensor(1, dtype=torch.int16)
    return out


@pytest.fixture
def synthetic(tmp_path: Path) -> tuple[Path, WhisperForConditionalGeneration]:
    """A model folder (model.bin, config.json, tokenizer.json) written from a tiny random Whisper."""
    model = tiny_hf_whisper()
    write_model_bin(
        tmp_path / "model.bin",
        ct2_variables(model),
        {"decoder/projection/weight": "decoder/embeddings/weight"},
    )
    (tmp_path / "config.json").write_text(json.dumps({"suppress_ids": [3, 5], "suppress_ids_begin": [7]}))
    added = [{"id": 30 + i, "content": tok} for i, tok in enumerate(SPECIALS)]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    return tmp_path, model


def test_round_trip_variables_and_aliases(synthetic):
    folder, model = synthetic
    variables = ct2_variables(model)
    parsed = read_model_bin(folder / "model.bin")
    assert (parsed.spec, parsed.revision) == ("WhisperSpec", 3)
    assert set(parsed.variables) == {*variables, "decoder/projection/weight"}
    for name, value in variables.items():
        assert parsed.variables[name].dtype == value.dtype and torch.equal(parsed.variables[name], value), (
            name
        )
    assert torch.equal(parsed.variables["decoder/projection/weight"], variables["decoder/embeddings/weight"])


def test_conversion_matches_transformers_layout(synthetic):
    folder, model = synthetic
    parsed = read_model_bin(folder / "model.bin")
    state = whisper_state_dict(parsed)
    expected = {k: v for k, v in model.state_dict().items() if k != "proj_out.weight"}
    assert set(state) == set(expected)
    for name, value in expected.items():
        assert state[name].shape == value.shape and torch.equal(state[name], value), name
    config = whisper_config(
        parsed,
        {"suppress_ids": [3, 5], "suppress_ids_begin": [7]},
        json.loads((folder / "tokenizer.json").read_text()),
    )
    for field in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_ffn_dim",
                  "decoder_attention_heads", "max_source_positions", "max_target_positions"):  # fmt: skip
        assert getattr(config, field) == getattr(model.config, field), field
    assert (config.eos_token_id, config.decoder_start_token_id) == (30, 31)
    assert (config.suppress_tokens, config.begin_suppress_tokens) == ([3, 5], [7])
    rebuilt = WhisperForConditionalGeneration(config).half()
    rebuilt.load_state_dict(state, strict=False)
    rebuilt.tie_weights()
    assert torch.equal(rebuilt.proj_out.weight, model.model.decoder.embed_tokens.weight)


@pytest.mark.parametrize("cut", [2, 9, 40, 300, -1])
def test_truncated_file_raises(synthetic, cut):
    folder, _ = synthetic
    path = folder / "model.bin"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CTranslate2FormatError, match="truncated"):
        read_model_bin(path)


def test_trailing_bytes_wrong_version_and_bad_layout_raise(synthetic):
    folder, model = synthetic
    path = folder / "model.bin"
    data = path.read_bytes()
    path.write_bytes(data + b"\0")
    with pytest.raises(CTranslate2FormatError, match="trailing"):
        read_model_bin(path)
    path.write_bytes(struct.pack("<I", 5) + data[4:])
    with pytest.raises(CTranslate2FormatError, match="version 5"):
        read_model_bin(path)
    variables = ct2_variables(model)
    variables["encoder/layer_0/self_attention/linear_0/bias"][10] = 1.0  # inside the k part
    write_model_bin(path, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    with pytest.raises(CTranslate2FormatError, match="key bias"):
        whisper_state_dict(read_model_bin(path))


def whole(path: Path, package: str = "pkg") -> ShippedFile:
    size = path.stat().st_size
    return ShippedFile((Part(package, path, size),), size, file_sha256(path))


def split(path: Path, cut: int, folder: Path) -> ShippedFile:
    """path's bytes as two part files (cut at byte ``cut``), as two packages would install them."""
    data = path.read_bytes()
    parts = []
    for i, chunk in enumerate((data[:cut], data[cut:]), start=1):
        (folder / f"model.bin.part{i}").write_bytes(chunk)
        parts.append(Part(f"pkg-{i}", folder / f"model.bin.part{i}", len(chunk)))
    return ShippedFile(tuple(parts), len(data), file_sha256(path))


def test_cache_is_keyed_by_content_and_written_atomically(synthetic, tmp_path_factory):
    folder, _ = synthetic
    cache = tmp_path_factory.mktemp("cache")
    source = whole(folder / "model.bin")
    state, config = load_converted_whisper(source, folder, cache)
    files = sorted(p.name for p in cache.iterdir())
    assert files == [f"whisper-ct2-{source.sha256}.safetensors"]
    cached_state, cached_config = load_converted_whisper(source, folder, cache)
    assert cached_config.to_dict() == config.to_dict()
    assert all(torch.equal(cached_state[k], v) for k, v in state.items()) and set(cached_state) == set(state)
    # A corrupt source is an error, never a half-written or stale cache entry.
    (folder / "model.bin").write_bytes((folder / "model.bin").read_bytes()[:-3])
    with pytest.raises(CTranslate2FormatError, match="expected"):
        load_converted_whisper(source, folder, cache)
    assert sorted(p.name for p in cache.iterdir()) == files


@pytest.mark.parametrize("cut", [1, 333, -7])  # inside the header, inside a variable, inside the aliases
def test_two_parts_convert_like_the_whole_file(synthetic, tmp_path_factory, cut):
    folder, model = synthetic
    size = (folder / "model.bin").stat().st_size
    source = split(folder / "model.bin", cut % size, tmp_path_factory.mktemp("parts"))
    state, config = load_converted_whisper(source, folder, tmp_path_factory.mktemp("cache"))
    expected_state, expected_config = load_converted_whisper(
        whole(folder / "model.bin"), folder, tmp_path_factory.mktemp("cache")
    )
    assert config.to_dict() == expected_config.to_dict() and set(state) == set(expected_state)
    assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    assert torch.equal(state["model.decoder.embed_tokens.weight"], model.model.decoder.embed_tokens.weight)


def test_partial_or_mismatched_parts_are_refused_before_anything_is_cached(synthetic, tmp_path_factory):
    folder, _ = synthetic
    parts_dir, cache = tmp_path_factory.mktemp("parts"), tmp_path_factory.mktemp("cache")
    source = split(folder / "model.bin", 500, parts_dir)
    second = source.parts[1].path
    good = second.read_bytes()
    second.write_bytes(good[:-10])  # an interrupted install
    with pytest.raises(
        CTranslate2FormatError, match=rf"package pkg-2\): expected {len(good)} bytes, found {len(good) - 10}"
    ):
        load_converted_whisper(source, folder, cache)
    second.unlink()
    with pytest.raises(CTranslate2FormatError, match=r"pkg-2.*found missing"):
        check_shipped(source)
    second.write_bytes(bytes(len(good)))  # right size, other content: parts of different releases
    with pytest.raises(CTranslate2FormatError, match=f"expected {source.sha256}.*reinstall pkg-1, pkg-2"):
        load_converted_whisper(source, folder, cache)
    assert list(cache.iterdir()) == []
    with pytest.raises(ValueError, match="add up"):
        ShippedFile(source.parts, source.size + 1, source.sha256)


def test_a_missing_package_names_the_install_command(monkeypatch):
    spec = PackagedWhisper(
        parts=(("no-such-dist", "no_such_module_for_fastadasp", "model.bin", 1),),
        size=1,
        sha256="0" * 64,
        meta=("no_such_module_for_fastadasp", "."),
        install='pip install -e ".[nothing]"',
        encoder_layers=1,
        multilingual=False,
    )
    monkeypatch.setitem(PACKAGED, "whisper-absent", spec)
    with pytest.raises(ImportError, match=r"whisper-absent needs the package no-such-dist.*\.\[nothing\]"):
        packaged_files("whisper-absent")
    with pytest.raises(ValueError, match="not a packaged Whisper"):
        packaged_files("whisper-huge")


def test_whisper_base_parts_join_to_the_released_file():
    source, meta = packaged_files(BASE)
    assert [p.size for p in source.parts] == [94_371_840, 50_845_767] and source.size == 145_217_607
    check_shipped(source)  # sizes and sha256 of the join
    assert {"config.json", "tokenizer.json"} <= {p.name for p in meta.iterdir()}


def test_shipped_tiny_en_converts():
    source, meta = packaged_files(TINY_EN)
    parsed = read_model_bin([p.path for p in source.parts])
    state = whisper_state_dict(parsed)
    config = whisper_config(
        parsed,
        json.loads((meta / "config.json").read_text()),
        json.loads((meta / "tokenizer.json").read_text(encoding="utf-8")),
    )
    assert (config.d_model, config.encoder_layers, config.decoder_layers) == (384, 4, 4)
    assert (config.encoder_attention_heads, config.vocab_size, config.activation_function) == (
        6,
        51864,
        "gelu",
    )
    assert (config.eos_token_id, config.decoder_start_token_id) == (50256, 50257)
    assert state["model.decoder.layers.3.encoder_attn.k_proj.weight"].shape == (384, 384)
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in state
    assert state["model.encoder.conv1.weight"].shape == (384, 80, 3)
    assert state["model.encoder.embed_positions.weight"].dtype == torch.float16
