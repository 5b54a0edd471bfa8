"""Score what an archive run committed against a manifest's references: the end-to-end check that the
pipeline (decoding, VAD windows, stitching, Parquet) gives what jobs/evaluate.py measures on the model.

    python benchmarks/score_run.py --output out/ml-st --task st \
        --manifest ../shared/data/multilingual-dev/manifest.jsonl [--languages de fr]

A manifest row (jobs/evaluate.py's format: ``audio`` relative to the manifest, reference fields by task)
is matched to the committed recording with the same file name; rows without the task's reference, and
recordings that did not finish ``ok``, are listed, not scored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from pipeline.metrics import reference_fields, task_scores
from pipeline.publish import read_committed
from pipeline.tasks import TASKS


def score(output: Path, manifest: Path, task: str, languages: list[str] | None = None) -> dict:
    """The task's scores over the manifest rows (of ``languages`` if given) the run finished, with the
    counts behind them."""
    field = reference_fields()[task]
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get(field) and (languages is None or r.get("language") in languages)]
    results = {Path(r["source_path"]).name: r for r in read_committed(output, "results").to_pylist()}
    scored = [(r, results[Path(r["audio"]).name]) for r in rows if Path(r["audio"]).name in results]
    ok = [(r, out) for r, out in scored if out["status"] == "ok"]
    hyps = [out[TASKS[task].result] or "" for _, out in ok]
    scores = task_scores(task, [r[field] for r, _ in ok], hyps, [r["language"] for r, _ in ok])
    return {
        "task": task,
        "scored": len(ok),
        "not_ok": sorted(out["recording_id"] for _, out in scored if out["status"] != "ok"),
        "missing": sorted(r["id"] for r in rows if Path(r["audio"]).name not in results),
        "scores": scores,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, required=True, help="the archive job's --output folder")
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--task", required=True, choices=sorted(reference_fields()))
    parser.add_argument("--languages", nargs="+", help="only the manifest rows of these languages")
    args = parser.parse_args(argv)
    result = score(args.output, args.manifest, args.task, args.languages)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


if __name__ == "__main__":
    main()
