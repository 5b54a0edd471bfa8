"""Layer selection for sparse tasks: the entropy proxy, the scores, the choice rule, and a whole
selection on a tiny random-weight Whisper through its adapter's audio_states."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

from pipeline.merging.config import ReductionConfig
from pipeline.merging.layer_select import choose_layer, entropy_proxy, normalised_scores, select_layer
from pipeline.models.base import Checkpoint
from pipeline.models.whisper import TINY_EN, WhisperSpeechModel, describe, packaged_files

SR = 16000


def test_entropy_proxy_sums_log_std_over_tokens_and_averages_utterances():
    a = torch.tensor([[1.0, -1.0], [2.0, -2.0]])  # token stds sqrt(2), 2 sqrt(2) (unbiased)
    b = torch.tensor([[3.0, -3.0]])
    expected = (math.log(math.sqrt(2)) + math.log(2 * math.sqrt(2)) + math.log(3 * math.sqrt(2))) / 2
    assert entropy_proxy([a, b]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="no utterances"):
        entropy_proxy([])


def test_scores_are_min_max_normalised_distances_to_the_reference():
    assert normalised_scores([10.0, 7.0, 4.0, 5.0], 5.0) == pytest.approx([1.0, 0.4, 0.2, 0.0])
    assert normalised_scores([3.0, 3.0], 3.0) == [0.0, 0.0]


@pytest.mark.parametrize(
    "scores,layer",
    [
        ([1.0, 0.5, 0.05, 0.2, 0.0], 4),  # a low score followed by a high one is not the knee
        ([1.0, 0.05, 0.5, 0.02, 0.01, 0.0], 3),
        ([1.0, 0.3, 0.08, 0.1, 0.0], 2),
        ([0.0, 0.0, 0.0], 0),  # nothing drifts: merge as early as possible
        ([0.0], 0),
    ],
)
def test_the_earliest_layer_after_which_every_score_stays_low(scores, layer):
    assert choose_layer(scores, tolerance=0.1) == layer


@pytest.fixture(scope="module")
def tiny() -> WhisperSpeechModel:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=51864, num_mel_bins=80, d_model=16, encoder_layers=4, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
        max_source_positions=1500, max_target_positions=8,
    )  # fmt: skip
    _, meta = packaged_files(TINY_EN)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(meta / "tokenizer.json"))
    description = describe(Checkpoint("tiny", "whisper"), config.to_dict())
    return WhisperSpeechModel(WhisperForConditionalGeneration(config), tokenizer, description, batch_size=2)


def test_selection_on_a_tiny_whisper_is_deterministic_and_valid(tiny):
    rng = np.random.default_rng(0)
    t = np.arange(2 * SR) / SR
    waves = [
        (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32),
        (0.1 * rng.standard_normal(3 * SR)).astype(np.float32),
        (0.3 * np.sign(np.sin(2 * np.pi * 5 * t)) * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
    ]

    def run(layer: int) -> list[torch.Tensor]:
        cfg = ReductionConfig(method="fastadasp", schedule="single", first_layer=layer, ratio=0.5)
        return tiny.audio_states(waves, cfg)

    states = run(1)
    assert [s.shape[0] for s in states] == [100 - 50, 150 - 75, 100 - 50]  # the speech span, merged once
    first, again = select_layer(run, 4), select_layer(run, 4)
    assert first == again
    assert 0 <= first.layer < 4 and first.scores[-1] == 0.0 and max(first.scores) == 1.0
    assert first.layer == choose_layer(first.scores)
    assert len(set(first.entropies)) == 4  # every layer's merge changes the output differently
