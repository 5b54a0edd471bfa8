"""Whisper's encoder with FastAdaSP reduction between self-attention and the MLP.

Our own loop over the weights of transformers' ``WhisperEncoderLayer`` modules, with the same arithmetic
(q scaled before SDPA, fp16 clamp), so that without reduction it reproduces ``WhisperEncoder`` exactly.
A reducing layer i runs attention on its current tokens, adds the residual, then merges/evicts
``k = floor(r_i * L_i)`` tokens of each window's speech span (its keys, heads concatenated, give the
similarities; the attention mass its tokens receive from every query of the window gives the weights),
and runs the MLP on the shorter sequence.

Speech span and padding: Whisper pads every window to 30 s (1,500 positions). Window b's speech span is
its first ``ceil(samples / 320)`` positions; only it is reduced. The padding positions are kept by
default (the model was trained with them and attends to them); ``drop_padding`` removes them from the
encoder output, after the last layer, which is a reduction of its own (the decoder cross-attends to
speech only) and is reported as such. Whisper has no rotary positions, so ``ReductionConfig.position``
does not apply. ``target`` means the fraction of speech tokens removed at the encoder output, i.e. of
the decoder's cross-attention KV (what every decoder layer caches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.merging.config import EVICT_METHODS, MERGE_METHODS, ReductionConfig
from pipeline.merging.schedule import output_reduction, removed_counts, resolve_ratios
from pipeline.merging.step import LayerAttention, reduce_layer

if TYPE_CHECKING:  # see whisper_decoding.py
    from transformers.models.whisper.modeling_whisper import WhisperEncoder, WhisperEncoderLayer

SAMPLES_PER_TOKEN = 320  # 160-sample mel hop x conv2 stride 2
ENCODER_METHODS = (*MERGE_METHODS, *EVICT_METHODS)


def speech_tokens(num_samples: int, max_tokens: int) -> int:
    """Encoder positions covered by ``num_samples`` of 16 kHz audio (the rest of the window is padding)."""
    return min(max_tokens, math.ceil(num_samples / SAMPLES_PER_TOKEN))


def encoder_ratios(cfg: ReductionConfig, num_layers: int) -> list[float]:
    """Per-layer ratios: the config's ratio, or the one whose ``output_reduction`` meets its target."""
    if cfg.enabled and cfg.method not in ENCODER_METHODS:
        raise ValueError(
            f"method={cfg.method!r} has no Whisper encoder form (it evicts from a KV cache the encoder does "
            f"not have); use one of {', '.join(ENCODER_METHODS)}"
        )
    if cfg.enabled and cfg.mass != "full":
        raise ValueError(f"mass={cfg.mass!r}: the encoder has no queries after the audio; use 'full'")
    return resolve_ratios(cfg, num_layers, output_reduction)


@dataclass
class EncoderOutput:
    """states (B, S, D): row b valid in [0, lengths[b]); speech (B,): speech tokens at the output
    (they lead each row); layer_speech (B, N): speech tokens entering each encoder layer; origins
    (B, P) int64: the output position each of the P input positions (20 ms frames) ended in, so that
    what the decoder reads of a merged position can be spread back over the frames it stands for."""

    states: Tensor
    lengths: Tensor
    speech: list[int]
    layer_speech: list[list[int]]
    origins: Tensor


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, L, D) -> (B, H, L, D/H), contiguous (the encoder's and the decoder's attention)"""
    return x.view(*x.shape[:2], num_heads, -1).transpose(1, 2).contiguous()


def _attention(layer: WhisperEncoderLayer, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, L, D) -> (x + attention, q (B, H, L, hd) pre-scaled, keys (B, L, D) heads concatenated)."""
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x)
    q = split_heads(attn.q_proj(h) * attn.scaling, attn.num_heads)
    keys = attn.k_proj(h)
    k, v = split_heads(keys, attn.num_heads), split_heads(attn.v_proj(h), attn.num_heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    return x + attn.out_proj(out.transpose(1, 2).reshape(x.shape)), q, keys


def _mlp(layer: WhisperEncoderLayer, x: Tensor) -> Tensor:
    x = x + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(x))))
    if x.dtype == torch.float16:  # as WhisperEncoderLayer: keep fp16 activations finite
        limit = torch.finfo(x.dtype).max - 1000
        x = x.clamp(min=-limit, max=limit)
    return x


def _pad_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """rows of (L_b, D) -> ((B, max L_b, D) zero-padded, lengths (B,))."""
    lengths = torch.tensor([r.shape[0] for r in rows])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths


def _reduce_row(
    x: Tensor, q: Tensor, keys: Tensor, speech: int, k: int, cfg: ReductionConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One window: x (L, D), q (H, L, hd) pre-scaled, keys (L, D) -> ((L - k, D) with ``k`` speech tokens
    removed by the merge step (similarity over the keys, heads concatenated; mass from every query),
    (L,) the output position of each input position)."""
    attn = LayerAttention(
        q[None], split_heads(keys[None], q.shape[0]), None, scale=1.0, causal=False, keys=keys[None]
    )
    reduced, _, _, reduction = reduce_layer(x[None], attn, [(0, speech)], [k], cfg, generator)
    return reduced[0], reduction.groups[0]


@torch.inference_mode()
def encode(
    encoder: WhisperEncoder,
    features: Tensor,
    speech: list[int],
    cfg: ReductionConfig,
    ratios: list[float],
    drop_padding: bool = False,
    windows_per_pass: int | None = None,
) -> EncoderOutput:
    """features (B, mels, 2 x positions) log-mel; speech[b]: speech tokens of window b; ratios from
    ``encoder_ratios``. Random methods draw from a generator seeded with cfg.seed per window, so a
    window's plan does not depend on its batch. windows_per_pass: windows that go through the layers
    together (None: all B); the outputs are the same, their rows zero-padded to the longest."""
    step = windows_per_pass or len(speech)
    parts = [
        _encode_pass(encoder, features[i : i + step], speech[i : i + step], cfg, ratios, drop_padding)
        for i in range(0, len(speech), step)
    ]
    if len(parts) == 1:
        return parts[0]
    width = max(p.states.shape[1] for p in parts)
    return EncoderOutput(
        states=torch.cat([F.pad(p.states, (0, 0, 0, width - p.states.shape[1])) for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        speech=[s for p in parts for s in p.speech],
        layer_speech=[s for p in parts for s in p.layer_speech],
        origins=torch.cat([p.origins for p in parts]),
    )


def _encode_pass(
    encoder: WhisperEncoder,
    features: Tensor,
    speech: list[int],
    cfg: ReductionConfig,
    ratios: list[float],
    drop_padding: bool,
) -> EncoderOutput:
    x = F.gelu(encoder.conv1(features))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight
    batch, full, _ = x.shape
    lengths = torch.full((batch,), full)
    origins = torch.arange(full).repeat(batch, 1)
    speech = list(speech)
    generators = [torch.Generator().manual_seed(cfg.seed) for _ in range(batch)]
    layer_speech: list[list[int]] = [[] for _ in range(batch)]
    for layer, ratio in zip(encoder.layers, ratios, strict=True):
        for b in range(batch):
            layer_speech[b].append(speech[b])
        mask = None
        if bool((lengths != x.shape[1]).any()):
            mask = (torch.arange(x.shape[1])[None, :] < lengths[:, None])[:, None, None, :].to(x.device)
        x, q, keys = _attention(layer, x, mask)
        counts = [removed_counts(s, [ratio], cfg.method)[0] if ratio and s > 1 else 0 for s in speech]
        if any(counts):
            rows = []
            for b, (n, k) in enumerate(zip(lengths.tolist(), counts, strict=True)):
                row = x[b, :n]
                if k:
                    row, groups = _reduce_row(row, q[b, :, :n], keys[b, :n], speech[b], k, cfg, generators[b])
                    origins[b] = groups.cpu()[origins[b]]
                rows.append(row)
            x, lengths = _pad_rows(rows)
            speech = [s - k for s, k in zip(speech, counts, strict=True)]
        x = _mlp(layer, x)
    x = encoder.layer_norm(x)
    if drop_padding:
        lengths = torch.tensor(speech)
        x = x[:, : max(speech, default=0)]
    return EncoderOutput(states=x, lengths=lengths, speech=speech, layer_speech=layer_speech, origins=origins)
