"""The merge engine against transformers on tiny random-weight checkpoints of both decoder-only families
(Qwen2-Audio and GLM-ASR), saved and loaded as real checkpoints are (fp32, CPU)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.decoding.policy import LOOP_TOKENS, loop_start
from pipeline.engine.batching import embed
from pipeline.engine.plan import plan_layers
from pipeline.engine.prefill import PromptGroup, prefill
from pipeline.kernels.paths import forced_path, supported_head_dim
from pipeline.merging.config import METHODS, NO_REDUCTION, ReductionConfig
from pipeline.models.registry import load_model
from pipeline.tasks import TaskRequest

NEW_TOKENS = 12
# family -> its tiny instruct checkpoint (tests/conftest.py: checkpoints)
INSTRUCT = {"qwen2_audio": "qwen-instruct", "glm_asr": "glm"}
# The keyword each family's transformers class takes for the feature frame mask.
MASK_ARG = {"qwen2_audio": "feature_attention_mask", "glm_asr": "input_features_mask"}


@pytest.fixture(scope="module")
def models(checkpoints):
    return {family: load_model(str(checkpoints[key])) for family, key in INSTRUCT.items()}


@pytest.fixture(params=list(INSTRUCT))
def qwen(request, models):
    """Each family's tiny instruct checkpoint in turn (named for the first family the tests covered)."""
    return models[request.param]


def prompts(model) -> tuple[str, str]:
    """The checkpoint's own one-clip asr prompt, and a plain prompt with two clips."""
    return model.prompt_text(TaskRequest("asr")), f"{model.audio_token} and {model.audio_token} compare:"


def clip(seed: int, seconds: float = 3.0) -> np.ndarray:
    """A deterministic 'speech-like' clip: a few gliding tones with noise bursts."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    f0 = rng.uniform(100, 300) * (1 + 0.3 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
    wave = 0.3 * np.sin(2 * np.pi * np.cumsum(f0) / 16000) + 0.05 * rng.standard_normal(t.size)
    return (wave * (np.sin(2 * np.pi * 2 * t) > -0.3)).astype(np.float32)


def hf_generate(
    qwen, prompt: str | int, rows: list[list[np.ndarray]], eos: list[int], new_tokens: int = NEW_TOKENS
) -> torch.Tensor:
    """transformers' own greedy generate on the same expanded prompt; returns the new tokens."""
    flat = [c for row in rows for c in row]
    features, mask = qwen.features(flat)
    counts = qwen.audio_token_counts(flat)
    ids, _ = qwen.prompt(_text(qwen, prompt), counts[: len(rows[0])])
    input_ids = torch.tensor([ids] * len(rows))
    out = qwen.model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        input_features=features,
        **{MASK_ARG[qwen.description.family]: mask},
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=qwen.tokenizer.pad_token_id,
    )
    return out[:, input_ids.shape[1] :]


def ours(
    qwen,
    prompt: str | int,
    rows: list[list[np.ndarray]],
    cfg: ReductionConfig = NO_REDUCTION,
    new_tokens: int = NEW_TOKENS,
):
    """Our engine on ``prompt`` (text, or ONE / TWO for the model's own prompts)."""
    qwen.max_new_tokens = new_tokens
    gen, _ = qwen.generate_batch(_text(qwen, prompt), rows, cfg)
    return gen


ONE, TWO = 0, 1


def _text(qwen, prompt: str | int) -> str:
    return prompt if isinstance(prompt, str) else prompts(qwen)[prompt]


def assert_same_tokens(gen, reference: torch.Tensor, eos: list[int]) -> None:
    """Row by row, our tokens up to and including EOS equal transformers' tokens."""
    for row in range(reference.shape[0]):
        n = int(gen.num_tokens[row])
        assert gen.tokens[row, :n].tolist() == reference[row, :n].tolist()
        if n < NEW_TOKENS:
            assert reference[row, n - 1].item() in eos


@pytest.mark.parametrize(
    ("prompt", "rows"),
    [
        (ONE, [[clip(1)]]),
        (ONE, [[clip(1)], [clip(2)], [clip(3)]]),
        (TWO, [[clip(4, 2.0), clip(5, 3.0)]]),
    ],
    ids=["batch1", "batch3", "two-clips"],
)
def test_no_reduction_equals_transformers_generate(qwen, prompt, rows):
    eos = qwen.eos_token_ids
    assert_same_tokens(ours(qwen, prompt, rows), hf_generate(qwen, prompt, rows, eos), eos)


def test_eos_stops_like_transformers(qwen):
    rows = [[clip(1)], [clip(2)]]
    free = ours(qwen, ONE, rows)
    eos = [int(free.tokens[0, 3])]  # make the 4th token of row 0 an EOS
    qwen.eos_token_ids, saved = eos, qwen.eos_token_ids
    try:
        gen = ours(qwen, ONE, rows)
        reference = hf_generate(qwen, ONE, rows, eos)
    finally:
        qwen.eos_token_ids = saved
    assert int(gen.num_tokens[0]) <= 4
    assert (gen.tokens[0, int(gen.num_tokens[0]) :] == qwen.tokenizer.pad_token_id).all()
    assert_same_tokens(gen, reference, eos)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_reduction_at_last_layer_cannot_reach_the_logits(qwen, method):
    rows = [[clip(1)], [clip(2)]]
    last = qwen.stack.num_layers - 1
    ratio = 0.4 if method == "a-tome" else 0.6
    cfg = ReductionConfig(method=method, schedule="single", first_layer=last, ratio=ratio)
    plain, merged = ours(qwen, ONE, rows), ours(qwen, ONE, rows, cfg)
    assert torch.equal(plain.first_logits, merged.first_logits)
    if method == "h2o":  # the last layer's own cache shrinks, so only decoding can see it
        assert merged.plans[0].cache_lengths[last] < plain.plans[0].cache_lengths[last]
    else:  # the merge layer caches the full length: nothing after it to shorten
        assert torch.equal(plain.tokens, merged.tokens)
        assert merged.plans[0].cache_lengths == plain.plans[0].cache_lengths


def expected_audio_lengths(n: int, ratios: list[float], method: str) -> list[int]:
    """Hand arithmetic, independent of the schedule module: k = floor(r * current length)."""
    lengths = []
    for r in ratios:
        lengths.append(n - int(r * n) if method == "h2o" else n)
        if method != "h2o":
            k = int(r * n + 1e-9)
            n -= min(k, n // 2) if method == "a-tome" else k
    return lengths


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
@pytest.mark.parametrize("schedule", ["single", "constant", "decay"])
def test_cache_lengths_follow_the_schedule(qwen, method, schedule):
    rows = [[clip(1)]]
    cfg = ReductionConfig(method=method, schedule=schedule, first_layer=1, ratio=0.3)
    gen = ours(qwen, ONE, rows, cfg)
    n_audio = gen.plans[0].audio_lengths[0]
    layers = qwen.stack.num_layers
    ratios = {
        "single": [0, 0.3, 0, 0],
        "constant": [0, 0.3, 0.3, 0.3],
        "decay": [0, 0.3, 0.3 * (layers - 3) / (layers - 2), 0],
    }[schedule]
    assert gen.plans[0].audio_lengths == expected_audio_lengths(n_audio, ratios, method)
    text = gen.plans[0].cache_lengths[0] - n_audio
    assert gen.plans[0].cache_lengths == [text + a for a in gen.plans[0].audio_lengths]
    assert gen.kv_bytes_kept < gen.kv_bytes_full


@pytest.mark.parametrize("method", ["fastadasp", "random-merge", "random-evict", "h2o", "a-tome"])
def test_deterministic_and_batch_equals_one_by_one(qwen, method):
    rows = [[clip(1)], [clip(2)], [clip(3)]]
    cfg = ReductionConfig(method=method, schedule="constant", first_layer=0, target=0.3, seed=7)
    batch = ours(qwen, ONE, rows, cfg)
    again = ours(qwen, ONE, rows, cfg)
    assert torch.equal(batch.tokens, again.tokens)
    if method.startswith("random"):
        return  # one generator draws for the whole batch: rows differ from single runs by design
    for i, row in enumerate(rows):
        single = ours(qwen, ONE, [row], cfg)
        n = int(single.num_tokens[0])
        assert batch.tokens[i, :n].tolist() == single.tokens[0, :n].tolist()


def test_positions_policy_changes_outputs_only_through_positions(qwen):
    rows = [[clip(1)]]
    first = ours(
        qwen, ONE, rows, ReductionConfig(method="fastadasp", schedule="single", first_layer=0, ratio=0.5)
    )
    right = ours(
        qwen,
        ONE,
        rows,
        ReductionConfig(method="fastadasp", schedule="single", first_layer=0, ratio=0.5, position="right"),
    )
    assert first.plans == right.plans
    assert not torch.allclose(first.first_logits, right.first_logits)


def test_plan_rejects_bad_spans():
    with pytest.raises(ValueError, match="no audio span"):
        plan_layers(10, [], ReductionConfig(), 4)
    with pytest.raises(ValueError, match="outside the prompt"):
        plan_layers(10, [(5, 12)], ReductionConfig(), 4)


def test_chain_cap_reaches_the_engine(qwen):
    rows = [[clip(1)]]
    capped = ReductionConfig(method="fastadasp", schedule="single", first_layer=0, ratio=0.3, max_chain=2)
    plain = ours(qwen, ONE, rows, replace(capped, max_chain=None))
    merged = ours(qwen, ONE, rows, capped)
    assert merged.plans == plain.plans  # same counts per layer, different groups
    assert not torch.equal(merged.first_logits, plain.first_logits)
    with pytest.raises(ValueError, match="max_chain=2"):
        ours(qwen, ONE, rows, replace(capped, ratio=0.6))  # pairs alone cannot remove 60%


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.is_available(), reason="interprets the kernels on CPU (no TRITON_INTERPRET here)"
)
@pytest.mark.parametrize(
    ("family", "method"),
    [("qwen2_audio", "none"), ("qwen2_audio", "fastadasp"), ("qwen2_audio", "h2o"), ("glm_asr", "fastadasp")],
)
def test_triton_path_gives_the_pytorch_tokens(models, family, method):
    """The engine on its Triton path (interpreted on CPU tensors): attention mass from the attention's
    log-sum-exp, the merge-step kernels, and the fused decode step with split-K attention, against the
    PyTorch path of the same prompts, token for token."""
    pytest.importorskip("triton")
    qwen = models[family]  # GLM-ASR's decoder has no q/k/v bias: the fused step's other branch
    assert supported_head_dim(qwen.stack.head_dim)  # else the dispatchers would quietly take PyTorch
    rows = [[clip(1)], [clip(2, seconds=2.0)], [clip(3)]]  # two lengths: per-row cache positions
    cfg = ReductionConfig(method=method, schedule="constant", first_layer=0, target=0.3)
    if method == "none":
        cfg = NO_REDUCTION
    with forced_path("pytorch"):
        expected = ours(qwen, ONE, rows, cfg)
    with forced_path("triton"):
        got = ours(qwen, ONE, rows, cfg)
    torch.testing.assert_close(got.first_logits, expected.first_logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(got.tokens, expected.tokens)
    assert got.plans == expected.plans


@pytest.mark.parametrize("method", ["none", "fastadasp", "fastv", "h2o", "a-tome"])
def test_windows_of_different_lengths_decode_together_as_alone(qwen, method):
    """Rows whose audio gives different token counts prefill apart and decode in one batch, each over
    its own cache lengths: every row's tokens and plan are what it gets alone, in the input order."""
    rows = [[clip(1)], [clip(2, seconds=1.5)], [clip(3, seconds=2.2)], [clip(4)]]
    cfg = NO_REDUCTION if method == "none" else ReductionConfig(method, "constant", first_layer=0, target=0.3)
    batch = ours(qwen, ONE, rows, cfg)
    assert len({p.prompt_length for p in batch.plans}) == 3 and batch.tokens.shape[0] == 4
    for i, row in enumerate(rows):
        single = ours(qwen, ONE, [row], cfg)
        n = int(single.num_tokens[0])
        assert batch.tokens[i, :n].tolist() == single.tokens[0, :n].tolist()
        assert batch.plans[i] == single.plans[0]
        torch.testing.assert_close(batch.first_logits[i], single.first_logits[0], rtol=1e-5, atol=1e-5)


def test_two_clips_of_different_lengths_per_row(qwen):
    rows = [[clip(1), clip(2, seconds=1.0)], [clip(3, seconds=2.0), clip(4)]]
    cfg = ReductionConfig("fastadasp", "constant", first_layer=0, target=0.3)
    batch = ours(qwen, TWO, rows, cfg)
    for i, row in enumerate(rows):
        single = ours(qwen, TWO, [row], cfg)
        n = int(single.num_tokens[0])
        assert batch.tokens[i, :n].tolist() == single.tokens[0, :n].tolist()


def test_prefill_in_one_row_chunks_equals_one_pass(qwen):
    """Rows of two groups prefilled one row per chunk (offsets into the shared caches) give the same
    logits and caches as each group in one pass."""
    cfg = ReductionConfig("fastadasp", "constant", first_layer=0, target=0.3)
    groups = []
    for seconds in (3.0, 2.0):
        clips = [clip(1, seconds), clip(2, seconds)]
        features, mask = qwen.features(clips)
        encoded = qwen.encode(features, mask)
        ids, spans = qwen.prompt(_text(qwen, ONE), [encoded[0].shape[0]])
        groups.append(
            PromptGroup(embed(qwen.stack, torch.tensor([ids] * 2), spans, [[e] for e in encoded]), spans)
        )
    whole, caches, plans = prefill(qwen.stack, groups, cfg, max_new_tokens=2)
    length = max(g.length for g in groups)
    chunked, chunked_caches, chunked_plans = prefill(qwen.stack, groups, cfg, 2, prefill_tokens=length)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert chunked_plans == plans and chunked_caches.filled == caches.filled
    for a, b in zip(chunked_caches.k, caches.k, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_loop_guard_cuts_looping_rows_after_their_first_phrase(qwen):
    """Random weights loop (a phrase over and over): the guard (pipeline.decoding.policy, the one
    Whisper's runner applies) stops each looping row after the phrase's first occurrence; every row
    keeps a prefix of transformers' unguarded tokens, and the window's stats count the cut."""
    rows, new = [[clip(1)], [clip(7)]], 3 * LOOP_TOKENS
    eos = qwen.eos_token_ids
    reference = hf_generate(qwen, ONE, rows, eos, new).tolist()
    gen = ours(qwen, ONE, rows, new_tokens=new)
    assert gen.loop_cuts  # the random weights looped
    for row in range(len(rows)):
        n = int(gen.num_tokens[row])
        assert gen.tokens[row, :n].tolist() == reference[row][:n]
        if row in gen.loop_cuts:
            assert n < new and loop_start(reference[row][: n + LOOP_TOKENS], LOOP_TOKENS) == n
    qwen.max_new_tokens = new
    outputs = qwen.run([r[0] for r in rows], TaskRequest("asr"), NO_REDUCTION)
    assert [o.stats.loop_cuts for o in outputs] == [int(row in gen.loop_cuts) for row in range(len(rows))]
