r"""Choose the layer of a sparse task's one aggressive merge (FastAdaSP layer selection, automatic).

    python jobs/select_layer.py --manifest ../shared/data/multilingual-dev/manifest.jsonl --task lid \
        --model whisper-base --ratio 0.5 --output benchmarks/whisper-base-multilingual-dev/select-layer-lid

For every layer L the calibration clips (the manifest's rows with the task's reference) run with one
merge at L (schedule ``single``, ``--ratio``); the entropy proxy of the last layer's audio states gives
each layer's score against a merge at the last layer, and the rule in pipeline/merging/layer_select.py
chooses. Writes selection.json, selection.md and selection.png. ``--check`` also runs the task at every
layer and scores it (the truth the rule should agree with): slow, every clip is decoded once per layer.
The model must offer ``audio_states(waveforms, reduction)`` (Whisper's encoder does).
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import matplotlib
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a job working_dir

from jobs.common import JobParser, add_manifest, output_folder, run_job
from jobs.evaluate import save_figure, select
from pipeline.merging.config import NO_REDUCTION, ReductionConfig
from pipeline.merging.layer_select import TOLERANCE, select_layer
from pipeline.metrics import reference_fields, task_scores
from pipeline.models.registry import DEFAULT_MODEL, describe_model, load_model
from pipeline.tasks import TaskRequest
from workers.clips import cut_clips, run_clips


def single_merge(layer: int, ratio: float, method: str, seed: int) -> ReductionConfig:
    return ReductionConfig(method=method, schedule="single", first_layer=layer, ratio=ratio, seed=seed)


def markdown(result: dict) -> str:
    sel, check = result["selection"], result.get("check")
    lines = [
        f"# Layer selection: {result['model']}, task {result['task']}, one {result['method']} merge at ratio "
        f"{result['ratio']}",
        "",
        f"{result['clips']} clips of {result['manifest_name']}. Chosen layer: **{sel['layer']}** (the earliest "
        f"from which every later layer's normalised score is <= {sel['tolerance']}).",
        "",
        "| layer | entropy proxy | score |" + (f" {check['metric']} |" if check else ""),
        "|---|---|---|" + ("---|" if check else ""),
    ]
    for layer, (h, s) in enumerate(zip(sel["entropies"], sel["scores"], strict=True)):
        row = f"| {layer}{' (chosen)' if layer == sel['layer'] else ''} | {h:.1f} | {s:.3f} |"
        lines.append(row + (f" {check['per_layer'][layer]:.2f} |" if check else ""))
    if check:
        lines += ["", f"No reduction: {check['metric']} {check['none']:.2f}."]
    lines += ["", f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = result["selection"]
    layers = range(len(sel["scores"]))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(layers, sel["scores"], marker="o", label="normalised |H_ref - H_L|")
    ax.axhline(sel["tolerance"], color="grey", linestyle=":", label="tolerance")
    ax.axvline(sel["layer"], color="red", linestyle="--", label=f"chosen layer {sel['layer']}")
    ax.set_xlabel("layer of the single merge")
    ax.set_ylabel("score")
    if check := result.get("check"):
        twin = ax.twinx()
        twin.plot(layers, check["per_layer"], marker="s", color="green", label=check["metric"])
        twin.axhline(check["none"], color="green", linestyle=":")
        twin.set_ylabel(check["metric"])
        twin.legend(loc="lower right", fontsize=7)
    ax.legend(loc="upper right", fontsize=7)
    save_figure(fig, ax, path)


def _run(argv: list[str] | None) -> None:
    parser = JobParser(__doc__)
    add_manifest(parser)
    parser.add_argument(
        "--task", required=True, choices=sorted(reference_fields()), help="the sparse task the layer is for"
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="a packaged model, checkpoint folder or hub id"
    )
    parser.add_argument("--ratio", type=float, default=0.5, help="the one merge's ratio")
    parser.add_argument("--method", default="fastadasp", help="the one merge's method (pipeline/cli.py's)")
    parser.add_argument(
        "--tolerance", type=float, default=TOLERANCE, help="highest normalised score a chosen layer may see"
    )
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of the clips")
    parser.add_argument("--seed", type=int, default=0, help="subset choice and random methods")
    parser.add_argument(
        "--batch-size",
        "--batch",
        type=int,
        default=8,
        help="--check: rows the model decodes at once, and clips per model call (--batch: old name)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    parser.add_argument("--check", action="store_true", help="also score the task at every layer (slow)")
    parser.add_argument(
        "--output",
        "--out",
        type=output_folder,
        required=True,
        help="folder of selection.json, selection.md and selection.png (--out: old name)",
    )
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rows = select(args.manifest, args.limit, args.seed, reference_fields()[args.task])
    if not rows:
        parser.error(f"no row of {args.manifest} has a {reference_fields()[args.task]!r} reference")
    info = describe_model(args.model)  # config files only: a wrong name is refused before any decoding
    # A clip longer than the model's window is cut as the archive job cuts it; each window's states
    # count as a clip's for the score, and --check joins the windows' outputs.
    clips = cut_clips([args.manifest.parent / r["audio"] for r in rows], info.sample_rate, info.max_window_s)
    model = load_model(args.model, args.device, batch_size=args.batch_size)
    if not hasattr(model, "audio_states"):
        parser.error(f"model {args.model!r} does not expose audio_states(); layer selection needs it")
    layers = model.description.reducing_layers  # the blocks audio_states merges in (Whisper: encoder)
    with tqdm(total=layers, desc="layers scored") as bar:

        def states(layer: int) -> list[torch.Tensor]:
            out = model.audio_states(clips.waves, single_merge(layer, args.ratio, args.method, args.seed))
            bar.update()
            return out

        selection = select_layer(states, layers, args.tolerance)
    result = {
        "command": shlex.join(["python", *sys.argv] if argv is None else ["select_layer", *argv]),
        "model": args.model,
        "task": args.task,
        "method": args.method,
        "ratio": args.ratio,
        "manifest_name": args.manifest.parent.name,
        "clips": len(rows),
        "ids": [r["id"] for r in rows],
        "selection": selection.to_dict(),
    }
    if args.check:
        request = TaskRequest(args.task, target_language="en" if args.task == "st" else None)
        refs = [r[reference_fields()[args.task]] for r in rows]
        languages = [r.get("language", "en") for r in rows]

        def score(cfg: ReductionConfig) -> float:
            texts = [o.text for o in run_clips(model, clips, request, cfg, args.batch_size)]
            return next(iter(task_scores(args.task, refs, texts, languages).values()))

        per_layer = [
            score(single_merge(layer, args.ratio, args.method, args.seed))
            for layer in tqdm(range(layers), desc="layers checked")
        ]
        metric = next(iter(task_scores(args.task, refs, refs, languages)))
        result["check"] = {"metric": metric, "none": score(NO_REDUCTION), "per_layer": per_layer}
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "selection.json").write_text(json.dumps(result, indent=1))
    (args.output / "selection.md").write_text(markdown(result))
    plot(result, args.output / "selection.png")
    print(f"chosen layer {selection.layer}; scores {[round(s, 3) for s in selection.scores]}")


def main(argv: list[str] | None = None) -> int:
    return run_job(_run, argv, interrupted="stopped before anything was written; run the command again")


if __name__ == "__main__":
    sys.exit(main())
