"""Whisper's encoder with FastAdaSP reduction between self-attention and the MLP.

Our own loop over the weights of transformers' ``WhisperEncoderLayer`` modules, with the same arithmetic
(q scaled before SDPA, fp16 clamp), so that without reduction it reproduces ``WhisperEncoder`` exactly.
A reducing layer i runs attention on its current tokens, adds the residual, then merges/evicts
``k = floor(r_i * L_i)`` tokens of each window's speech span (its keys, heads concatenated, give the
similarities; the attention mass its tokens receive from every query of the window gives the weights),
and runs the MLP on the shorter sequence.

Speech span and padding: Whisper pads every window to 30 s (1,500 positions). Window b's speech span is
its first ``ceil(samples / 320)`` positions; only it is reduced by the method. The padding is what
``ReductionConfig.padding`` says: kept (``keep``, as trained), or merged before the first layer
(``merge``: ``padding_margin`` positions after the speech kept, the rest averaged ``padding_group`` at
a time into tokens that stand for their positions through a log-count attention bias, here and in the
decoder's cross-attention; see docs/pipeline.md "Whisper's padding" for the measurements that chose it
over trimming or dropping the padding). Whisper has no rotary positions, so ``ReductionConfig.position``
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

if TYPE_CHECKING:  # see whisper_runner.py
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
    what the decoder reads of a merged position can be spread back over the frames it stands for;
    key_bias (B, S): ``_key_bias`` of the output (None: every row full, no merged padding); positions:
    per window, the positions its padding policy let into the first layer (what its layers cost);
    timing: what word timing reads when the last layer merged speech tokens (``encode(...,
    timing=True)``): the same output without that last merge (``_unmerged_output``), so that the
    alignment heads see each of those tokens' frames apart."""

    states: Tensor
    lengths: Tensor
    speech: list[int]
    layer_speech: list[list[int]]
    origins: Tensor
    key_bias: Tensor | None = None
    positions: list[int] | None = None
    timing: EncoderOutput | None = None


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


# Frames at the end of short features that must be padding (what the conv stack reads around a position).
CONSTANT_FRAMES = 8


def input_frames(num_samples: int, max_frames: int) -> int:
    """Log-mel frames a window of ``num_samples`` needs computed: its audio, the frames its last samples
    reach, and ``CONSTANT_FRAMES`` of padding (every later frame equals them, see ``_embed``)."""
    return min(max_frames, 2 * math.ceil(num_samples / SAMPLES_PER_TOKEN) + 2 + CONSTANT_FRAMES)


def _conv(encoder: WhisperEncoder, features: Tensor) -> Tensor:
    """(B, mels, F) -> (B, F / 2, D): the two convolutions, as WhisperEncoder runs them."""
    return F.gelu(encoder.conv2(F.gelu(encoder.conv1(features)))).permute(0, 2, 1)


def _embed(encoder: WhisperEncoder, features: Tensor) -> Tensor:
    """features (B, mels, F): log-mel frames, each row's frames from F - CONSTANT_FRAMES on (and every
    frame after F, to the window's full length) equal: its padding -> (B, positions, D) the conv stack
    plus positions, as over the full window. A padded frame reads the same everywhere, so the stack is
    run on F frames and on a slab of padding alone, whose outputs stand for every position past the
    audio (the window's last position apart: it reads the convolutions' zero padding too)."""
    positions = encoder.embed_positions.weight.shape[0]
    frames = features.shape[-1]
    if frames >= 2 * positions:
        return _conv(encoder, features[..., : 2 * positions]) + encoder.embed_positions.weight
    head = _conv(encoder, features)[:, : (frames - 3) // 2 + 1]  # outputs reading frames < F only
    slab = _conv(encoder, features[..., -1:].expand(-1, -1, 6))  # padding inside (1) and at the end (2)
    tail = slab[:, 1:2].expand(-1, positions - head.shape[1] - 1, -1)
    return torch.cat([head, tail, slab[:, 2:3]], dim=1) + encoder.embed_positions.weight


def _pad_rows(rows: list[Tensor]) -> tuple[Tensor, Tensor]:
    """rows of (L_b, D) -> ((B, max L_b, D) zero-padded, lengths (B,))."""
    lengths = torch.tensor([r.shape[0] for r in rows])
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths


def _reduce_row(
    x: Tensor, q: Tensor, keys: Tensor, speech: int, k: int, cfg: ReductionConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """One window: x (L, D), q (H, L, hd) pre-scaled, keys (L, D) -> ((L - k, D) with ``k`` speech tokens
    removed by the merge step (similarity over the keys, heads concatenated; mass from every query),
    (L,) the output position of each input position). The mass is taken without the merged padding
    tokens' log-count bias: it only weighs adjacent speech tokens against each other."""
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
    windows_per_pass: int | None = None,
    timing: bool = False,
) -> EncoderOutput:
    """features (B, mels, F) log-mel, F up to 2 x positions (shorter: see ``_embed``); speech[b]: speech
    tokens of window b; ratios from ``encoder_ratios``. Random methods draw from a generator seeded with cfg.seed per window, so a
    window's plan does not depend on its batch. windows_per_pass: windows that go through the layers
    together (None: all B); the outputs are the same, their rows zero-padded to the longest."""
    step = windows_per_pass or len(speech)
    parts = [
        _encode_pass(encoder, features[i : i + step], speech[i : i + step], cfg, ratios, timing)
        for i in range(0, len(speech), step)
    ]
    return parts[0] if len(parts) == 1 else _concat(parts)


def _concat(parts: list[EncoderOutput]) -> EncoderOutput:
    """The passes' outputs as one batch, rows zero-padded to the longest."""
    width = max(p.states.shape[1] for p in parts)
    timed = [p.timing for p in parts if p.timing is not None]
    return EncoderOutput(
        states=torch.cat([F.pad(p.states, (0, 0, 0, width - p.states.shape[1])) for p in parts]),
        lengths=torch.cat([p.lengths for p in parts]),
        speech=[s for p in parts for s in p.speech],
        layer_speech=[s for p in parts for s in p.layer_speech],
        origins=torch.cat([p.origins for p in parts]),
        key_bias=_key_bias_of_passes(parts, width),
        positions=[n for p in parts for n in p.positions],
        timing=_concat([p.timing or p for p in parts]) if timed else None,
    )


def _key_bias_of_passes(parts: list[EncoderOutput], width: int) -> Tensor | None:
    """The passes' key biases side by side, each widened to ``width`` (keys past a row's end: -inf)."""
    if all(p.key_bias is None and p.states.shape[1] == width for p in parts):
        return None
    return torch.cat(
        [
            F.pad(
                p.key_bias if p.key_bias is not None else torch.zeros(p.states.shape[:2]),
                (0, width - p.states.shape[1]),
                value=-float("inf"),
            )
            for p in parts
        ]
    )


def _encode_pass(
    encoder: WhisperEncoder,
    features: Tensor,
    speech: list[int],
    cfg: ReductionConfig,
    ratios: list[float],
    timing: bool = False,
) -> EncoderOutput:
    x = _embed(encoder, features)
    batch, full, _ = x.shape
    origins = torch.arange(full).repeat(batch, 1)
    sizes = None
    if cfg.padding == "keep":
        lengths = torch.full((batch,), full)
    else:  # merge: each window's padding past its margin averaged group by group
        rows, size_rows = [], []
        for b, s in enumerate(speech):
            keep = min(full, s + cfg.padding_margin)
            if full - keep < cfg.padding_min:
                keep = full
            groups = torch.arange(full - keep) // cfg.padding_group
            counts = torch.bincount(groups, minlength=-(-(full - keep) // cfg.padding_group)).to(x.dtype)
            means = x.new_zeros(len(counts), x.shape[-1]).index_add_(0, groups.to(x.device), x[b, keep:])
            rows.append(torch.cat([x[b, :keep], means / counts[:, None].to(x.device)]))
            size_rows.append(torch.cat([torch.ones(keep), counts.float()]))
            origins[b, keep:] = keep + groups
        x, lengths = _pad_rows(rows)
        sizes = torch.nn.utils.rnn.pad_sequence(size_rows, batch_first=True)
    positions = lengths.tolist()
    speech = list(speech)
    generators = [torch.Generator().manual_seed(cfg.seed) for _ in range(batch)]
    layer_speech: list[list[int]] = [[] for _ in range(batch)]
    unmerged = None
    for i, (layer, ratio) in enumerate(zip(encoder.layers, ratios, strict=True)):
        for b in range(batch):
            layer_speech[b].append(speech[b])
        mask = _key_bias(lengths, sizes, x.shape[1])
        x, q, keys = _attention(layer, x, None if mask is None else mask[:, None, None].to(x))
        counts = [removed_counts(s, [ratio], cfg.method)[0] if ratio and s > 1 else 0 for s in speech]
        if timing and any(counts) and i == len(encoder.layers) - 1:
            unmerged = (x, lengths, sizes, list(speech), origins.clone())
        row_groups = []
        if any(counts):
            rows, size_rows = [], []
            for b, (n, k) in enumerate(zip(lengths.tolist(), counts, strict=True)):
                row = x[b, :n]
                size_row = None if sizes is None else sizes[b, :n]
                groups = torch.arange(n, device=x.device)
                if k:
                    row, groups = _reduce_row(row, q[b, :, :n], keys[b, :n], speech[b], k, cfg, generators[b])
                    origins[b] = groups.cpu()[origins[b]]
                    if size_row is not None:  # merges happen inside the speech, whose sizes are 1
                        size_row = size_row[k:]
                rows.append(row)
                size_rows.append(size_row)
                row_groups.append(groups)
            x, lengths = _pad_rows(rows)
            if sizes is not None:
                sizes = torch.nn.utils.rnn.pad_sequence(size_rows, batch_first=True)
            speech = [s - k for s, k in zip(speech, counts, strict=True)]
        merged_in = x
        x = _mlp(layer, x)
    out = _output(encoder, x, lengths, sizes, speech, layer_speech, origins, positions)
    if unmerged is not None:
        states = _unmerged_output(unmerged[0], merged_in, x, row_groups)
        out.timing = _output(encoder, states, *unmerged[1:4], layer_speech, unmerged[4], positions)
    return out


def _unmerged_output(before: Tensor, merged_in: Tensor, after: Tensor, row_groups: list[Tensor]) -> Tensor:
    """The last layer's output as if it had not merged, at no further MLP: ``before`` (B, L, D), its
    states entering the MLP unmerged; ``merged_in`` (B, L', D) and ``after`` (B, L', D), the merged
    states entering and leaving it; row_groups[b] (L_b,): each position's merged position. Each position
    keeps its own residual stream and takes its group's MLP update, exactly the output where its merge
    left it alone. Running the MLP once more on the merged members instead times boundaries 5 ms
    closer, at a cost of its own (benchmarks/word-times-cost-shared-mlp)."""
    out = before.clone()
    update = after - merged_in
    for b, groups in enumerate(row_groups):
        out[b, : len(groups)] += update[b, groups]
    return out


def _output(
    encoder: WhisperEncoder,
    x: Tensor,
    lengths: Tensor,
    sizes: Tensor | None,
    speech: list[int],
    layer_speech: list[list[int]],
    origins: Tensor,
    positions: list[int],
) -> EncoderOutput:
    """The last layer's states, normed."""
    x = encoder.layer_norm(x)
    return EncoderOutput(
        states=x,
        lengths=lengths,
        speech=speech,
        layer_speech=layer_speech,
        origins=origins,
        key_bias=_key_bias(lengths, sizes, x.shape[1]),
        positions=positions,
    )


def _key_bias(lengths: Tensor, sizes: Tensor | None, width: int) -> Tensor | None:
    """(B, width) additive attention bias over the keys: log of the positions a key stands for (0 for
    one), -inf past a row's length; None when every key is one position of a full-length row."""
    short = bool((lengths != width).any())
    merged = sizes is not None and bool((sizes[:, :width] > 1).any())
    if not short and not merged:
        return None
    bias = torch.zeros(len(lengths), width) if sizes is None else sizes[:, :width].clamp(min=1).log()
    return bias.masked_fill(torch.arange(width)[None, :] >= lengths[:, None], -float("inf"))
