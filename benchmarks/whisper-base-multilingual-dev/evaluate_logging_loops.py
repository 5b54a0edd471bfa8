"""jobs/evaluate.py unchanged, plus a side log of the windows Whisper's loop guard cut.

Written against b456c78 (it wraps pipeline.models.whisper's ``greedy_decode`` and
``WhisperSpeechModel.run``); a better home for the count is a ``loops`` field in evaluate's runs.

    OMP_NUM_THREADS=1 python benchmarks/whisper-base-multilingual-dev/evaluate_logging_loops.py LOG.jsonl \
        --manifest ... (evaluate.py's arguments)

Only observes: it wraps ``greedy_decode`` (as pipeline.models.whisper calls it) to record
``DecodeResult.loops`` (which results.json does not keep) with the run's config and the window's index
in the run; results, runs.jsonl and the recorded command are evaluate.py's own.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pipeline.models.whisper as whisper  # noqa: E402
from jobs import evaluate  # noqa: E402

log_path = Path(sys.argv.pop(1))
state = {"cfg": None, "offset": 0}
_run, _decode = whisper.WhisperSpeechModel.run, whisper.greedy_decode


def run(self, waveforms, request, reduction):
    cfg = reduction.to_dict() | {"padding": self.padding}
    if cfg != state["cfg"]:  # evaluate.py calls run once per batch; a run's batches come in order
        state["cfg"], state["offset"] = cfg, 0
    return _run(self, waveforms, request, reduction)


def greedy_decode(model, states, lengths, options, *args, **kwargs):
    result = _decode(model, states, lengths, options, *args, **kwargs)
    if result.loops:
        with log_path.open("a") as handle:
            for b in result.loops:
                handle.write(
                    json.dumps(
                        {
                            "cfg": state["cfg"],
                            "window": state["offset"] + b,
                            "generated": len(result.tokens[b]),
                        }
                    )
                    + "\n"
                )
    state["offset"] += len(result.tokens)
    return result


whisper.WhisperSpeechModel.run, whisper.greedy_decode = run, greedy_decode
sys.argv[0] = "jobs/evaluate.py"
evaluate.main()
