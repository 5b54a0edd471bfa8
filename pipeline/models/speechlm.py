"""Decoder-only SpeechLMs (audio encoder -> projector -> placeholder tokens -> a llama-family decoder),
run by our merge-aware engine. A family subclasses ``AudioLanguageModel`` and supplies its audio
encoder call (``encode``, ``audio_token_counts``), its decoder module and, for base checkpoints, its
plain prompts; prompts, batching (``pipeline.engine.batching``) and statistics are shared.

Prompts per checkpoint: an instruct checkpoint ships a chat template in its processor; each task's
prompt is that template applied to one user turn (the audio item, then the task's instruction) with
the generation prompt added, as the model cards do. Base checkpoints take the family's plain prompt.
Either way the text's audio placeholder expands to one placeholder token per audio embedding, so the
engine sees exactly the ids the checkpoint's own processor produces.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AutoProcessor

from pipeline import tasks
from pipeline.decoding.policy import LOOP_TOKENS, DecodePolicy
from pipeline.decoding.scheduler import Counters, Request, Scheduler
from pipeline.device import sync
from pipeline.engine.batching import AudioPrompt, embed, fit_batch, generate_rows
from pipeline.engine.generate import Generation
from pipeline.engine.plan import plan_layers
from pipeline.engine.runner import EngineRunner, capacity, engine_policy
from pipeline.engine.stack import DecoderStack
from pipeline.merging.config import ReductionConfig
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
from pipeline.stats import WindowStats
from pipeline.tasks import TaskRequest

# The processor's own chat template files; a template only in tokenizer_config.json does not make a
# checkpoint instruct (base LLM tokenizers often ship a generic one).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def chat_template(folder: Path | None) -> str | None:
    """The processor chat template a checkpoint folder ships, or None (a base checkpoint)."""
    if folder is None:
        return None
    jinja, as_json = (folder / name for name in CHAT_TEMPLATE_FILES)
    if jinja.is_file():
        return jinja.read_text()
    if as_json.is_file():
        return json.loads(as_json.read_text()).get("chat_template")
    processor_config = folder / "processor_config.json"
    if processor_config.is_file():
        return json.loads(processor_config.read_text()).get("chat_template")
    return None


def kind_of(ckpt: Checkpoint) -> str:
    """The kind the user asked for, else ``instruct`` when the checkpoint ships a chat template."""
    if ckpt.kind is not None:
        return ckpt.kind
    return "instruct" if chat_template(ckpt.folder) is not None else "base"


def _load_weights(model_class: type[nn.Module], ckpt: Checkpoint, dtype: torch.dtype) -> nn.Module:
    """``from_pretrained`` that refuses a partial load: weights missing from the checkpoint or of the
    wrong shape would otherwise be left random (transformers only warns)."""
    try:
        model, info = model_class.from_pretrained(
            ckpt.folder, dtype=dtype, output_loading_info=True, local_files_only=True
        )
    except Exception as err:  # a config transformers rejects, unreadable or mis-shaped weights: say which
        raise ModelError(f"{ckpt.name}: the checkpoint does not load ({type(err).__name__}: {err})") from err
    bad = {k: v for k, v in info.items() if k != "error_msgs" and v} | (
        {"errors": info["error_msgs"]} if info.get("error_msgs") else {}
    )
    if bad:
        raise ModelError(f"{ckpt.name}: the weights do not match the config: {bad}")
    return model.eval()


class AudioLanguageModel(ABC):
    """SpeechModel for decoder-only SpeechLMs. Windows stream through the engine's runner
    (pipeline/engine/runner.py): each is admitted into a free row as one finishes and prefills there
    (windows of equal audio-token counts admitted together share a pass) while the others decode. Rows
    (``pipeline.engine.batching.fit_batch``): as many 30 s windows as the free memory holds on CUDA
    under the reduction, at most ``batch_size`` when given.

    processor: the checkpoint's transformers processor (feature extractor + tokenizer + chat template).
    """

    audio_token: str  # the placeholder in prompt text that the processor expands per audio embedding
    model_class: type[nn.Module]  # the family's transformers class (``...ForConditionalGeneration``)

    def __init__(
        self,
        model: nn.Module,
        processor: object,
        description: ModelDescription,
        max_new_tokens: int = 256,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.feature_extractor = processor.feature_extractor
        self.description = description
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.stack = DecoderStack(self.text_model(), self.lm_head())
        self.audio_token_id = self.tokenizer.convert_tokens_to_ids(self.audio_token)
        self.eos_token_ids = self.stop_token_ids()
        self.runner: EngineRunner | None = None  # caches allocated once, re-made only when too small
        self.counters = Counters()  # what the runner's schedulers did, over every stream

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        describe: Callable[[Checkpoint, dict], ModelDescription],
        device: str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> AudioLanguageModel:
        """Weights (bf16 on CUDA, fp32 elsewhere unless ``dtype``) and processor from the checkpoint folder."""
        if dtype == INT8:  # the engine reads the decoder's weights itself: no quantized modules
            raise ModelError(f"{ckpt.name}: int8 is not supported for {cls.__name__} (Whisper models only)")
        dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
        model = _load_weights(cls.model_class, ckpt, dtype)
        processor = AutoProcessor.from_pretrained(ckpt.folder, local_files_only=True)
        return cls(model, processor, describe(ckpt, model.config.to_dict())).to(device, dtype)

    # --- what a family supplies --------------------------------------------------------------------
    def text_model(self) -> nn.Module:
        """The llama-family decoder (``LlamaModel``/``Qwen2Model``-shaped) the engine runs; where
        transformers' audio-LM classes keep it unless a family says otherwise."""
        return self.model.model.language_model

    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    @abstractmethod
    def encode(self, features: Tensor, frame_mask: Tensor) -> list[Tensor]:
        """Audio embeddings in the language model's space, one [n_i, D] tensor per clip."""

    @abstractmethod
    def audio_token_counts(self, waveforms: list[np.ndarray]) -> list[int]:
        """Audio embeddings each waveform becomes, from its length alone."""

    def plain_prompt(self, request: TaskRequest) -> str:
        """A base checkpoint's prompt text for one window (with one ``audio_token``)."""
        raise ModelError(f"{self.description.name}: base checkpoints of this family have no plain prompts")

    def instruction(self, request: TaskRequest) -> str:
        """What the user turn asks of an instruct checkpoint."""
        return tasks.instruction(request)

    def stop_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return sorted({i for i in ids if i is not None} | {self.tokenizer.eos_token_id})

    # --- shared ------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        return str(self.stack.device)

    def to(self, device: str, dtype: torch.dtype | None = None) -> AudioLanguageModel:
        self.model.to(device=device, dtype=dtype)
        self.stack = DecoderStack(self.text_model(), self.lm_head())
        self.runner = None
        return self

    def features(self, waveforms: list[np.ndarray]) -> tuple[Tensor, Tensor]:
        """Log-mel features [N, mels, 3000] and their frame mask [N, 3000] (30 s padding, as trained)."""
        out = self.feature_extractor(
            waveforms,
            sampling_rate=SAMPLE_RATE,
            return_attention_mask=True,
            padding="max_length",
            return_tensors="pt",
        )
        return out["input_features"], out["attention_mask"]

    def frames(self, waveforms: list[np.ndarray]) -> Tensor:
        """Valid feature frames of each waveform, as ``features`` marks them (one per started hop)."""
        fe = self.feature_extractor
        return torch.tensor([min(-(-len(w) // fe.hop_length), fe.nb_max_frames) for w in waveforms])

    def prompt_text(self, request: TaskRequest) -> str:
        """The task's prompt text with one audio placeholder: chat template or plain prompt."""
        check_request(self.description, request)
        if self.description.kind == "base":
            return self.plain_prompt(request)
        turn = [{"type": "audio", "audio": "window"}, {"type": "text", "text": self.instruction(request)}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": turn}], add_generation_prompt=True, tokenize=False
        )

    def prompt(self, text: str, counts: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of a prompt whose i-th audio placeholder expands to counts[i] tokens, and the spans."""
        pieces = text.split(self.audio_token)
        if len(pieces) - 1 != len(counts):
            raise ValueError(
                f"the prompt has {len(pieces) - 1} {self.audio_token} placeholders for {len(counts)} clips"
            )
        ids: list[int] = []
        spans = []
        for i, piece in enumerate(pieces):
            ids += self.tokenizer.encode(piece, add_special_tokens=False)
            if i < len(counts):
                spans.append((len(ids), len(ids) + counts[i]))
                ids += [self.audio_token_id] * counts[i]
        return ids, spans

    def generate_batch(
        self, prompt_text: str, clips: list[list[np.ndarray]], reduction: ReductionConfig
    ) -> tuple[Generation, float]:
        """Rows of clips (the same number per row, any lengths) -> (Generation in row order, encode s)."""
        t0 = time.perf_counter()
        features, mask = self.features([clip for row in clips for clip in row])
        encoded = self.encode(features, mask)
        sync(self.stack.device)
        encode_s = time.perf_counter() - t0
        per_row = len(clips[0])
        rows = []
        for first in range(0, len(encoded), per_row):
            audio = encoded[first : first + per_row]
            ids, spans = self.prompt(prompt_text, [a.shape[0] for a in audio])
            rows.append(AudioPrompt(tuple(ids), tuple(spans), tuple(audio)))
        gen = generate_rows(
            self.stack,
            rows,
            reduction,
            max_new_tokens=self.max_new_tokens,
            eos_token_ids=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            loop_tokens=LOOP_TOKENS,
        )
        return gen, encode_s

    def run(
        self, waveforms: list[np.ndarray], request: TaskRequest, reduction: ReductionConfig
    ) -> list[WindowOutput]:
        """Windows of any lengths (at most 30 s each) -> their outputs in order."""
        return run_streamed(self, waveforms, request, reduction)

    def stream(self, pull: Pull, request: TaskRequest, reduction: ReductionConfig, emit: Emit) -> None:
        """Windows decoded as they arrive: ``pull(block)`` gives (key, waveform) pairs (blocking only when
        no window is decoding; None once no more will come), and each window's output goes to
        ``emit(key, output)`` at the step it finishes (a waveform that is not a window: its ValueError)."""
        check_request(self.description, request, reduction=reduction)
        reduction.check_layers(self.stack.num_layers)
        text = self.prompt_text(request)
        policy = engine_policy(self.eos_token_ids, self.max_new_tokens, LOOP_TOKENS)
        runner = self._runner(text, reduction, policy)

        scheduler = Scheduler(runner.slots, window_feed(pull, emit))
        try:
            runner.run(
                scheduler,
                policy,
                reduction,
                lambda admitted: self._encode_requests(admitted, text),
                lambda r: emit(r.key, self._output(r)),
            )
        finally:
            self.counters += scheduler.counters

    def _runner(self, text: str, reduction: ReductionConfig, policy: DecodePolicy) -> EngineRunner:
        """The runner, its rows sized for a 30 s window's prompt under ``reduction``: the one already
        allocated when its rows are long enough (and, off CUDA, as many as ``batch_size`` asks)."""
        longest = self.audio_token_counts([np.zeros(int(WINDOW_S * SAMPLE_RATE), dtype=np.float32)])
        ids, spans = self.prompt(text, longest)
        need = capacity(plan_layers(len(ids), spans, reduction, self.stack.num_layers), policy)
        runner, cuda = self.runner, self.stack.device.type == "cuda"
        if (
            runner is not None
            and runner.holds(need)
            and (cuda or runner.slots == self._rows(len(ids), spans, reduction))
        ):
            return runner
        self.runner = None  # its memory counts as free for the new one's sizing
        rows = self._rows(len(ids), spans, reduction)
        if rows < 1:
            raise ModelError(
                f"{self.description.name}: not even one 30 s window's caches fit the free memory"
            )
        self.runner = EngineRunner(self.stack, rows, need)
        return self.runner

    def _rows(self, length: int, spans: list[tuple[int, int]], reduction: ReductionConfig) -> int:
        return fit_batch(self.stack, length, spans, reduction, self.max_new_tokens, self.batch_size)

    def _encode_requests(self, requests: list[Request], text: str) -> None:
        """The admitted windows through the audio encoder in one pass; each gets its prompt's embeddings."""
        start = time.perf_counter()
        features, mask = self.features([r.work for r in requests])
        encoded = self.encode(features, mask)
        sync(self.stack.device)
        share = (time.perf_counter() - start) / len(requests)
        for r, audio in zip(requests, encoded, strict=True):
            ids, spans = self.prompt(text, [audio.shape[0]])
            embeds = embed(self.stack, torch.tensor([ids]), spans, [[audio]])[0]
            r.state |= {
                "embeds": embeds,
                "spans": tuple(spans),
                "group": (len(ids), tuple(spans)),
                "encode_s": share,
            }

    def _output(self, request: Request) -> WindowOutput:
        state, plan = request.state, request.state["plan"]
        per_token = self.stack.kv_bytes_per_token()
        stats = WindowStats(
            audio_seconds=len(request.work) / SAMPLE_RATE,
            audio_tokens_in=plan.audio_lengths[0],
            audio_tokens_kept=sum(plan.audio_lengths) / len(plan.audio_lengths),
            kv_bytes_full=plan.prompt_length * len(plan.cache_lengths) * per_token,
            kv_bytes_kept=sum(plan.cache_lengths) * per_token,
            encode_s=state["encode_s"],
            prefill_s=state["prefill_s"],
            decode_s=state["decode_s"],
            generated_tokens=len(request.generated),
            loop_cuts=int(request.finish == "loop"),
        )
        ids = [t for t in request.generated if t not in self.eos_token_ids]
        return WindowOutput(text=self.tokenizer.decode(ids, skip_special_tokens=True).strip(), stats=stats)
