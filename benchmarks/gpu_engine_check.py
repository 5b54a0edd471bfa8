"""GPU correctness of the fast engine (CUDA graph + Triton kernels) against transformers.

1. tiny random Qwen2-Audio in fp32 on CUDA: our greedy tokens == transformers' generate, with and
   without a reduction at the last layer (which cannot reach the logits); windows of three lengths
   decoded in one batch give each row's tokens alone;
2. the bench's "small" shape in bf16 and in fp32: first-token logits against transformers' forward,
   the greedy tokens of 32 steps compared, and the logit gaps where a row diverges.
Prints one line per check and writes JSON to the path given as the first argument.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import numpy as np
import torch

from benchmarks.common import PREFIX, SHAPES, build_model, prompt_embeds
from pipeline.engine.generate import generate
from pipeline.engine.prefill import PromptGroup
from pipeline.engine.stack import DecoderStack
from pipeline.merging.config import ReductionConfig
from pipeline.models.qwen2_audio import AUDIO_TOKEN
from pipeline.models.tiny_random import build_tiny_random

DEVICE = os.environ.get("CHECK_DEVICE", "cuda")  # "cpu" only to try the script itself here


def audio_oracle() -> dict:
    qwen = build_tiny_random().to(DEVICE)
    qwen.max_new_tokens = 16
    rng = np.random.default_rng(0)
    rows = [[(0.1 * rng.standard_normal(48000)).astype(np.float32)] for _ in range(3)]
    prompt = f"<|audio_bos|>{AUDIO_TOKEN}<|audio_eos|>Transcribe:"
    features, mask = qwen.features([r[0] for r in rows])
    ids, _ = qwen.prompt(prompt, qwen.audio_token_counts([rows[0][0]]))
    input_ids = torch.tensor([ids] * 3, device=DEVICE)
    ref = qwen.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        input_features=features.to(DEVICE),
        feature_attention_mask=mask.to(DEVICE),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=qwen.eos_token_ids,
        pad_token_id=qwen.tokenizer.pad_token_id,
    )[:, input_ids.shape[1] :].cpu()
    plain, _ = qwen.generate_batch(prompt, rows, ReductionConfig())
    last = ReductionConfig(method="fastadasp", schedule="single", first_layer=3, ratio=0.5)
    merged, _ = qwen.generate_batch(prompt, rows, last)
    n = plain.tokens.shape[1]
    # Windows of different lengths decode in one batch (per-row cache lengths in the Triton kernels
    # and the CUDA graph): each row as it is alone.
    ragged = [[r[0][:length]] for r, length in zip(rows, (48000, 30000, 40000), strict=True)]
    cfg = ReductionConfig(method="fastadasp", schedule="constant", first_layer=0, target=0.3)
    together, _ = qwen.generate_batch(prompt, ragged, cfg)
    alone = [qwen.generate_batch(prompt, [row], cfg)[0] for row in ragged]
    return {
        "audio_oracle_equal": bool(torch.equal(plain.tokens.cpu(), ref[:, :n])),
        "last_layer_merge_equal": bool(torch.equal(plain.tokens, merged.tokens)),
        "ragged_rows_equal_alone": all(
            torch.equal(together.tokens[i, : int(a.num_tokens[0])], a.tokens[0, : int(a.num_tokens[0])])
            for i, a in enumerate(alone)
        ),
    }


def _small(dtype: torch.dtype) -> dict:
    """The bench's "small" shape: first-token logits against transformers' forward, 32 greedy steps
    against its generate, and where a row diverges, transformers' own logits at that step (the common
    prefix teacher-forced): its top-2 gap and how far below its top our token lies (a near-tie when
    both are within the dtype's rounding of logits of this scale)."""
    name = str(dtype).removeprefix("torch.")
    model = build_model(SHAPES["small"], DEVICE, dtype)
    embeds, spans = prompt_embeds(model, 4, 750)
    with torch.inference_mode():
        ref_logits = model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1].float()
        ref = model.generate(inputs_embeds=embeds, max_new_tokens=32, do_sample=False, pad_token_id=0)
        stack = DecoderStack(model.model, model.lm_head)
        gen = generate(
            stack,
            [PromptGroup(embeds, spans)],
            ReductionConfig(),
            max_new_tokens=32,
            eos_token_ids=[],
            pad_token_id=0,
        )
        ours = gen.tokens
        agree = (ours == ref[:, : ours.shape[1]]).float()
        first_diff = [int(row.argmin()) if not bool(row.all()) else ours.shape[1] for row in agree]
        gaps = []
        for row, step in enumerate(first_diff):
            if step == ours.shape[1]:
                continue
            prefix = model.get_input_embeddings()(ref[row, :step])[None]
            x = torch.cat([embeds[row : row + 1], prefix], dim=1)
            logits = model(inputs_embeds=x, logits_to_keep=1).logits[0, -1].float()
            top2 = logits.topk(2).values
            gaps.append(
                {
                    "row": row,
                    "step": step,
                    "top2_gap": float(top2[0] - top2[1]),
                    "top_minus_ours": float(logits[ref[row, step]] - logits[ours[row, step]]),
                    "max_abs_logit": float(logits.abs().max()),
                }
            )
    err = (gen.first_logits - ref_logits).abs().max().item() / ref_logits.abs().max().item()
    return {
        f"{name}_first_logits_rel_err": err,
        f"{name}_steps_identical_per_row": first_diff,
        f"{name}_divergence_logit_gaps": gaps,
        "prefix": PREFIX,
    }


def bf16_small() -> dict:
    return _small(torch.bfloat16)


def fp32_small() -> dict:
    """The same shape in fp32: identical tokens here make the bf16 divergence a rounding effect."""
    return _small(torch.float32)


if __name__ == "__main__":
    results = {}
    for check in (audio_oracle, bf16_small, fp32_small):
        try:
            results.update(check())
        except Exception as exc:  # report and go on: one failed check must not hide the others
            results[check.__name__] = f"FAILED: {exc!r}"
        print(check.__name__, {k: v for k, v in results.items()}, flush=True)
        with open(sys.argv[1], "w") as f:  # after every check: a time limit keeps the earlier ones
            json.dump(results, f, indent=1)
