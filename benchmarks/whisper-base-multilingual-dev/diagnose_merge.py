"""Why a merge method wins or loses at a level: encoder-only measurements of its plans on real clips.

Written against pipeline/models/whisper_encoder.py as of b456c78 (it observes that module's
``_reduce_row`` and ``plan_reduction``); diag-50/ was measured there.

    OMP_NUM_THREADS=1 python benchmarks/whisper-base-multilingual-dev/diagnose_merge.py \
        --manifest ../shared/data/multilingual-dev/manifest.jsonl --task st --target 0.5 \
        --out benchmarks/whisper-base-multilingual-dev/diag-50/plans.json

Per method (the rows of jobs/evaluate.py's GRID that merge, Whisper base's 6 encoder layers, and the
same methods with hidden-state similarity), every clip runs through the reducing encoder alone, one clip
at a time, with ``plan_reduction`` observed (nothing changed but, for the ``hidden`` rows, the tensor
the adjacent similarity is computed from). Measured:
- chains per layer: the largest group one layer makes, the share of that layer's removed tokens that
  sit in groups of >= 3;
- composed over the layers: frames (20 ms encoder positions) per output token, the largest, the
  tokens per clip covering >= 8 frames (160 ms), the share of removed frames inside such tokens;
- where the removed frames sit: share that are quiet (> 20 dB below the clip's 95th-percentile frame
  energy) against the clips' share of quiet frames, share in the first / last 10% of the speech span;
- keys vs hidden states: at each FastAdaSP merge, the share of the top-k edges by key similarity that
  are also top-k by hidden-state similarity (the residual stream after attention, what is merged);
  random edges would share k / (n - 1).

``--similarity hidden`` with jobs/evaluate.py's arguments instead runs evaluate.py with the FastAdaSP
merges' similarity taken from the hidden states (an experiment, not a pipeline option): results go
to evaluate's --out, whose runs.jsonl keys do not record the change, so give it a folder of its own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import pipeline.models.whisper_encoder as whisper_encoder  # noqa: E402
from pipeline.merging.config import ReductionConfig  # noqa: E402

_plan, _reduce_row = whisper_encoder.plan_reduction, whisper_encoder._reduce_row
state: dict = {"hidden": False, "x": None, "record": None}


def _observed_reduce_row(x, q, keys, speech, k, cfg, generator):
    state["x"] = x
    return _reduce_row(x, q, keys, speech, k, cfg, generator)


def _observed_plan(method, length, spans, ks, *, keys=None, **kwargs):
    hidden = state["x"][None] if state["x"] is not None else None
    used = hidden if state["hidden"] and method in ("fastadasp", "average") else keys
    plan = _plan(method, length, spans, ks, keys=used, **kwargs)
    if state["record"] is not None:
        entry = {"groups": plan.groups[0].clone(), "speech": spans[0][1], "k": ks[0], "method": method}
        if method == "fastadasp" and keys is not None and hidden is not None:
            (start, end), k = spans[0], ks[0]
            sims = [
                torch.nn.functional.cosine_similarity(t[0, start : end - 1], t[0, start + 1 : end], dim=-1)
                for t in (keys.float(), hidden.float())
            ]
            top = [set(s.topk(k).indices.tolist()) for s in sims]
            entry["overlap"] = len(top[0] & top[1]) / k
            entry["chance"] = k / (end - start - 1)
        state["record"].append(entry)
    return plan


whisper_encoder._reduce_row, whisper_encoder.plan_reduction = _observed_reduce_row, _observed_plan

GRID = {  # label -> (method, schedule, first layer), as jobs/evaluate.py for Whisper base (LAST = 5)
    "FastAdaSP constant": ("fastadasp", "constant", 1, None),
    "FastAdaSP decay": ("fastadasp", "decay", 0, None),
    "FastAdaSP single (layer 5)": ("fastadasp", "single", 5, None),
    "FastAdaSP constant, chains <= 2": ("fastadasp", "constant", 1, 2),
    "A-ToMe": ("a-tome", "constant", 0, None),
    "Random merge": ("random-merge", "single", 5, None),
}
HIDDEN = ("FastAdaSP constant", "FastAdaSP decay", "FastAdaSP single (layer 5)")


def frame_db(wave: np.ndarray, frames: int) -> np.ndarray:
    samples = np.zeros(frames * 320, dtype=np.float64)
    n = min(len(wave), len(samples))
    samples[:n] = wave[:n]
    rms = np.sqrt((samples.reshape(frames, 320) ** 2).mean(1) + 1e-12)
    return 20 * np.log10(rms)


def measure(model, waves: list[np.ndarray], cfg: ReductionConfig, hidden: bool) -> dict:
    state["hidden"] = hidden
    per_layer_max, in3, removed_layer, overlaps, chances = 0, 0, 0, [], []
    sizes_all, long_tokens, removed, removed_long, long_frames, long_quiet = [], 0, 0, 0, 0, 0
    quiet_removed, frames_total, quiet_total, edge_removed = 0, 0, 0, 0
    for wave in waves:
        state["record"] = []
        model.audio_states([wave], cfg)
        record, state["record"] = state["record"], None
        if not record:
            continue
        s = record[0]["speech"]
        owner = torch.arange(s)
        for entry in record:
            g = entry["groups"][: entry["speech"]]
            counts = torch.bincount(g)
            per_layer_max = max(per_layer_max, int(counts.max()))
            in3 += int((counts[counts >= 3] - 1).sum())
            removed_layer += entry["k"]
            if "overlap" in entry:
                overlaps.append(entry["overlap"])
                chances.append(entry["chance"])
            owner = g[owner]
        sizes = torch.bincount(owner)
        sizes = sizes[sizes > 0]
        sizes_all.append(int(sizes.max()))
        db = frame_db(wave, s)
        quiet = db < np.percentile(db, 95) - 20
        lead = torch.ones(s, dtype=torch.bool)  # merges keep order: a token's first frame stays, the rest go
        lead[1:] = owner[1:] != owner[:-1]
        token_size = torch.bincount(owner)[owner]  # frames of the token each frame ended in
        is_removed = ~lead
        removed += int(is_removed.sum())
        long = token_size >= 8
        long_tokens += int((torch.bincount(owner) >= 8).sum())
        removed_long += int((is_removed & long).sum())
        long_frames += int(long.sum())
        long_quiet += int((long & torch.from_numpy(quiet)).sum())
        quiet_removed += int((is_removed & torch.from_numpy(quiet)).sum())
        frames_total += s
        quiet_total += int(quiet.sum())
        tenth = max(1, math.ceil(0.1 * s))
        edge_removed += int(is_removed[:tenth].sum() + is_removed[-tenth:].sum())
    clips = len(waves)
    out = {
        "clips": clips,
        "largest group in one layer": per_layer_max,
        "share of per-layer removals in groups >= 3": in3 / max(1, removed_layer),
        "largest output token (frames)": max(sizes_all, default=0),
        "tokens >= 8 frames per clip": long_tokens / clips,
        "share of removed frames in tokens >= 8 frames": removed_long / max(1, removed),
        "share of frames in tokens >= 8 frames that are quiet": long_quiet / max(1, long_frames),
        "share of removed frames that are quiet": quiet_removed / max(1, removed),
        "share of all speech frames that are quiet": quiet_total / max(1, frames_total),
        "share of removed frames in first/last 10% of span": edge_removed / max(1, removed),
    }
    if overlaps:
        out["top-k edges shared by key and hidden similarity"] = float(np.mean(overlaps))
        out["same share for random edges"] = float(np.mean(chances))
    return out


def main() -> None:
    if "--similarity" in sys.argv:
        i = sys.argv.index("--similarity")
        if sys.argv[i + 1] != "hidden":
            raise SystemExit("--similarity takes 'hidden'")
        del sys.argv[i : i + 2]
        state["hidden"] = True
        from jobs import evaluate

        sys.argv[0] = "jobs/evaluate.py"
        evaluate.main()
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--task", default="st")
    parser.add_argument("--languages", nargs="*")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from jobs.evaluate import REFERENCE, select
    from pipeline.audio.decode import decode_audio
    from pipeline.models.registry import load_model

    rows = select(args.manifest, None, 0, REFERENCE[args.task], args.languages)
    waves = [decode_audio(args.manifest.parent / r["audio"]).samples for r in rows]
    model = load_model("whisper-base", "cpu")
    results = {}
    for label, (method, schedule, first, cap) in GRID.items():
        cfg = ReductionConfig(method, schedule, first_layer=first, target=args.target, max_chain=cap)
        for hidden in (False, True) if label in HIDDEN else (False,):
            name = label + (", hidden-state similarity" if hidden else "")
            results[name] = measure(model, waves, cfg, hidden)
            print(name, json.dumps(results[name]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python", *sys.argv]), "ids": [r["id"] for r in rows], "target": args.target}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
