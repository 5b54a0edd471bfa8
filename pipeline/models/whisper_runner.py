"""Whisper's decoding runner: greedy decoding (no timestamps) of windows in a continuously refilled batch.

Our own loop over the weights of transformers' ``WhisperDecoderLayer`` modules (as whisper_encoder.py
does for the encoder), with the same arithmetic. Every row is at its own step: it feeds its prompt one
token per step, then what it generated, at its own position, and reads only its own encoder output
(a cross-attention key bias: -inf past the row's length, the log of its size on a merged padding
token). A row that finishes leaves the batch at that step and the next waiting window takes its slot
while the others keep decoding (pipeline/decoding/scheduler.py); stopping, suppressions, the loop guard
and language detection are the shared ``DecodePolicy`` (pipeline/decoding/policy.py). Without reduction
it decodes what ``WhisperForConditionalGeneration.generate`` decodes.

Buffers are allocated once per runner (one per loaded model), ``slots`` rows each: per decoder layer the
self-attention keys/values (slots, H, max_length, hd) and the encoder outputs' cross-attention keys
and values, transposed, (slots, H, hd, S) for the running rows' longest encoder output S (the storage
holds the full 1,500 positions; the view is laid out afresh when S grows or the longest row left).
The live rows are the buffers' first rows, so a step's products read contiguous memory: on a CPU a step
reads every row's cross K/V and the output projection once, and both products of a step read
contiguous rows of the transposed layout, which beats SDPA's CPU kernel for one query (compare against
``F.scaled_dot_product_attention`` before changing the layout).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.decoding.policy import DecodePolicy, choose
from pipeline.decoding.scheduler import Request, Scheduler
from pipeline.device import sync
from pipeline.models.whisper_encoder import split_heads

if TYPE_CHECKING:  # transformers' modeling modules take seconds to import; describing a model needs none
    from transformers import WhisperForConditionalGeneration
    from transformers.models.whisper.modeling_whisper import WhisperDecoderLayer

# The running rows' cross K/V are laid out afresh (one copy of them, about one step's reads) when their
# longest encoder output falls below this share of the layout's width.
_SHRINK_BELOW = 0.75


@dataclass(frozen=True)
class Encoded:
    """What a request needs to decode: its encoder output ``states`` (S, D) and ``key_bias`` (S,) or
    None (no merged padding)."""

    states: Tensor
    key_bias: Tensor | None


@dataclass(frozen=True)
class CrossKV:
    """Cross-attention keys and values (per decoder layer, (B, H, hd, S)) and their bias (B, 1, 1, S) or
    None: what a decoder pass reads of encoder outputs."""

    keys: list[Tensor]
    values: list[Tensor]
    bias: Tensor | None


def cross_kv(model: WhisperForConditionalGeneration, states: Tensor, key_bias: Tensor | None) -> CrossKV:
    """The cross K/V of encoder outputs ``states`` (B, S, D) with their ``key_bias`` (B, S) or None."""
    keys, values = [], []
    for layer in model.model.decoder.layers:
        attn = layer.encoder_attn
        for proj, out in ((attn.k_proj, keys), (attn.v_proj, values)):
            out.append(
                proj(states).view(*states.shape[:2], attn.num_heads, -1).permute(0, 2, 3, 1).contiguous()
            )
    return CrossKV(keys, values, None if key_bias is None else key_bias.to(states)[:, None, None])


def _cross_queries(layer: WhisperDecoderLayer, x: Tensor) -> Tensor:
    """Layer ``layer``'s cross-attention queries (B, H, T, hd) of hidden states x (B, T, D), scaled."""
    attn = layer.encoder_attn
    return split_heads(attn.q_proj(layer.encoder_attn_layer_norm(x)) * attn.scaling, attn.num_heads)


def _attention_weights(q: Tensor, keys: Tensor, bias: Tensor | None) -> Tensor:
    """softmax(q @ keys + bias) in fp32, as SDPA's kernels: q (..., T, hd), keys (..., hd, S)."""
    scores = q @ keys
    if bias is not None:
        scores = scores + bias
    return scores.float().softmax(dim=-1).to(q.dtype)


def head_keys(
    model: WhisperForConditionalGeneration,
    states: Tensor,
    key_bias: Tensor | None,
    heads: list[tuple[int, int]],
) -> tuple[dict[tuple[int, int], Tensor], Tensor | None]:
    """The cross-attention keys of ``heads`` alone ((layer, head) -> (B, hd, S)) for encoder outputs
    ``states`` (B, S, D) with their ``key_bias`` (B, S) or None, and that bias as the weights add it:
    what word timing reads of an encoder output the decoder did not (``EncoderOutput.timing``), at a
    sixth of projecting every layer's keys and values on tiny.en (8 heads of 24, keys only)."""
    keys = {}
    for i in sorted({layer for layer, _ in heads}):
        proj = model.model.decoder.layers[i].encoder_attn.k_proj
        chosen = [h for layer, h in heads if layer == i]
        hd = proj.out_features // model.config.decoder_attention_heads
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd, device=states.device) for h in chosen])
        bias = None if proj.bias is None else proj.bias[rows]
        projected = F.linear(states, proj.weight[rows], bias)  # (B, S, heads * hd)
        for j, h in enumerate(chosen):
            keys[i, h] = projected[..., j * hd : (j + 1) * hd].transpose(1, 2)
    return keys, None if key_bias is None else key_bias.to(states)[:, None]


def _cross_attention(
    layer: WhisperDecoderLayer, x: Tensor, cross: CrossKV, i: int, weights: Tensor
) -> Tensor:
    out = cross.values[i] @ weights.transpose(-1, -2)  # (B, H, hd, T)
    return x + layer.encoder_attn.out_proj(out.permute(0, 3, 1, 2).reshape(x.shape))


def _mlp(layer: WhisperDecoderLayer, hidden: Tensor) -> Tensor:
    return hidden + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(hidden))))


def _vocab_logits(proj: nn.Module, h: Tensor) -> Tensor:
    """h (B, D) -> logits (B, vocab). A float projection computes them as ``weight @ h.T``, (vocab, B),
    returned transposed: for a small decoder batch CPU sgemm takes that shape faster than
    ``h @ weight.T`` (benchmarks/cpu-peer-longform-dev/README.md), and this product is the largest of a
    step. Quantized projections (int8) are called as they are."""
    if isinstance(proj, nn.Linear) and proj.bias is None:
        return (proj.weight @ h.T).T
    return proj(h)


def token_logprobs(logits: Tensor, chosen: Tensor) -> Tensor:
    """log p(chosen[b]) under logits (B, V), in float32. Each row's exponentials are taken relative to
    its chosen logit and summed by a product with ones: reductions along the vocabulary of the
    transposed logits ``_vocab_logits`` returns are several times slower (log_softmax, logsumexp). A
    token suppressed 88 nats above the chosen one makes it -inf, a probability below float32's."""
    rows = torch.arange(len(chosen), device=logits.device)
    shifted = (logits.T.float() - logits[rows, chosen].float()).exp_()  # (V, B)
    return -(shifted.new_ones(1, shifted.shape[0]) @ shifted)[0].log_()


class WhisperRunner:
    """Greedy decoding of requests in ``slots`` rows of one live batch.

    A request's ``work`` is what ``encode`` turns into its ``Encoded`` (set as ``state["encoded"]``) as
    the request is admitted; requests that arrive encoded skip it. ``run`` returns as the queue
    drains; each finished request goes to ``done`` at the step it finishes, while its slot still holds its
    cross K/V (``row_cross``): word timing reads them there.

    Per request, ``state`` gains measured times: "prefill_s" (its share of projecting its encoder output
    to cross K/V and of the steps that fed its prompt) and "decode_s" (its share of the steps that
    generated its tokens): a step's time is shared equally among the rows it computed.
    """

    def __init__(
        self, model: WhisperForConditionalGeneration, slots: int, heads: list[tuple[int, int]] | None = None
    ) -> None:
        self.model = model
        self.slots = slots
        self.recorded = list(heads or ())
        self._by_layer = {i: [h for layer, h in self.recorded if layer == i] for i, _ in self.recorded}
        config = model.config
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.max_length = config.max_target_positions
        self.width = 0  # encoder positions the cross K/V view holds per row (0: nothing laid out yet)
        like = next(model.parameters())
        shape = (slots, self.heads, self.max_length, self.head_dim)
        layers = config.decoder_layers
        # Zeros, not garbage: a row's keys past its length are masked, but a masked NaN still poisons
        # the products (NaN - inf, 0 * NaN); everything written later is finite.
        self.keys = [like.new_zeros(shape) for _ in range(layers)]
        self.values = [like.new_zeros(shape) for _ in range(layers)]
        storage = slots * self.heads * self.head_dim * config.max_source_positions
        self._cross_storage = [like.new_zeros(2, storage) for _ in range(layers)]
        self._bias_storage = like.new_zeros(slots * config.max_source_positions)
        self.cross = CrossKV([], [], None)
        # per layer holding a recorded head: those heads' cross-attention queries at each fed position,
        # and the heads' indices on the model's device (a step indexes with them, no host list per step)
        self.queries = {
            i: like.new_zeros(slots, self.max_length, len(chosen), self.head_dim)
            for i, chosen in self._by_layer.items()
        }
        self._head_index = {
            i: torch.tensor(chosen, device=like.device) for i, chosen in self._by_layer.items()
        }

    @staticmethod
    def row_bytes(model: WhisperForConditionalGeneration) -> int:
        """A slot's buffers: self-attention K/V over the decoder's positions, cross K/V over the encoder's."""
        config = model.config
        per_layer = 2 * config.d_model * (config.max_target_positions + config.max_source_positions)
        return (config.decoder_layers * per_layer + config.max_source_positions) * model.dtype.itemsize

    def _layout(self, width: int, keep_rows: int) -> None:
        """Lay the cross K/V views out for ``width`` positions per row, the first ``keep_rows`` rows'
        contents carried over (the storage is shared, so they are copied out first)."""
        keep = min(width, self.width)
        old = (*self.cross.keys, *self.cross.values)
        kept = [t[:keep_rows, ..., :keep].clone() for t in old] if keep_rows else []
        kept_bias = self.cross.bias[:keep_rows, ..., :keep].clone() if keep_rows else None
        shape = (self.slots, self.heads, self.head_dim, width)
        numel = shape[0] * shape[1] * shape[2] * width
        keys = [s[0, :numel].view(shape) for s in self._cross_storage]
        values = [s[1, :numel].view(shape) for s in self._cross_storage]
        bias = self._bias_storage[: self.slots * width].view(self.slots, 1, 1, width)
        for new, contents in zip((*keys, *values), kept, strict=False):
            new[:keep_rows, ..., :keep] = contents
        if kept_bias is not None:
            bias[:keep_rows, ..., :keep] = kept_bias
            bias[:keep_rows, ..., keep:] = -float("inf")
        self.width = width
        self.cross = CrossKV(keys, values, bias)

    def row_cross(self, request: Request) -> CrossKV:
        """A running request's cross K/V (batch of one), as its steps read them."""
        s, n = request.slot, request.state["encoded"].states.shape[0]
        return CrossKV(
            [k[s : s + 1, ..., :n] for k in self.cross.keys],
            [v[s : s + 1, ..., :n] for v in self.cross.values],
            self.cross.bias[s : s + 1, ..., :n],
        )

    def head_weights(
        self,
        request: Request,
        timing: tuple[dict[tuple[int, int], Tensor], Tensor | None] | None = None,
    ) -> Tensor:
        """The recorded heads' cross-attention weights (heads, fed, S) at each position ``request`` fed, in
        float32, from the queries its steps recorded (``run(..., timing=True)``): over the keys the steps
        read (its slot's), or over ``timing``, ``head_keys`` of another encoder output (batch of one).
        Greedy decoding fed every decided token, so these are the weights a teacher-forced pass over its
        prompt and tokens would give, without running the decoder again."""
        s, fed = request.slot, request.fed
        cross = self.row_cross(request)
        out = []
        for i, h in self.recorded:
            q = self.queries[i][s, :fed, self._by_layer[i].index(h)]  # (fed, hd)
            if timing is None:
                keys, bias = cross.keys[i][0, h], cross.bias[0, 0]
            else:
                keys, bias = timing[0][i, h][0], None if timing[1] is None else timing[1][0]
            out.append(_attention_weights(q, keys, bias).float())
        return torch.stack(out)

    def _install(self, admitted: list[Request]) -> None:
        """The admitted requests' cross K/V and key bias into their slots."""
        for request in admitted:
            enc: Encoded = request.state["encoded"]
            s, n = request.slot, enc.states.shape[0]
            projected = cross_kv(
                self.model, enc.states[None], None if enc.key_bias is None else enc.key_bias[None]
            )
            for dst, src in zip(
                (*self.cross.keys, *self.cross.values), (*projected.keys, *projected.values), strict=True
            ):
                dst[s, ..., :n] = src[0]
            bias = self.cross.bias[s, 0, 0]
            bias[:n] = 0.0 if enc.key_bias is None else enc.key_bias.to(bias)
            bias[n:] = -float("inf")

    def _move(self, src: int, request: Request) -> None:
        """``request``'s row from slot src into its new slot: only what it wrote (its fed positions, its
        encoder positions) and its whole key bias row (the -inf past its length)."""
        dst, fed, n = request.slot, request.fed, request.state["encoded"].states.shape[0]
        for t in (*self.keys, *self.values):
            t[dst, :, :fed] = t[src, :, :fed]
        for t in self.queries.values():
            t[dst, :fed] = t[src, :fed]
        for t in (*self.cross.keys, *self.cross.values):
            t[dst, ..., :n] = t[src, ..., :n]
        self.cross.bias[dst] = self.cross.bias[src]

    def _step(self, tokens: Tensor, positions: Tensor, length: int, record: bool = False) -> Tensor:
        """One decoder step of the live rows: tokens (n,) at positions (n,) -> next-token logits (n, vocab).
        length: the longest row's position + 1 (the self-attention keys any row reads). record: keep the
        recorded heads' cross-attention queries at these positions."""
        n = tokens.shape[0]
        decoder = self.model.model.decoder
        hidden = (decoder.embed_tokens(tokens) + decoder.embed_positions.weight[positions])[:, None]
        rows = torch.arange(n, device=tokens.device)
        mask = None
        if bool((positions != length - 1).any()):  # rows at different steps: each reads its own keys
            mask = (torch.arange(length, device=tokens.device) <= positions[:, None])[:, None, None]
        cross = CrossKV(
            [k[:n] for k in self.cross.keys], [v[:n] for v in self.cross.values], self.cross.bias[:n]
        )
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            h = layer.self_attn_layer_norm(hidden)
            q = split_heads(attn.q_proj(h) * attn.scaling, attn.num_heads)
            self.keys[i][rows, :, positions] = split_heads(attn.k_proj(h), attn.num_heads)[:, :, 0]
            self.values[i][rows, :, positions] = split_heads(attn.v_proj(h), attn.num_heads)[:, :, 0]
            k, v = self.keys[i][:n, :, :length], self.values[i][:n, :, :length]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
            hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(hidden.shape))
            q = _cross_queries(layer, hidden)
            if record and i in self.queries:
                self.queries[i][rows, positions] = q[:, self._head_index[i], 0]
            weights = _attention_weights(q, cross.keys[i], cross.bias)
            hidden = _mlp(layer, _cross_attention(layer, hidden, cross, i, weights))
        return _vocab_logits(self.model.proj_out, decoder.layer_norm(hidden[:, 0]))

    @torch.inference_mode()
    def run(
        self,
        scheduler: Scheduler,
        policy: DecodePolicy,
        encode: Callable[[list[Request]], None] | None = None,
        done: Callable[[Request], None] | None = None,
        timing: bool = False,
    ) -> None:
        """Decode every request of ``scheduler`` until its queue drains and its feed is exhausted.

        encode(admitted): sets each admitted request's ``state["encoded"]``. done(request): a request
        finished (its slot still holds its cross K/V and recorded queries). timing: what word timing
        reads, kept: each generated token's log-probability (``Request.logprobs``, the words'
        probabilities) and the recorded heads' queries (``head_weights``).
        """
        if scheduler.slots > self.slots:
            raise ValueError(f"the scheduler has {scheduler.slots} slots, the runner {self.slots}")
        device = self.keys[0].device
        suppress, begin_suppress = policy.masks(device)
        detect = torch.tensor(policy.detect, dtype=torch.long, device=device)
        while scheduler.pending():
            admitted = self._admit(scheduler, policy, encode)
            if not scheduler.running:
                continue
            running = scheduler.running
            sync(device)
            start = time.perf_counter()
            width = max(r.state["encoded"].states.shape[0] for r in running)
            if width > self.width or width < _SHRINK_BELOW * self.width:
                self._layout(width, len(running) - len(admitted))
            if admitted:
                self._install(admitted)
                sync(device)
                share = (time.perf_counter() - start) / len(admitted)
                for r in admitted:
                    r.state["prefill_s"] = r.state.get("prefill_s", 0.0) + share
                start = time.perf_counter()
            tokens = torch.tensor(
                [r.prompt[r.fed] if r.fed < len(r.prompt) else r.generated[-1] for r in running],
                device=device,
            )
            positions = torch.tensor([r.fed for r in running], device=device)
            logits = self._step(tokens, positions, max(r.fed for r in running) + 1, timing)
            scheduler.step()
            for r in running:
                r.fed += 1
            prompting = [r.fed < len(r.prompt) or (policy.detect and r.fed == 1) for r in running]
            first = torch.tensor([not r.generated for r in running], device=device)
            chosen = choose(logits, first, suppress, begin_suppress)
            picked = chosen.tolist()
            languages = (
                detect[logits[:, detect].argmax(dim=-1)].tolist()
                if policy.detect and any(r.fed == 1 for r in running)
                else None
            )
            kept = None
            if timing:
                kept = token_logprobs(logits, chosen).tolist()
            elapsed = time.perf_counter() - start
            finished = []
            for b, r in enumerate(running):
                key = "prefill_s" if prompting[b] else "decode_s"
                r.state[key] = r.state.get(key, 0.0) + elapsed / len(running)
                if policy.detect and r.fed == 1:
                    r.prompt = policy.row_prompt(languages[b])
                    if policy.budget == 0:
                        r.finish = "length"
                        finished.append(r)
                    continue
                if prompting[b]:
                    continue
                if policy.take(r, picked[b], None if kept is None else kept[b]):
                    finished.append(r)
            for r in finished:
                self._retire(scheduler, r, done)

    def _admit(
        self, scheduler: Scheduler, policy: DecodePolicy, encode: Callable[[list[Request]], None] | None
    ) -> list[Request]:
        """Waiting requests into free slots, encoded, each about to feed its prompt."""
        admitted = scheduler.admit()
        todo = [r for r in admitted if "encoded" not in r.state]
        if todo and encode is not None:
            encode(todo)
        for r in admitted:
            r.prompt = [policy.prompt[0]] if policy.detect else list(policy.prompt)
        return admitted

    def _retire(self, scheduler: Scheduler, request: Request, done: Callable[[Request], None] | None) -> None:
        if done is not None:
            done(request)  # while its slot still holds its cross K/V
        moved = scheduler.retire(request)
        if moved is not None:
            src, dst = moved
            self._move(src, scheduler.running[dst])
