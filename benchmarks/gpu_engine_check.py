"""GPU correctness of the fast engine (CUDA graph + Triton kernels) against transformers.

1. tiny random Qwen2-Audio in fp32 on CUDA: our greedy tokens == transformers' generate, with and
   without a reduction at the last layer (which cannot reach the logits);
2. the bench's "small" shape in bf16: first-token logits within bf16 tolerance of transformers'
   forward, and the greedy tokens of 32 steps compared.
Prints one line per check and writes JSON to the path given as the first argument.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from jobs.bench import PREFIX, build_model, prompt_embeds
from pipeline.engine.decoder import DecoderStack
from pipeline.engine.generate import generate
from pipeline.merging.config import ReductionConfig
from pipeline.models.qwen2_audio import AUDIO_TOKEN, build_tiny_random


def audio_oracle() -> dict:
    qwen = build_tiny_random().to("cuda")
    qwen.max_new_tokens = 16
    rng = np.random.default_rng(0)
    rows = [[(0.1 * rng.standard_normal(48000)).astype(np.float32)] for _ in range(3)]
    prompt = f"<|audio_bos|>{AUDIO_TOKEN}<|audio_eos|>Transcribe:"
    features, mask = qwen.features([r[0] for r in rows])
    ids, _ = qwen.prompt(prompt, qwen.audio_token_counts(mask)[:1])
    input_ids = torch.tensor([ids] * 3, device="cuda")
    ref = qwen.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        input_features=features.cuda(),
        feature_attention_mask=mask.cuda(),
        max_new_tokens=16,
        do_sample=False,
        eos_token_id=qwen.eos_token_ids,
        pad_token_id=qwen.tokenizer.pad_token_id,
    )[:, input_ids.shape[1] :].cpu()
    plain, _ = qwen.generate_batch(prompt, rows, ReductionConfig())
    last = ReductionConfig(method="fastadasp", schedule="single", first_layer=3, ratio=0.5)
    merged, _ = qwen.generate_batch(prompt, rows, last)
    n = plain.tokens.shape[1]
    return {
        "audio_oracle_equal": bool(torch.equal(plain.tokens.cpu(), ref[:, :n])),
        "last_layer_merge_equal": bool(torch.equal(plain.tokens, merged.tokens)),
    }


def bf16_small() -> dict:
    model = build_model("small", torch.device("cuda"), torch.bfloat16)
    embeds, spans = prompt_embeds(model, 4, 750)
    with torch.inference_mode():
        ref_logits = model(inputs_embeds=embeds, logits_to_keep=1).logits[:, -1].float()
        ref = model.generate(inputs_embeds=embeds, max_new_tokens=32, do_sample=False, pad_token_id=0)
        stack = DecoderStack(model.model, model.lm_head)
        gen = generate(
            stack, embeds, spans, ReductionConfig(), max_new_tokens=32, eos_token_ids=[], pad_token_id=0
        )
    err = (gen.first_logits - ref_logits).abs().max().item() / ref_logits.abs().max().item()
    agree = (gen.tokens == ref[:, : gen.tokens.shape[1]]).float()
    first_diff = [int(row.argmin()) if not bool(row.all()) else 32 for row in agree]
    return {"bf16_first_logits_rel_err": err, "bf16_steps_identical_per_row": first_diff, "prefix": PREFIX}


if __name__ == "__main__":
    results = {}
    for check in (audio_oracle, bf16_small):
        try:
            results.update(check())
        except Exception as exc:  # report and go on: one failed check must not hide the others
            results[check.__name__] = f"FAILED: {exc!r}"
        print(check.__name__, {k: v for k, v in results.items()}, flush=True)
    with open(sys.argv[1], "w") as f:
        json.dump(results, f, indent=1)
