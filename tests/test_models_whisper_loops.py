"""The loop guard of Whisper's greedy decoding: rows that repeat one phrase are cut after its first
occurrence; rows that never loop, and every row with the guard off, decode as transformers' ``generate``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.decoding.policy import MAX_LOOP_PERIOD, loop_start
from pipeline.merging.config import NO_REDUCTION
from pipeline.models.whisper import LOOP_TOKENS, decode_policy
from pipeline.tasks import TaskRequest
from tests.test_models_whisper_multilingual import features, generated, ours, tiny_multilingual

PHRASE = [11, 12, 13, 14, 15]


@pytest.mark.parametrize(
    "row,cut",
    [
        ([7] * 48, 1),  # one token over and over
        ([1, 2, 3] + PHRASE * 10, 3 + len(PHRASE)),  # text, then a sentence looping: keep its first copy
        ([1, 2, 3] + [7] * 47, None),  # one short of the guard's length
        ([1, 2, 3] + PHRASE * 2 + list(range(20, 60)), None),  # said twice, then more speech
        (list(range(100, 148)), None),  # no repetition at all
        ([9] + list(range(200, 200 + MAX_LOOP_PERIOD)) * 3, 1 + MAX_LOOP_PERIOD),  # the longest phrase
        ([9] + list(range(200, 201 + MAX_LOOP_PERIOD)) * 3, None),  # a phrase one token longer
    ],
)
def testloop_start(row, cut):
    assert loop_start(row, LOOP_TOKENS) == cut


def test_looping_rows_are_cut_and_the_rest_decode_as_generate(tmp_path):
    """Random weights loop on noise (one token repeated): with the guard off our rows equal generate's
    full 156 tokens; with it on each looping row is generate's row up to the loop's first phrase."""
    model = tiny_multilingual(tmp_path, max_target_positions=160)
    rng = np.random.default_rng(0)
    waves = [(0.2 * rng.standard_normal(2 * 16000)).astype(np.float32) for _ in range(3)]
    gen = model.model.generation_config
    policy = decode_policy(gen, None, "transcribe")
    assert policy.loop_tokens == LOOP_TOKENS  # the product's default
    reference = generated(model.model.generate(features(model, waves), task="transcribe"), gen.eos_token_id)

    off = ours(model, waves, replace(policy, loop_tokens=0))
    assert [r.generated for r in off] == reference and len(reference[0]) == 156
    assert {r.finish for r in off} == {"length"}

    on = ours(model, waves, policy)
    assert [r.finish for r in on] == ["loop"] * 3
    for cut, full in zip([r.generated for r in on], [r.generated for r in off], strict=True):
        assert len(cut) < len(full) and cut == full[: len(cut)]
        assert loop_start(full[: len(cut) + LOOP_TOKENS], LOOP_TOKENS) == len(cut)
    # the adapter says which windows were cut (evaluate counts them)
    assert [out.stats.loop_cuts for out in model.run(waves, TaskRequest("asr"), NO_REDUCTION)] == [1] * 3
