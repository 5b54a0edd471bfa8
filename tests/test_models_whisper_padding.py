"""Whisper's padding reduced inside the encoder (ReductionConfig.padding): the log-mel and the
convolutions computed only as far as the audio reaches, the padding merged into tokens that stand for
their positions in attention (encoder and decoder). Real tiny.en weights."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.merging.config import NO_REDUCTION, ReductionConfig, ReductionConfigError
from pipeline.models.whisper_encoder import _attention, _embed, encode, encoder_ratios, input_frames
from pipeline.tasks import TaskRequest
from tests.test_models_whisper import SR, chirp, vowels
from tests.whisper_decode import decode_encoded

MERGE = ReductionConfig(padding="merge", padding_margin=10, padding_group=100)


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [vowels(3.0, 1), chirp(2.5, 200, 300), vowels(7.25, 2)]


def _features(whisper, waves, frames=3000):
    return whisper.features(
        waves, sampling_rate=SR, return_tensors="pt", max_length=frames * 160
    ).input_features


def test_features_and_convolutions_as_far_as_the_audio_reaches_are_exact(whisper, clips):
    frames = max(input_frames(len(w), 3000) for w in clips)
    assert frames < 3000
    full, short = _features(whisper, clips), _features(whisper, clips, frames)
    assert torch.equal(full[..., :frames], short)  # the log-mel of the frames computed is the same
    assert torch.equal(full[..., frames - 8 :], full[..., -1:].expand(-1, -1, 3000 - frames + 8))
    encoder = whisper.model.model.encoder
    with torch.inference_mode():
        torch.testing.assert_close(_embed(encoder, short), _embed(encoder, full), atol=1e-6, rtol=1e-6)


def test_merged_padding_tokens_stand_for_their_positions(whisper, clips):
    speech = [math.ceil(len(w) / 320) for w in clips]
    out = encode(whisper.model.model.encoder, _features(whisper, clips), speech, MERGE, [0.0] * 4)
    for b, s in enumerate(speech):
        kept, tail = s + 10, 1500 - s - 10
        groups = math.ceil(tail / 100)
        assert int(out.lengths[b]) == kept + groups
        bias = out.key_bias[b]
        assert torch.equal(bias[:kept], torch.zeros(kept))
        sizes = [100] * (groups - 1) + [tail - 100 * (groups - 1)]
        torch.testing.assert_close(bias[kept : kept + groups], torch.tensor(sizes, dtype=torch.float).log())
        assert torch.isinf(bias[kept + groups :]).all()  # past the row's length: never attended
        # each frame ends in the output position that stands for it
        assert out.origins[b, :kept].tolist() == list(range(kept))
        assert out.origins[b, kept:].tolist() == [kept + i // 100 for i in range(tail)]
    assert torch.isfinite(out.states).all()


def test_merging_groups_of_one_position_is_keeping_the_padding(whisper, clips):
    speech = [math.ceil(len(w) / 320) for w in clips]
    feats = _features(whisper, clips)
    ones = ReductionConfig(padding="merge", padding_margin=0, padding_group=1)
    kept = encode(whisper.model.model.encoder, feats, speech, NO_REDUCTION, [0.0] * 4)
    merged = encode(whisper.model.model.encoder, feats, speech, ones, [0.0] * 4)
    assert merged.key_bias is None and torch.equal(merged.lengths, kept.lengths)
    torch.testing.assert_close(merged.states, kept.states, atol=1e-5, rtol=1e-5)


def test_a_window_with_less_padding_than_the_minimum_keeps_it_all(whisper, clips):
    """padding_min: a nearly full window keeps its padding (as trained) while the windows batched with it
    merge theirs, each as it would be encoded alone."""
    waves = [vowels(25.0, 1), clips[0]]  # 10 positions kept after the speech, then 240 or 1,340 of padding
    speech = [math.ceil(len(w) / 320) for w in waves]
    feats = _features(whisper, waves)
    at_least = replace(MERGE, padding_min=250)
    encoder = whisper.model.model.encoder
    out = encode(encoder, feats, speech, at_least, [0.0] * 4)
    kept = encode(encoder, feats[:1], speech[:1], NO_REDUCTION, [0.0] * 4)
    merged = encode(encoder, feats[1:], speech[1:], MERGE, [0.0] * 4)
    assert out.lengths.tolist() == [1500, int(merged.lengths[0])]
    assert torch.equal(out.key_bias[0], torch.zeros(1500))
    torch.testing.assert_close(out.states[:1], kept.states, atol=1e-5, rtol=1e-5)
    n = int(merged.lengths[0])
    torch.testing.assert_close(out.states[1:, :n], merged.states, atol=1e-5, rtol=1e-5)
    # 240 positions past the margin: a minimum of 241 keeps them, one of 240 merges them (3 groups)
    for minimum, length in ((241, 1500), (240, speech[0] + 10 + 3)):
        edge = encode(encoder, feats[:1], speech[:1], replace(MERGE, padding_min=minimum), [0.0] * 4)
        assert int(edge.lengths[0]) == length


def test_a_token_with_log_n_added_attends_as_n_copies_of_it(whisper):
    """Proportional attention: a key standing for n equal keys receives their mass, so every query's
    output is what it was over the copies."""
    layer = whisper.model.model.encoder.layers[0]
    torch.manual_seed(0)
    x = torch.randn(1, 40, 384)
    copies = torch.cat([x[:, :30], x[:, 30:31].expand(-1, 9, -1), x[:, 31:]], dim=1)  # 48 positions
    bias = torch.zeros(1, 1, 1, 40)
    bias[..., 30] = math.log(9)
    with torch.inference_mode():
        full, _, _ = _attention(layer, copies, None)
        merged, _, _ = _attention(layer, x, bias)
    torch.testing.assert_close(merged[:, :31], full[:, :31], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(merged[:, 31:], full[:, 39:], atol=1e-5, rtol=1e-4)


def test_the_decoder_reads_a_merged_token_as_its_positions(whisper, clips):
    """Cross-attention with the key bias: a window whose encoder output has runs of equal positions
    decodes the same tokens from one token per run plus log of its length."""
    speech = [math.ceil(len(clips[2]) / 320)]
    out = encode(whisper.model.model.encoder, _features(whisper, clips[2:]), speech, NO_REDUCTION, [0.0] * 4)
    states = out.states[:, : speech[0] + 20]
    runs = [1] * states.shape[1]
    runs[-1] = 700  # the last position repeated: the bias makes one copy count as all of them
    expanded = torch.repeat_interleave(states, torch.tensor(runs), dim=1)
    policy = whisper.decode_plan(TaskRequest("asr"))[0]
    bias = torch.tensor(runs, dtype=torch.float).log()[None]
    (merged,) = decode_encoded(whisper.model, states, bias, policy)
    (full,) = decode_encoded(whisper.model, expanded, None, policy)
    assert merged.generated == full.generated


def test_windows_come_back_in_order_whatever_their_lengths(whisper, clips):
    """run() batches windows of like length together and returns them as given."""
    one_by_one = [whisper.run([w], TaskRequest("asr"), MERGE)[0].text for w in clips]
    together = whisper.run(clips[::-1], TaskRequest("asr"), MERGE)
    assert [o.text for o in together] == one_by_one[::-1]
    assert all(o.stats.kv_bytes_kept < o.stats.kv_bytes_full for o in together)


def test_padding_settings_are_checked_and_recorded_only_when_set():
    assert "padding" not in NO_REDUCTION.to_dict()  # runs recorded before padding policies resume
    assert MERGE.to_dict()["padding"] == "merge" and MERGE.to_dict()["padding_group"] == 100
    assert ReductionConfig(**MERGE.to_dict()) == MERGE
    with pytest.raises(ReductionConfigError, match="padding='pad'"):
        ReductionConfig(padding="pad")
    with pytest.raises(ReductionConfigError, match="padding_group=0"):
        ReductionConfig(padding="merge", padding_group=0)
    with pytest.raises(ReductionConfigError, match="padding_min=-1"):
        ReductionConfig(padding="merge", padding_min=-1)
    assert "padding_min" not in MERGE.to_dict()  # runs recorded before the minimum existed resume
    at_least = replace(MERGE, padding_min=500)
    assert at_least.to_dict()["padding_min"] == 500 and ReductionConfig(**at_least.to_dict()) == at_least
    assert encoder_ratios(MERGE, 4) == [0.0] * 4  # padding alone reduces no speech token
