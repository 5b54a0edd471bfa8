"""Cost of one merge step (plan_reduction + Reduction.apply) against one 7B decoder layer's prefill.

    python benchmarks/merge_step.py --out merge_step.json                              # CUDA, 7B shapes
    TRITON_INTERPRET=1 python benchmarks/merge_step.py --cpu-smoke --out smoke.json   # tiny, interpreted

One Qwen2 decoder layer (hidden 4096, 32 heads, MLP 11008, bf16, random weights) prefills L = 6,000
tokens through the engine's own ops (rope, qkv, SDPA, o, MLP). Its keys, attention mass and hidden
states feed the merge step of each method and k, on both paths (Triton kernels, PyTorch). The target
is the merge step without the attention mass under 2% of the layer.

Times (median ms, CUDA events after warm-up):
- ``*_ms``: the GPU's time with the launch queue filled first (a spin kernel runs while the host
  enqueues), as inside the engine, where the layer's kernels keep the GPU ahead of the host; a host
  sync inside the step still shows, because it drains the queue.
- ``eager_ms``: plan + apply launched onto an idle GPU, so host launch costs show too.
- ``graph_ms``: plan + apply replayed from one CUDA graph (Triton path; capture fails on a host sync).
``host_sync_free`` runs the step under torch.cuda.set_sync_debug_mode("error").
The CPU smoke run times with perf_counter and only shows that everything runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

import torch

from benchmarks.common import (
    build_model,
    cell,
    elapsed_ms,
    environment,
    graphed,
    median_ms,
    require_device,
    script_parser,
    text_table,
)
from pipeline.engine.stack import DecoderStack
from pipeline.kernels.attention_mass import attention_mass
from pipeline.kernels.paths import forced_path
from pipeline.merging import ops


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--length", type=int, default=6000, help="prompt tokens L")
    parser.add_argument("--span", type=int, nargs=2, default=[50, 5950], help="audio span [start, end)")
    parser.add_argument("--ks", type=int, nargs="+", default=[1500, 2900], help="tokens removed")
    parser.add_argument("--methods", nargs="+", default=["fastadasp", "a-tome", "fastv"])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.length, args.span, args.ks = 40, [3, 37], [6, 12]
        args.hidden, args.heads, args.kv_heads, args.intermediate, args.iters = 64, 4, 2, 128, 1
    return args


class Timer:
    """Median milliseconds of fn(): ``queued`` (GPU time, queue filled first) or ``eager``."""

    def __init__(self, cuda: bool, iters: int) -> None:
        self.cuda, self.iters = cuda, iters
        self.spin_cycles = self._cycles_for_ms(2.0) if cuda else 0

    def _cycles_for_ms(self, ms: float) -> int:
        """Spin-kernel cycles that keep the GPU busy for about ``ms``."""
        probe = 10_000_000
        torch.cuda._sleep(probe)  # warm the spin kernel up
        return int(probe * ms / elapsed_ms(lambda: torch.cuda._sleep(probe), cuda=True))

    def __call__(self, fn: Callable[[], Any], queued: bool = True) -> float:
        spin = (lambda: torch.cuda._sleep(self.spin_cycles)) if queued and self.cuda else None
        return median_ms(fn, self.cuda, self.iters, warmup=3 if self.cuda else 0, before=spin)


def build_layer(args: argparse.Namespace, device: str, dtype: torch.dtype) -> DecoderStack:
    """A one-layer Qwen2 model with random weights, viewed as the engine's DecoderStack."""
    config = {
        "vocab_size": 256,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": 1,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "max_position_embeddings": max(args.length, 32768),
    }
    model = build_model(config, device, dtype)
    return DecoderStack(model.model, model.lm_head)


def layer_inputs(stack: Any, hidden: Any, span: tuple[int, int]) -> dict[str, Any]:
    """One prefill layer as the engine runs it, returning what its merge step reads."""
    b, length, _ = hidden.shape
    layer = stack.layers[0]
    positions = torch.arange(length, device=hidden.device).expand(b, length)
    cos, sin = stack.rope(positions)
    q, k, v = stack.qkv(layer, layer.attn_norm(hidden), cos, sin)
    attended, lse = stack.attend_with_lse(q, k, v)
    mass = torch.zeros(b, length, dtype=torch.float32, device=hidden.device)
    mass[:, span[0] : span[1]] = attention_mass(q, k, scale=stack.scale, causal=True, span=span, lse=lse)
    return {"q": q, "k": k, "v": v, "lse": lse, "mass": mass, "hidden": hidden + layer.o(attended)}


def layer_step(stack: Any, hidden: Any) -> Callable[[], Any]:
    """The layer's prefill without the merge: rope, qkv, SDPA, o, MLP (norms and residuals included)."""
    b, length, _ = hidden.shape
    layer = stack.layers[0]
    positions = torch.arange(length, device=hidden.device).expand(b, length)

    def run() -> Any:
        cos, sin = stack.rope(positions)
        q, k, v = stack.qkv(layer, layer.attn_norm(hidden), cos, sin)
        h = hidden + layer.o(stack.attend(q, k, v, causal=True))
        return h + stack.mlp(layer, layer.mlp_norm(h))

    return run


def _sync_free(fn: Callable[[], Any]) -> bool | str:
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return True
    except RuntimeError as error:
        return f"False: {error}"[:200]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def bench_step(
    method: str, k: int, path: str, inputs: dict[str, Any], args: argparse.Namespace, timer: Timer
) -> dict[str, Any]:
    """Times one method, count and path; returns the row and (for checks) its reduction and output."""
    span = tuple(args.span)
    x = inputs["hidden"]

    def plan() -> ops.Reduction:
        with forced_path(path):
            return ops.plan_reduction(method, args.length, [span], [k], keys=inputs["k"], mass=inputs["mass"])

    red = plan()

    def apply() -> Any:
        with forced_path(path):
            return red.apply(x)

    def step() -> Any:
        reduction = plan()
        with forced_path(path):
            return reduction.apply(x)

    row: dict[str, Any] = {"method": method, "k": k, "path": path, "n_out": red.n_out}
    row["plan_ms"] = timer(plan)
    row["apply_ms"] = timer(apply)
    row["step_ms"] = timer(step)
    row["eager_ms"] = timer(step, queued=False)
    moved = (args.length + red.n_out) * x.shape[-1] * x.element_size() * x.shape[0]
    row["apply_gb_per_s"] = moved / row["apply_ms"] / 1e6
    if timer.cuda and path == "triton":
        row["host_sync_free"] = _sync_free(step)
        try:
            row["graph_ms"] = timer(graphed(step))
        except RuntimeError as error:  # a capture error is a result, not a crash
            row["graph_ms"] = f"capture failed: {error}"[:200]
    row["reduction"], row["out"] = red, apply()
    return row


def _lead(red: Any) -> Any:
    """Each group's first weighted token (0..L-1): its position under the ``first`` policy."""
    batch, length = red.groups.shape
    return red.positions(torch.arange(length, device=red.groups.device).expand(batch, length))


def compare(triton_row: dict[str, Any], torch_row: dict[str, Any], x: Any) -> dict[str, Any]:
    """Same plan on both paths; copies (groups of one weighted member) bit-identical; merged rows close."""
    a, b = triton_row.pop("reduction"), torch_row.pop("reduction")
    out_a, out_b = triton_row.pop("out"), torch_row.pop("out")
    weighted = torch.zeros(a.groups.shape[0], a.n_out, dtype=torch.int64, device=a.groups.device)
    single = weighted.scatter_add_(1, a.groups, (a.weights > 0).long()) == 1
    lead = _lead(a)[..., None].expand(-1, -1, x.shape[-1])
    return {
        "same_groups": bool(torch.equal(a.groups, b.groups)),
        "same_lead": bool(torch.equal(_lead(a), _lead(b))),
        "copies_exact": bool(torch.equal(out_a[single], x.gather(1, lead)[single])),
        "max_abs_diff": float((out_a.float() - out_b.float()).abs().max()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = _parse(argv)
    cuda = require_device(args.cpu_smoke)
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    timer = Timer(cuda, args.iters)
    span = tuple(args.span)
    with torch.inference_mode():
        stack = build_layer(args, device, dtype)
        gen = torch.Generator(device=device).manual_seed(0)
        hidden = torch.randn(1, args.length, args.hidden, generator=gen, device=device, dtype=dtype)
        inputs = layer_inputs(stack, hidden, span)
        layer_ms = timer(layer_step(stack, hidden))
        q, keys, values = inputs["q"], inputs["k"], inputs["v"]
        mass_args = {"scale": stack.scale, "causal": True, "span": span}
        context = {
            "layer_ms": layer_ms,
            # Merge layers run attention_with_lse instead of SDPA; the mass then reuses its lse.
            "sdpa_ms": timer(lambda: stack.attend(q, keys, values, causal=True)),
            "attention_with_lse_ms": timer(lambda: stack.attend_with_lse(q, keys, values)),
            "attention_mass_ms": timer(lambda: attention_mass(q, keys, **mass_args)),
            "attention_mass_given_lse_ms": timer(
                lambda: attention_mass(q, keys, lse=inputs["lse"], **mass_args)
            ),
        }
        context["mass_pct_of_layer"] = (
            100
            * (context["attention_mass_given_lse_ms"] + context["attention_with_lse_ms"] - context["sdpa_ms"])
            / layer_ms
        )
        rows, checks = [], []
        result = {
            **environment(cuda),
            "shape": {
                "length": args.length,
                "span": list(span),
                "hidden": args.hidden,
                "heads": args.heads,
                "kv_heads": args.kv_heads,
                "intermediate": args.intermediate,
                "dtype": str(dtype),
            },
            **context,
            "steps": rows,
            "checks": checks,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        # Written after every case: a time limit keeps what was measured before it.
        args.out.write_text(json.dumps(result, indent=2, default=str))
        for method in args.methods:
            for k in args.ks:
                try:
                    pair = [
                        bench_step(method, k, path, inputs, args, timer) for path in ("triton", "pytorch")
                    ]
                except Exception as error:  # one failing case must not lose the others
                    rows.append({"method": method, "k": k, "error": repr(error)[:300]})
                    continue
                checks.append({"method": method, "k": k, **compare(*pair, inputs["hidden"])})
                for row in pair:
                    row["pct_of_layer"] = 100 * row["step_ms"] / layer_ms
                rows += pair
                args.out.write_text(json.dumps(result, indent=2, default=str))
    columns = ["method", "k", "path", "plan_ms", "apply_ms", "step_ms", "pct_of_layer", "eager_ms"]
    columns += ["graph_ms", "host_sync_free", "apply_gb_per_s", "error"]
    print(text_table(rows, columns))
    print(text_table(checks, list(checks[0]) if checks else ["method"]))
    print(f"{result['device']}  torch {result['torch']}  triton {result['triton']}")
    print(text_table([context], list(context)))
    print(_summary(rows, checks))
    return result


def _summary(rows: list[dict[str, Any]], checks: list[dict[str, Any]]) -> str:
    """One line per method and k, last in the output (the GPU script keeps only its tail)."""
    lines = ["merge step = plan + apply (GPU ms, % of the layer): triton | pytorch | checks"]
    for check in checks:
        pair = {r["path"]: r for r in rows if (r["method"], r["k"]) == (check["method"], check["k"])}
        tr, pt = pair["triton"], pair["pytorch"]
        same = check["same_groups"] and check["same_lead"] and check["copies_exact"]
        lines.append(
            f"{check['method']:>9} k={check['k']:<5} {tr['step_ms']:.3f} ({tr['pct_of_layer']:.1f}%)"
            f" graph {cell(tr.get('graph_ms', '-'))} sync-free {tr.get('host_sync_free', '-')}"
            f" | {pt['step_ms']:.3f} ({pt['pct_of_layer']:.1f}%) | {'ok' if same else 'MISMATCH'}"
            f" max diff {check['max_abs_diff']:.2g}"
        )
    lines += [f"{r['method']} k={r['k']}: {r['error']}" for r in rows if "error" in r]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
