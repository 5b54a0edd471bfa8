"""Qwen2-Audio adapter: audio encoder -> projector -> placeholder tokens -> our merge-aware decoder.

``load("Qwen/Qwen2-Audio-7B-Instruct")`` takes the real model from the hub (network needed);
``load("tiny-random-qwen2-audio")`` builds a random-weight model of the real class with a byte-level
tokenizer, offline, for tests and plumbing.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    WhisperFeatureExtractor,
)

from pipeline import tasks
from pipeline.engine.decoder import DecoderStack
from pipeline.engine.generate import Generation, PromptGroup, generate
from pipeline.engine.memory import footprint, free_device_bytes, max_batch
from pipeline.kernels import attention_kernels_usable
from pipeline.merging.config import ReductionConfig
from pipeline.models.base import WindowOutput
from pipeline.stats import WindowStats, batch_times
from pipeline.tasks import TaskRequest

AUDIO_TOKEN = "<|AUDIO|>"
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|audio_bos|>",
    AUDIO_TOKEN,
    "<|audio_eos|>",
)
TINY_RANDOM = "tiny-random-qwen2-audio"
CPU_BATCH = 8  # windows per generate call on CPU (no memory reading there; past this, little gain)
SAMPLE_RATE = 16000


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE tokenizer with no merges: 256 byte symbols + Qwen's special tokens."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_random_config(vocab_size: int, audio_token_id: int, num_layers: int = 4) -> Qwen2AudioConfig:
    return Qwen2AudioConfig(
        audio_config={
            "d_model": 32,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
        },
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        },
        audio_token_index=audio_token_id,
    )


def build_tiny_random(seed: int = 0, num_layers: int = 4) -> Qwen2AudioSpeechModel:
    """A random-weight Qwen2-Audio of the real class (fp32, CPU), deterministic for a seed."""
    tokenizer = byte_level_tokenizer()
    torch.manual_seed(seed)
    cfg = tiny_random_config(len(tokenizer), tokenizer.convert_tokens_to_ids(AUDIO_TOKEN), num_layers)
    cfg._attn_implementation = "sdpa"
    model = Qwen2AudioForConditionalGeneration(cfg).eval()
    return Qwen2AudioSpeechModel(
        model, tokenizer, WhisperFeatureExtractor(feature_size=128), name=TINY_RANDOM
    )


def load(name: str, device: str = "cpu", dtype: torch.dtype | None = None) -> Qwen2AudioSpeechModel:
    """Load by name: ``tiny-random-qwen2-audio`` offline, or a hub id such as ``Qwen/Qwen2-Audio-7B-Instruct``."""
    if name == TINY_RANDOM:
        speech_model = build_tiny_random()
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(name)
        model = Qwen2AudioForConditionalGeneration.from_pretrained(
            name, dtype=dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        ).eval()
        speech_model = Qwen2AudioSpeechModel(
            model, processor.tokenizer, processor.feature_extractor, name=name
        )
    return speech_model.to(device, dtype)


class Qwen2AudioSpeechModel:
    """SpeechModel for Qwen2-Audio-shaped models. Windows of any lengths decode together (equal
    audio-token counts share a prefill); on CUDA a batch holds as many windows as the free memory
    allows under the reduction (merged caches fit more), at most ``max_batch`` when given; on CPU
    ``max_batch`` or ``CPU_BATCH``."""

    sample_rate = SAMPLE_RATE
    max_window_s = 30.0
    tasks = frozenset({"asr", "st", "er", "sqa"})

    def __init__(
        self,
        model: Qwen2AudioForConditionalGeneration,
        tokenizer: PreTrainedTokenizerFast,
        feature_extractor: WhisperFeatureExtractor,
        name: str,
        max_new_tokens: int = 256,
        max_batch: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.feature_extractor = feature_extractor
        self.name = name
        self.max_new_tokens = max_new_tokens
        self.max_batch = max_batch
        inner = model.model
        self.audio_tower = inner.audio_tower
        self.projector = inner.multi_modal_projector
        self.stack = DecoderStack(inner.language_model, model.lm_head)
        self.audio_token_id = model.config.audio_token_id
        self.eos_token_ids = sorted(
            {tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")}
        )

    @property
    def device(self) -> str:
        return str(self.stack.device)

    def to(self, device: str, dtype: torch.dtype | None = None) -> Qwen2AudioSpeechModel:
        self.model.to(device=device, dtype=dtype)
        self.stack = DecoderStack(self.model.model.language_model, self.model.lm_head)
        return self

    # --- audio -> embeddings ------------------------------------------------------------------
    def features(self, waveforms: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Log-mel features [N, 128, 3000] and their frame mask [N, 3000] (30 s padding, as trained)."""
        out = self.feature_extractor(
            waveforms,
            sampling_rate=SAMPLE_RATE,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return out["input_features"], out["attention_mask"]

    def audio_token_counts(self, waveforms: list[np.ndarray]) -> list[int]:
        """Audio tokens each waveform becomes, from its length alone: the frames ``features`` marks
        valid (one per started hop, at most 30 s), through the audio tower's length arithmetic."""
        fe = self.feature_extractor
        frames = torch.tensor([min(-(-len(w) // fe.hop_length), fe.nb_max_frames) for w in waveforms])
        _, counts = self.audio_tower._get_feat_extract_output_lengths(frames)
        return counts.tolist()

    @torch.inference_mode()
    def encode(self, features: Tensor, frame_mask: Tensor) -> list[Tensor]:
        """Audio embeddings in the language model's space, one [n_i, D] tensor per clip."""
        device, dtype = self.stack.device, self.stack.dtype
        conv_lengths, counts = self.audio_tower._get_feat_extract_output_lengths(frame_mask.sum(-1))
        positions = torch.arange(features.shape[-1] // 2)
        valid = positions[None, :] < conv_lengths[:, None]  # [N, T] after the stride-2 convolution
        bias = torch.zeros(valid.shape[0], 1, valid.shape[1], valid.shape[1], dtype=dtype)
        bias.masked_fill_(~valid[:, None, None, :], torch.finfo(dtype).min)
        hidden = self.audio_tower(
            features.to(device, dtype), attention_mask=bias.to(device)
        ).last_hidden_state
        projected = self.projector(hidden)
        return [projected[i, :n] for i, n in enumerate(counts.tolist())]

    # --- prompt ----------------------------------------------------------------------------------
    def prompt(self, text: str, counts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a prompt whose i-th ``<|AUDIO|>`` expands to counts[i] placeholders, and the spans."""
        pieces = text.split(AUDIO_TOKEN)
        if len(pieces) - 1 != len(counts):
            raise ValueError(
                f"the prompt has {len(pieces) - 1} {AUDIO_TOKEN} placeholders for {len(counts)} clips"
            )
        ids: list[int] = []
        spans = []
        for i, piece in enumerate(pieces):
            ids += self.tokenizer.encode(piece, add_special_tokens=False)
            if i < len(counts):
                spans.append((len(ids), len(ids) + counts[i]))
                ids += [self.audio_token_id] * counts[i]
        return ids, spans

    def embed(self, ids: Tensor, spans: list[tuple[int, int]], audio: list[list[Tensor]]) -> Tensor:
        """ids [B, L]; audio[b][j] = clip j of row b -> input embeddings [B, L, D]."""
        embeds = self.stack.embed_tokens(ids.to(self.stack.device))
        for b, clips in enumerate(audio):
            for (s, e), clip in zip(spans, clips, strict=True):
                embeds[b, s:e] = clip.to(embeds.dtype)
        return embeds

    def generate_batch(
        self, prompt_text: str, clips: list[list[np.ndarray]], reduction: ReductionConfig
    ) -> tuple[Generation, float]:
        """Rows of clips (the same number per row, any lengths) -> (Generation, encode seconds).

        Rows whose clips give the same audio-token counts form one prompt group (one prefill); all
        rows decode together, each over its own cache lengths.
        """
        t0 = time.perf_counter()
        flat = [clip for row in clips for clip in row]
        features, mask = self.features(flat)
        encoded = self.encode(features, mask)
        if self.stack.device.type == "cuda":
            torch.cuda.synchronize()
        encode_s = time.perf_counter() - t0
        per_row = len(clips[0])
        audio = [encoded[i : i + per_row] for i in range(0, len(encoded), per_row)]
        by_counts: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for row, row_audio in enumerate(audio):
            by_counts[tuple(x.shape[0] for x in row_audio)].append(row)
        groups, order = [], []
        for counts, rows in by_counts.items():
            ids, spans = self.prompt(prompt_text, list(counts))
            ids_t = torch.tensor([ids] * len(rows))
            groups.append(PromptGroup(self.embed(ids_t, spans, [audio[r] for r in rows]), spans))
            order += rows
        reduction.check_layers(self.stack.num_layers)
        gen = generate(
            self.stack,
            groups,
            reduction,
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return _reorder(gen, order), encode_s

    # --- SpeechModel -------------------------------------------------------------------------------
    def run(
        self, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
    ) -> list[WindowOutput]:
        """Windows of any lengths, longest first, in batches that decode together (``batch_size`` of
        the batch's longest window)."""
        prompt_text = tasks.prompt(request)
        counts = self.audio_token_counts(waveforms)
        order = sorted(range(len(waveforms)), key=lambda i: -counts[i])
        outputs: list[WindowOutput | None] = [None] * len(waveforms)
        start = 0
        while start < len(order):
            size = self.batch_size(prompt_text, counts[order[start]], reduction)
            batch = order[start : start + size]
            gen, encode_s = self.generate_batch(prompt_text, [[waveforms[i]] for i in batch], reduction)
            times = batch_times(
                encode_s,
                gen.prefill_s,
                gen.decode_s,
                [plan.prompt_length for plan in gen.plans],  # groups prefill apart, each over its length
                gen.num_tokens.tolist(),
            )
            for row, i in enumerate(batch):
                outputs[i] = self._output(gen, row, times[row], len(waveforms[i]))
            start += size
        return outputs

    def batch_size(self, prompt_text: str, audio_tokens: int, reduction: ReductionConfig) -> int:
        """Windows of ``audio_tokens`` per generate call: on CUDA the largest batch whose caches and
        prefill activations fit the free memory (``pipeline.engine.memory``), at least 1."""
        device = self.stack.device
        if device.type != "cuda":
            return self.max_batch or CPU_BATCH
        ids, spans = self.prompt(prompt_text, [audio_tokens])
        need = footprint(
            self.stack,
            len(ids),
            spans,
            reduction,
            self.max_new_tokens,
            fused_mass=attention_kernels_usable(device, self.stack.head_dim),
        )
        fit = max(1, max_batch(free_device_bytes(device), need))
        return min(fit, self.max_batch or fit)

    def _output(self, gen: Generation, row: int, times: dict[str, float], samples: int) -> WindowOutput:
        n = int(gen.num_tokens[row])
        ids = [t for t in gen.tokens[row, :n].tolist() if t not in self.eos_token_ids]
        plan = gen.plans[row]
        per_token = self.stack.kv_bytes_per_token()
        stats = WindowStats(
            audio_seconds=samples / SAMPLE_RATE,
            audio_tokens_in=plan.audio_lengths[0],
            audio_tokens_kept=sum(plan.audio_lengths) / len(plan.audio_lengths),
            kv_bytes_full=plan.prompt_length * len(plan.cache_lengths) * per_token,
            kv_bytes_kept=sum(plan.cache_lengths) * per_token,
            generated_tokens=n,
            **times,
        )
        return WindowOutput(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), stats=stats)


def _reorder(gen: Generation, order: list[int]) -> Generation:
    """gen's rows are in group order: row j of gen is input row order[j]. Back to input order."""
    back = torch.argsort(torch.tensor(order, device=gen.tokens.device))
    return replace(
        gen,
        tokens=gen.tokens[back],
        num_tokens=gen.num_tokens[back],
        plans=[gen.plans[i] for i in back.tolist()],
        first_logits=None if gen.first_logits is None else gen.first_logits[back],
    )
