"""Word times from the real Whisper tiny.en: word timing leaves the text alone, words follow the
text and the audio (two example recordings with a known pause between them), and merging keeps them."""

from __future__ import annotations

from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from pipeline.audio.decode import decode_audio
from pipeline.merging.config import NO_REDUCTION
from pipeline.presets import resolve_reduction
from pipeline.stitch import normalise
from pipeline.stitch import words as text_words
from pipeline.tasks import TaskError, TaskRequest

SR = 16000
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PAUSE_S = 2.0


@pytest.fixture(scope="module")
def window() -> tuple[np.ndarray, float]:
    """intro.wav, a pause, announcement.mp3 in one window; and where the second recording begins."""
    first = decode_audio(EXAMPLES / "intro.wav", SR).samples
    second = decode_audio(EXAMPLES / "announcement.mp3", SR).samples
    joined = np.concatenate([first, np.zeros(int(PAUSE_S * SR), np.float32), second])
    return joined, (len(first) / SR) + PAUSE_S


@pytest.fixture(scope="module")
def outputs(whisper, window):
    wave, _ = window
    short = wave[: 4 * SR]
    run = {
        ts: whisper.run([wave, short], TaskRequest(timestamps=ts), NO_REDUCTION) for ts in ("none", "words")
    }
    merged = whisper.run(
        [wave], TaskRequest(timestamps="words"), resolve_reduction(whisper.description, "asr")
    )
    return run, merged


def test_timestamps_do_not_change_the_text(outputs):
    run, _ = outputs
    assert [o.text for o in run["words"]] == [o.text for o in run["none"]]
    assert all(o.words is None for o in run["none"])


def test_words_are_the_texts_words_in_time_order_inside_the_window(outputs, window):
    run, _ = outputs
    wave, _ = window
    for out, seconds in zip(run["words"], (len(wave) / SR, 4.0), strict=True):
        assert [w.word for w in out.words] == text_words(out.text)
        assert all(0 <= w.start_s <= w.end_s <= seconds + 0.02 for w in out.words)
        assert all(a.end_s <= b.start_s + 1e-9 for a, b in pairwise(out.words))
        assert all(0 < w.probability <= 1 for w in out.words)


def _boundary(words, second_starts_s):
    """The last word before the pause and the first after it (the announcement begins 'Attention')."""
    first = next(i for i, w in enumerate(words) if w.word.startswith("Attention"))
    return words[first - 1], words[first]


def test_words_fall_on_either_side_of_the_pause(outputs, window):
    run, _ = outputs
    _, second_starts_s = window
    before, after = _boundary(run["words"][0].words, second_starts_s)
    assert before.end_s <= second_starts_s - PAUSE_S + 0.3  # intro's last word ends in its own audio
    assert second_starts_s - 0.3 <= after.start_s <= second_starts_s + 0.5


def test_merged_encoder_positions_keep_the_word_times(outputs, window):
    run, merged = outputs
    _, second_starts_s = window
    assert merged[0].stats.kv_bytes_kept < run["words"][0].stats.kv_bytes_kept  # merging happened
    plain = {normalise(w.word): w for w in run["words"][0].words}  # punctuation may differ
    before, after = _boundary(merged[0].words, second_starts_s)  # within a few 20 ms frames
    assert abs(before.end_s - plain[normalise(before.word)].end_s) <= 0.2
    assert abs(after.start_s - plain[normalise(after.word)].start_s) <= 0.2


def test_words_need_alignment_heads(whisper, monkeypatch):
    monkeypatch.setattr(whisper, "alignment_heads", [])
    with pytest.raises(TaskError, match="alignment heads"):
        whisper.decode_plan(TaskRequest(timestamps="words"))


def test_a_last_layer_merge_is_timed_on_the_output_without_it(whisper, outputs, window):
    """The default preset merges speech tokens in tiny.en's last layer only: word timing reads that
    layer's output without the merge (the unreduced encoder's, but for the MLP update a merged position
    shares with its group), so a window whose text the merge left alone gets the words of the unreduced
    run, times included."""
    import torch

    from pipeline.models.whisper_encoder import encode, encoder_ratios

    wave, _ = window
    cfg = resolve_reduction(whisper.description, "asr")
    assert cfg.schedule == "single" and cfg.first_layer == 3  # the last of 4
    features = whisper.features([wave], sampling_rate=SR, return_tensors="pt").input_features
    speech = [int(np.ceil(len(wave) / 320))]
    encoder = whisper.model.model.encoder
    merged = encode(encoder, features, speech, cfg, encoder_ratios(cfg, 4), timing=True)
    plain = encode(encoder, features, speech, replace(cfg, method="none"), [0.0] * 4)
    assert merged.timing is not None and merged.states.shape[1] < merged.timing.states.shape[1]
    assert torch.equal(merged.timing.lengths, plain.lengths) and merged.timing.origins.equal(plain.origins)
    # each input position's merged output position, through the plain output's positions
    group = torch.empty(plain.states.shape[1], dtype=torch.long)
    group[plain.origins[0]] = merged.origins[0]
    alone = torch.bincount(group)[group] == 1
    assert 0 < int((~alone).sum()) < len(alone)
    # where the merge left a position alone, its output is the unreduced encoder's
    torch.testing.assert_close(merged.timing.states[0, alone], plain.states[0, alone], atol=1e-4, rtol=1e-4)
    # a merged member keeps its own residual stream, with its group's MLP update: nearer the unreduced
    # output than its merged position (what timing would read without ``timing``)
    cos = torch.nn.functional.cosine_similarity
    own = cos(merged.timing.states[0, ~alone], plain.states[0, ~alone], dim=-1)
    shared = cos(merged.states[0, group[~alone]], plain.states[0, ~alone], dim=-1)
    assert own.mean() > 0.97 and own.mean() > shared.mean() + 0.01 and own.min() > shared.min()
    _, timed = outputs  # the default preset's words, against the same padding policy unmerged
    alone = whisper.run([wave], TaskRequest(timestamps="words"), replace(cfg, method="none"))[0].words
    common = next(i for i, (a, b) in enumerate(zip(timed[0].words, alone, strict=False)) if a.word != b.word)
    assert common >= 10  # the texts agree this far; their times are the unmerged ones (the warping is
    # global: a later word that differs moves an earlier boundary by a frame or two)
    for ours, theirs in zip(timed[0].words[:common], alone[:common], strict=True):
        assert abs(ours.start_s - theirs.start_s) <= 0.1 and abs(ours.end_s - theirs.end_s) <= 0.1


def test_recorded_queries_give_a_teacher_forced_pass_s_weights(whisper, window):
    """The alignment heads' weights from the queries the greedy steps recorded equal those of
    transformers' decoder run over the window's prompt and decided tokens (eager attention), at every
    position it fed: beside other rows, after its row moved slots, and when the length budget stopped
    it; such a window's text ends at its last speech frame."""
    import torch

    from pipeline.decoding.scheduler import Request, Scheduler
    from pipeline.models.whisper_encoder import encode
    from pipeline.models.whisper_runner import Encoded, WhisperRunner
    from pipeline.models.whisper_timing import window_words

    wave, _ = window
    waves = [wave[: 3 * SR], wave, wave[: 6 * SR]]  # the short one finishes first: the long row moves
    features = whisper.features(waves, sampling_rate=SR, return_tensors="pt").input_features
    speech = [int(np.ceil(len(w) / 320)) for w in waves]
    enc = encode(whisper.model.model.encoder, features, speech, NO_REDUCTION, [0.0] * 4)
    policy, _ = whisper.decode_plan(TaskRequest(timestamps="words"))
    heads = whisper.alignment_heads
    for budget, slots in ((None, 2), (6, 3)):
        runner = WhisperRunner(whisper.model, slots, heads)
        got = {}

        def done(r: Request, runner: WhisperRunner = runner, got: dict = got) -> None:
            got[r.key] = (r, runner.head_weights(r), r.slot)

        requests = [
            Request(key=b, work=None, state={"encoded": Encoded(enc.states[b], None)}) for b in range(3)
        ]
        scheduler = Scheduler(slots)
        scheduler.add(requests)
        runner.run(scheduler, replace(policy, max_new_tokens=budget), done=done, timing=True)
        if budget is None:
            assert got[1][2] == 0  # the long window finished in the slot the first one left
        kernel = whisper.model.config._attn_implementation
        whisper.model.set_attn_implementation("eager")
        try:
            for b, (r, weights, _) in got.items():
                fed = list(r.prompt) + r.generated[: r.fed - len(r.prompt)]
                assert weights.shape == (len(heads), len(fed), 1500)
                with torch.inference_mode():
                    out = whisper.model(
                        encoder_outputs=(enc.states[b : b + 1],),
                        decoder_input_ids=torch.tensor([fed]),
                        output_attentions=True,
                    )
                expected = torch.stack([out.cross_attentions[layer][0, h] for layer, h in heads])
                torch.testing.assert_close(weights, expected, atol=2e-5, rtol=1e-4)
        finally:
            whisper.model.set_attn_implementation(kernel)
        if budget is not None:
            r, weights, _ = got[1]
            assert r.finish == "length" and r.fed == len(r.prompt) + budget - 1
            words = window_words(
                whisper.tokenizer,
                r.generated,
                r.logprobs,
                weights,
                list(r.prompt),
                policy.eos[0],
                enc.origins[1],
                speech[1],
            )
            assert words and words[-1].end_s == pytest.approx(speech[1] * 0.02)
            assert all(a.start_s <= a.end_s <= b.start_s for a, b in pairwise(words))


def test_token_logprobs_are_log_softmax_of_the_chosen_tokens():
    import torch

    from pipeline.models.whisper_runner import token_logprobs

    torch.manual_seed(0)
    logits = torch.randn(5, 51864) * 4
    chosen = torch.tensor([0, 7, 51863, 12, 400])
    expected = logits.log_softmax(-1)[torch.arange(5), chosen]
    for layout in (logits, logits.T.contiguous().T):  # as sgemm's (vocab, rows) product, transposed
        torch.testing.assert_close(token_logprobs(layout, chosen), expected, atol=1e-5, rtol=1e-5)
