r"""Quality under reduction, every method side by side on the same audio (the paper's Table 1 shape).

    python jobs/evaluate.py --manifest ../shared/data/librispeech-dev/manifest.jsonl --task asr \
        --limit 60 --output benchmarks/whisper-tiny-en-librispeech-dev

For each method x target reduction (fraction of audio KV removed, see the model's adapter for what that
means there) it runs every utterance and records the metric (WER / BLEU / accuracy), audio tokens kept,
KV bytes and timings. Writes results.json, results.md (tables) and wer.png (metric vs reduction, one line
per method). Greedy decoding and seeded random methods make every number except timings reproduce
exactly on the same machine and software. Finished runs are kept in runs.jsonl: re-running the same
command skips them (delete the file to measure again); ``--report-only`` rewrites the tables from them.

The method grid (label: method, schedule, first layer) is in ``GRID``, set for Whisper tiny.en's 4
encoder layers; layers are counted from 0 and ``LAST`` means the model's last reducing layer.
``--padding`` runs the whole grid once per padding policy (``ReductionConfig.padding``; models whose
encoder pads every window, Whisper), each policy's parameters from ``pipeline.presets.PADDING`` unless
``--padding-margin`` / ``--padding-group`` say otherwise; labels name the policy when it is not
``keep``. ``h2o`` is left out for Whisper: its encoder has no KV
cache, and the decoder's cross-attention keys have been attended by only the prompt tokens when they are
cached, so there are no heavy hitters to keep (see pipeline/models/whisper_encoder.py).

Tasks and references (manifest fields): asr ``text`` (WER; with a ``language`` field per row, WER over
languages written with spaces, CER over ja/ko/zh, plus a raw CER), st ``translation_en`` (BLEU and
chrF, into English), lid ``language`` (accuracy), er ``text`` (accuracy). Rows without the task's
reference are left out; ``--languages`` keeps only rows of those languages. Every metric gets its own
table; the header counts the clips per language (a small set: one sentence moves BLEU a lot).

    python jobs/evaluate.py --manifest ../shared/data/multilingual-dev/manifest.jsonl --model whisper-base \
        --task st --output benchmarks/whisper-base-multilingual-dev/st
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
import time
from pathlib import Path

import matplotlib
import torch
import transformers
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a job working_dir

from jobs.common import JobParser, add_manifest, output_folder, run_job
from pipeline import metrics
from pipeline.merging.config import PADDING_POLICIES, ReductionConfig
from pipeline.models.base import INT8, check_request
from pipeline.models.registry import DEFAULT_MODEL, describe_model, load_model
from pipeline.presets import PADDING
from pipeline.tasks import TIMESTAMPS, TaskRequest
from workers.clips import Clips, cut_clips, run_clips

log = logging.getLogger(__name__)

LAST = -1
# label: (method, schedule, first layer, max_chain)
GRID = {
    "FastAdaSP constant": ("fastadasp", "constant", 1, None),
    "FastAdaSP decay": ("fastadasp", "decay", 0, None),
    "FastAdaSP single (last layer)": ("fastadasp", "single", LAST, None),
    "FastAdaSP constant, chains <= 2": ("fastadasp", "constant", 1, 2),
    "Average merge": ("average", "single", LAST, None),
    "A-ToMe": ("a-tome", "constant", 0, None),
    "FastV": ("fastv", "single", LAST, None),
    "Random merge": ("random-merge", "single", LAST, None),
    "Random evict": ("random-evict", "single", LAST, None),
}


def select(
    manifest: Path, limit: int | None, seed: int, field: str = "text", languages: list[str] | None = None
) -> list[dict]:
    """Rows with a non-empty reference ``field`` (of ``languages`` if given), a seeded subset of ``limit``."""
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get(field) and (languages is None or r.get("language") in languages)]
    if limit is not None and limit < len(rows):
        chosen = set(random.Random(seed).sample(range(len(rows)), limit))
        rows = [row for i, row in enumerate(rows) if i in chosen]
    return rows


# Clip lengths (s) the timings are grouped by: what a window costs by how much speech it holds.
LENGTH_BINS = (5, 10, 15, 20, 30)


def length_bin(seconds: float) -> str:
    """The LENGTH_BINS interval a clip of ``seconds`` falls in, e.g. '5-10 s' ('> 30 s' past the last)."""
    low = 0
    for high in LENGTH_BINS:
        if seconds <= high:
            return f"{low}-{high} s"
        low = high
    return f"> {low} s"


def run_one(model, clips: Clips, refs, languages, request, cfg, batch: int, task: str) -> dict:
    texts, detected, total, loops = [], [], None, []
    by_length: dict[str, dict[str, float]] = {}
    for out in run_clips(model, clips, request, cfg, batch):  # a clip longer than a window: joined
        texts.append(out.text)
        detected.append(out.language)
        loops += [len(texts) - 1] if out.stats.loop_cuts else []
        total = out.stats if total is None else total + out.stats
        cell = by_length.setdefault(length_bin(out.stats.audio_seconds), dict.fromkeys(TIMES, 0.0))
        for name in TIMES:
            cell[name] += getattr(out.stats, name) if name != "clips" else 1
    row_scores = metrics.task_scores(task, refs, texts, languages)
    row = {"score": next(iter(row_scores.values())), "scores": row_scores, **total.to_dict()}
    row["by_length"] = {k: by_length[k] for k in sorted(by_length, key=_bin_order)}
    row["tokens_kept_frac"] = total.audio_tokens_kept / total.audio_tokens_in
    row["kv_kept_frac"] = total.kv_bytes_kept / total.kv_bytes_full
    return row | {"texts": texts, "languages": detected, "loops_cut": loops}  # utterances cut by the guard


TIMES = ("clips", "encode_s", "prefill_s", "decode_s")


def _bin_order(label: str) -> float:
    return float(label.split("-")[0].lstrip("> "))


def length_table(results: list[dict]) -> list[str]:
    """Milliseconds per clip of the encoder and the decoder (first step + later steps), by clip length:
    one column pair per run that recorded them."""
    timed = [r for r in results if r.get("by_length")]
    if not timed:
        return []
    bins = sorted({b for r in timed for b in r["by_length"]}, key=_bin_order)
    lines = [
        "",
        "Encoder / decoder milliseconds per clip by clip length (each window's share of its batch; CPU: "
        "ratios only):",
        "",
        "| run | " + " | ".join(f"{b} (n)" for b in bins) + " |",
        "|---" * (len(bins) + 1) + "|",
    ]
    for r in timed:
        cells = []
        for b in bins:
            c = r["by_length"].get(b)
            if c is None:
                cells.append("")
                continue
            n = c["clips"]
            cells.append(
                f"{1000 * c['encode_s'] / n:.0f} / {1000 * (c['prefill_s'] + c['decode_s']) / n:.0f} ({n:.0f})"
            )
        target = "" if r["target"] is None else f" {r['target']:.0%}"
        lines.append(f"| {r['label']}{target} | " + " | ".join(cells) + " |")
    return lines


def _scores(row: dict, metric_name: str) -> dict[str, float]:
    return row.get("scores") or {metric_name: row["score"]}  # runs recorded before "scores" existed


def markdown(results: list[dict], levels: list[float], metric_name: str, meta: dict) -> str:
    none = results[0]  # the no-reduction run always comes first
    levels = sorted(levels)
    clips = meta.get("clips_by_language")
    counted = f"{meta['utterances']} utterances"
    if clips and set(clips) != {"en"}:
        counted += " (" + ", ".join(f"{lang} {n}" for lang, n in clips.items()) + ")"
    no_reduction = ", ".join(f"{name} {value:.2f}" for name, value in _scores(none, metric_name).items())
    lines = [
        f"# {meta['model']} on {meta['manifest_name']}: {metric_name} by target reduction",
        "",
        f"{counted} (seed {meta['seed']}), {meta['device']}, greedy decoding. "
        f"No reduction: {no_reduction}. A run whose label names a padding policy reduces the window's "
        "padding that way (pipeline/models/whisper_encoder.py), beside its speech-token reduction.",
    ]
    by_label: dict[str, dict[float, dict]] = {}
    for r in results:
        if r["target"] is not None:
            by_label.setdefault(r["label"], {})[r["target"]] = r
    for name in _scores(none, metric_name):
        lines += [
            "",
            f"{name}:",
            "",
            "| method | " + " | ".join(f"{round(lv * 100)}%" for lv in levels) + " |",
        ]
        lines.append("|---" * (len(levels) + 1) + "|")
        for label, cells in by_label.items():
            values = [_scores(cells[lv], metric_name).get(name) if lv in cells else None for lv in levels]
            lines.append(f"| {label} | " + " | ".join("" if v is None else f"{v:.2f}" for v in values) + " |")
    lines += ["", "Measured (all runs): speech tokens kept averaged over encoder layers, decoder cross-attention "
              "KV kept, generated tokens, utterances the loop guard cut (- : not recorded), encoder / first decoder "
              "step / later steps seconds (CPU: ratios only).", "",
              "| run | target | score | tokens kept | KV kept | gen tokens | loops cut | encode s | prefill s | decode s |",
              "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        target = "" if r["target"] is None else f"{r['target']:.0%}"
        loops = len(r["loops_cut"]) if "loops_cut" in r else "-"  # runs recorded before the count existed
        lines.append(
            f"| {r['label']} | {target} | {r['score']:.2f} | {r['tokens_kept_frac']:.3f} | {r['kv_kept_frac']:.3f} "
            f"| {r['generated_tokens']} | {loops} | {r['encode_s']:.1f} | {r['prefill_s']:.1f} | {r['decode_s']:.1f} |"
        )
    lines += length_table(results)
    lines += ["", f"Command: `{meta['command']}`", ""]
    return "\n".join(lines)


def plot(results: list[dict], metric_name: str, path: Path) -> None:
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    none = results[0]
    ax.axhline(none["score"], color="black", linestyle=":", label="No reduction")
    for label in dict.fromkeys(r["label"] for r in results if r["target"] is not None):
        points = sorted((r["target"] * 100, r["score"]) for r in results if r["label"] == label)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xlabel("target reduction of the decoder's audio KV (%)")
    ax.set_ylabel(metric_name)
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    save_figure(fig, ax, path)


def save_figure(fig: object, ax: object, path: Path) -> None:
    """Grid, tight layout, 120 dpi PNG, figure closed: how every job's plot is written."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parser() -> JobParser:
    parser = JobParser(__doc__)
    add_manifest(parser)
    parser.add_argument(
        "--task",
        default="asr",
        choices=sorted(metrics.reference_fields()),
        help="what is scored: asr WER, st BLEU/chrF into English, lid accuracy, er accuracy",
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="a packaged model, checkpoint folder or hub id"
    )
    parser.add_argument(
        "--methods",
        nargs="*",
        default=list(GRID),
        help="labels of GRID to run (none: only the run without speech-token reduction); quote labels with spaces",
    )
    parser.add_argument(
        "--padding",
        nargs="+",
        choices=PADDING_POLICIES,
        default=["keep"],
        help="padding policies the grid runs under, each its own set of runs (Whisper)",
    )
    parser.add_argument(
        "--padding-margin",
        type=int,
        help="positions kept after the speech (merge; default: presets.PADDING)",
    )
    parser.add_argument(
        "--padding-group",
        type=int,
        help="padding positions per merged token (merge; default: presets.PADDING)",
    )
    parser.add_argument(
        "--levels",
        type=float,
        nargs="*",
        default=[0.1, 0.2, 0.3, 0.4, 0.5],
        help="target audio-KV reductions each method runs at",
    )
    parser.add_argument("--languages", nargs="*", help="only rows of these languages (manifest 'language')")
    parser.add_argument(
        "--single-layer",
        type=int,
        help="layer of the rows GRID merges once at LAST (sparse tasks: the selected one; default: the last)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate a seeded random subset of the rows")
    parser.add_argument("--seed", type=int, default=0, help="subset choice and random methods")
    parser.add_argument(
        "--batch-size",
        "--batch",
        type=int,
        default=8,
        help="rows the model decodes at once, and utterances per model call (--batch: old name)",
    )
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, ...")
    parser.add_argument(
        "--int8", action="store_true", help="Whisper on CPU: int8 decoder (dynamic quantization)"
    )
    parser.add_argument(
        "--timestamps",
        choices=TIMESTAMPS,
        default="none",
        help="run each window with word timing too (its cost shows in the timings; the text is the same)",
    )
    parser.add_argument(
        "--output",
        "--out",
        type=output_folder,
        required=True,
        help="folder of runs.jsonl, results.json, results.md and the plot (--out: old name)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="write the tables from runs.jsonl, measure nothing"
    )
    return parser


Run = tuple[str, ReductionConfig, float | None]  # label, reduction, target level


def padding_fields(args: argparse.Namespace, policy: str) -> dict:
    """The ReductionConfig fields of one ``--padding`` policy: presets.PADDING's, or the margin and
    group the command gives."""
    fields = dict(PADDING[policy])
    if policy == "merge" and args.padding_margin is not None:
        fields["padding_margin"] = args.padding_margin
    if policy == "merge" and args.padding_group is not None:
        fields["padding_group"] = args.padding_group
    return fields


def grid_runs(args: argparse.Namespace, layers: int) -> list[Run]:
    """Per padding policy: no speech-token reduction, then every GRID label at every level."""
    runs: list[Run] = []
    for policy in args.padding:
        fields = padding_fields(args, policy)
        suffix = "" if policy == "keep" else f", padding {policy}"
        runs.append((f"No reduction{suffix}", ReductionConfig(**fields), None))
        # Level by level, in the order given: a partial run still compares every method.
        for level in args.levels:
            for label in args.methods:
                method, schedule, first, max_chain = GRID[label]
                if first == LAST:
                    first = layers - 1 if args.single_layer is None else args.single_layer
                    label = label.replace("(last layer)", f"(layer {first})")
                cfg = ReductionConfig(
                    method,
                    schedule,
                    first_layer=first,
                    target=level,
                    seed=args.seed,
                    max_chain=max_chain,
                    **fields,
                )
                runs.append((label + suffix, cfg, level))
    return runs


def run_meta(
    args: argparse.Namespace, argv: list[str] | None, rows: list[dict], languages: list[str]
) -> dict:
    """What every result of the evaluation shares: the command, model, clips, seed and software."""
    return {
        # The command that measures these runs (--report-only only rewrites the tables).
        "command": shlex.join(["python", *sys.argv] if argv is None else ["evaluate", *argv]).replace(
            " --report-only", ""
        ),
        "model": args.model,
        "manifest_name": args.manifest.parent.name,
        "utterances": len(rows),
        "clips_by_language": {lang: languages.count(lang) for lang in sorted(set(languages))},
        "ids": [r["id"] for r in rows],
        "seed": args.seed,
        "device": args.device,
        "int8": args.int8,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def finished_runs(path: Path) -> list[dict]:
    """The runs appended to runs.jsonl so far, their configs through ReductionConfig: fields added since
    (at their defaults) still match."""
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for d in done:
        d["key"]["config"] = ReductionConfig(**d["key"]["config"]).to_dict()
    return done


def _run(argv: list[str] | None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    unknown = set(args.methods) - set(GRID)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; known: {list(GRID)}")

    torch.manual_seed(args.seed)
    field = metrics.reference_fields()[args.task]
    rows = select(args.manifest, args.limit, args.seed, field, args.languages)
    if not rows:
        parser.error(f"no row of {args.manifest} has a {field!r} reference for --task {args.task}")
    info = describe_model(args.model)  # config files only: a wrong name is refused before any decoding
    refused = [p for p in args.padding if p not in info.padding]
    if refused:
        parser.error(f"--padding {' '.join(refused)}: {args.model} has only {', '.join(info.padding)}")
    runs = grid_runs(args, info.reducing_layers)
    done_path = args.output / "runs.jsonl"
    # Finished runs are appended to runs.jsonl, so an interrupted evaluation resumes where it stopped.
    done = finished_runs(done_path)
    log.info(
        "%d configurations on %d utterances (those finished in %s are reused; --methods and --levels "
        "choose fewer)",
        len(runs),
        len(rows),
        done_path,
    )
    paths = [args.manifest.parent / r["audio"] for r in rows]
    clips = cut_clips(paths, info.sample_rate, info.max_window_s)  # a clip that fails is refused here
    if clips.windows:
        log.info(
            "%d clips longer than the model's window are cut and stitched as the archive job does",
            len(clips.windows),
        )
    refs = [r[field] for r in rows]
    languages = [r.get("language", "en") for r in rows]
    request = TaskRequest(
        args.task, target_language="en" if args.task == "st" else None, timestamps=args.timestamps
    )
    check_request(info, request, "int8" if args.int8 else None)
    model = load_model(args.model, args.device, INT8 if args.int8 else None, batch_size=args.batch_size)
    metric_name = next(iter(metrics.task_scores(args.task, refs, refs, languages)))  # the headline metric
    meta = run_meta(args, argv, rows, languages)
    args.output.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for label, cfg, level in tqdm(runs, desc="configurations"):
            # "padding" as runs recorded before padding policies named it (they kept it)
            key = {"model": args.model, "ids": meta["ids"], "config": cfg.to_dict(), "padding": cfg.padding}
            if args.int8:  # only then: keys of float runs stay as they were
                key["int8"] = True
            if args.timestamps != "none":  # the same text, other timings
                key["timestamps"] = args.timestamps
            row = next((d for d in done if d["key"] == key), None)
            if row is None and args.report_only:
                continue
            if row is None:
                start = time.perf_counter()
                row = {
                    "key": key,
                    "label": label,
                    "target": level,
                    "padding": cfg.padding,
                    "config": cfg.to_dict(),
                }
                row |= run_one(model, clips, refs, languages, request, cfg, args.batch_size, args.task)
                row["wall_s"] = time.perf_counter() - start
                with done_path.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
                tqdm.write(
                    f"{label} {level}: {metric_name} {row['score']:.2f} KV kept {row['kv_kept_frac']:.3f}"
                )
            results.append({k: v for k, v in row.items() if k != "key"})
            (args.output / "results.json").write_text(
                json.dumps({"meta": meta, "results": results}, indent=1)
            )
            (args.output / "results.md").write_text(markdown(results, args.levels, metric_name, meta))
            plot(
                results, metric_name, args.output / ("wer.png" if args.task == "asr" else f"{args.task}.png")
            )
    except KeyboardInterrupt as err:
        raise KeyboardInterrupt(
            f"{len(finished_runs(done_path))} finished configurations are kept in {done_path}; "
            "rerun the same command to resume after them"
        ) from err


def main(argv: list[str] | None = None) -> int:
    return run_job(
        _run, argv, interrupted="stopped before a configuration finished; run the same command again"
    )


if __name__ == "__main__":
    sys.exit(main())
