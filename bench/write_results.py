#!/usr/bin/env python3
"""Write the attention benchmark JSON (from run_gpu.py) into RESULTS.md and a speedup-vs-frames PNG.

    python3 bench/write_results.py --json run1/attention_bench.json [run2/attention_bench.json ...]
                                   [--md bench/RESULTS.md] [--png bench/speedup_vs_frames.png]

Only the section between ``<!-- attention-bench:start -->`` and ``<!-- attention-bench:end -->`` is
replaced (appended when missing), so other sections of RESULTS.md survive; the same JSON gives the same text.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

START = "<!-- attention-bench:start -->"
END = "<!-- attention-bench:end -->"
_DIR = os.path.dirname(os.path.abspath(__file__))

# Issue 3 targets on the anchor layout (Wan 2.1 1.3B, LVSA W=4, n_first=1, ref=21).
_TARGETS = (
    ("wan-w4-t121", "triton time <= 1.1x FlashInfer", "triton_time_over_flashinfer", "<=", 1.1),
    ("wan-w4-t121", "triton >= 1.6x faster than Flex", "triton_speedup_vs_flex", ">=", 1.6),
    ("wan-w4-t121", "triton >= 4.5x vs best dense", "triton_speedup_vs_dense", ">=", 4.5),
    ("wan-w4-t121", "triton >= 480 effective TFLOP/s", "triton_tflops", ">=", 480.0),
    ("wan-w4-t121", "triton peak extra memory < 16 MiB", "triton_peak_extra_mib", "<", 16.0),
    ("wan-w4-t121", "triton bf16 relative error <= 1e-2, no unwritten/non-finite output", "triton_rel_err", "<=", 1e-2),
    ("wan-w4-t81", "triton >= 3.4x vs best dense", "triton_speedup_vs_dense", ">=", 3.4),
    ("wan-t21", "triton >= 0.85x of cuDNN dense (dense pattern)", "triton_vs_cudnn", ">=", 0.85),
)


def _ok(r: Optional[Dict[str, Any]]) -> bool:
    return r is not None and r.get("status") in ("ok", "wrong")


def _ms(r: Optional[Dict[str, Any]]) -> str:
    if not _ok(r):
        return "—" if r is None or r.get("status") == "skipped" else "error"
    return f"{r['ms']:.1f}" + ("" if r["status"] == "ok" else " (WRONG)")


def _ratio(x: Optional[float], suffix: str = "x") -> str:
    return "—" if x is None else f"{x:.2f}{suffix}"


def _case_values(c: Dict[str, Any]) -> Dict[str, Optional[float]]:
    """Derived numbers used by the tables and the target list."""
    m, s = c["methods"], c.get("summary", {})
    tri = m.get("triton") if _ok(m.get("triton")) else None
    cud = m.get("dense_cudnn") if _ok(m.get("dense_cudnn")) else None
    return {
        "triton_time_over_flashinfer": s.get("triton_time_over_flashinfer"),
        "triton_time_over_flashinfer_interleaved": s.get("triton_time_over_flashinfer_interleaved"),
        "triton_speedup_vs_flex": s.get("triton_speedup_vs_flex"),
        "triton_speedup_vs_dense": tri.get("speedup_vs_dense") if tri else None,
        "triton_tflops": tri["tflops"] if tri else None,
        "triton_peak_extra_mib": tri.get("peak_extra_mib") if tri else None,
        "triton_rel_err": (tri["rel_err"] if tri["nonfinite"] == 0 else float("inf")) if tri and "rel_err" in tri
        else None,
        "triton_vs_cudnn": cud["ms"] / tri["ms"] if tri and cud else None,
    }


def _summary_table(cases: Sequence[Dict[str, Any]], with_run: bool) -> List[str]:
    head = (("| run " if with_run else "") + "| T | tokens | pattern | density | dense ms (best) | Flex ms | FlashInfer ms | ours ms | ours (FI backend) ms "
            "| ours vs dense | ours vs Flex | ours time / FlashInfer | same, interleaved | ours eff. TFLOP/s "
            "| ours peak extra MiB "
            "| ours rel. err |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cases:
        m, s, cs = c["methods"], c.get("summary", {}), c["case"]
        tri = m.get("triton")
        fi_name = s.get("flashinfer_method", "flashinfer")
        fi = m.get(fi_name)
        fi_cell = _ms(fi) + (" †" if fi_name == "ours_flashinfer" and _ok(fi) else "")
        dense = f"{s['dense_best_ms']:.1f} ({s['dense_best'].replace('dense_', '')})" if "dense_best" in s else "—"
        vals = _case_values(c)
        tflops = "—" if vals["triton_tflops"] is None else f"{vals['triton_tflops']:.0f}"
        mib = "—" if vals["triton_peak_extra_mib"] is None else f"{vals['triton_peak_extra_mib']:.1f}"
        lines.append(
            (f"| {c['run']} " if with_run else "") + f"| {cs['frames']} | {cs['tokens']:,} | {cs['pattern']} | {c['layout']['density']:.3f} | {dense} "
            f"| {_ms(m.get('flex'))} | {fi_cell} | {_ms(tri)} | {_ms(m.get('ours_flashinfer'))} "
            f"| {_ratio(vals['triton_speedup_vs_dense'])} | {_ratio(vals['triton_speedup_vs_flex'])} "
            f"| {_ratio(vals['triton_time_over_flashinfer'], '')} "
            f"| {_ratio(vals['triton_time_over_flashinfer_interleaved'], '')} "
            f"| {tflops} | {mib} | {_err(tri)} |")
    return lines


def _err(r: Optional[Dict[str, Any]]) -> str:
    if not _ok(r):
        return "—"
    if "rel_err" not in r:
        return "not compared"
    return f"{r['rel_err']:.1e}" + ("" if r["nonfinite"] == 0 else f", {r['nonfinite']} non-finite")


def _detail_table(cases: Sequence[Dict[str, Any]]) -> List[str]:
    lines = ["| case | method | ms | vs best dense | TFLOP/s (computed pairs) | dense-equiv. TFLOP/s | peak extra MiB "
             "| max abs err | rel. err | notes |", "|" + "---|" * 10]
    for c in cases:
        for name, r in c["methods"].items():
            if _ok(r):
                mib = "—" if r.get("peak_extra_mib") is None else f"{r['peak_extra_mib']:.1f}"
                mae = f"{r['max_abs_err']:.1e}" if "max_abs_err" in r else "—"
                lines.append(f"| {c['case']['name']} | {name} | {r['ms']:.2f} | {_ratio(r.get('speedup_vs_dense'))} "
                             f"| {r['tflops']:.0f} | {r['dense_equiv_tflops']:.0f} | {mib} | {mae} | {_err(r)} "
                             f"| {_notes(r)} |")
            else:
                why = (r.get("reason") or r.get("error") or "").replace("|", "/").replace("\n", " ")
                lines.append(f"| {c['case']['name']} | {name} | {r['status']} | | | | | | | {why[:160]} |")
    return lines


def _notes(r: Dict[str, Any]) -> str:
    info = r.get("info", {})
    keep = ("sdpa_backend", "mask_builder", "compile_mode", "module_source", "wrapper_backend", "plan_ms", "backend")
    return ", ".join(f"{k}={info[k]}" for k in keep if k in info).replace("|", "/")


def _targets(cases: Sequence[Dict[str, Any]]) -> List[str]:
    by = {c["case"]["name"]: c for c in cases}
    lines = []
    for case, text, key, op, bound in _TARGETS:
        if case not in by:
            lines.append(f"- {case}: {text}: not measured")
            continue
        v = _case_values(by[case])[key]
        if v is None:
            lines.append(f"- {case}: {text}: not measured")
            continue
        met = {"<=": v <= bound, ">=": v >= bound, "<": v < bound}[op]
        lines.append(f"- {case}: {text}: measured {v:.3g} — {'met' if met else 'MISSED'}")
    return lines


def merge(docs: Sequence[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], List[Dict[str, Any]]]:
    """Cases of several run_gpu.py documents (a later run's case replaces an earlier one of the same name),
    each tagged with ``run`` (1-based), and the skipped cases that no run measured."""
    by_name: Dict[str, Dict[str, Any]] = {}
    for i, doc in enumerate(docs, 1):
        for c in doc["cases"]:
            by_name[c["case"]["name"]] = {**c, "run": i}
    skipped = [dict(sk, run=i) for i, doc in enumerate(docs, 1) for sk in doc.get("skipped_cases", [])
               if sk["name"] not in by_name]
    return list(by_name.values()), skipped


def _run_line(doc: Dict[str, Any]) -> str:
    commit = ""
    if doc.get("git_commit"):
        changed = doc.get("git_changed_files")
        commit = f" (commit {doc['git_commit']}{f' + {changed} changed files' if changed else ''})"
    return (f"{doc['date']} on **{doc['device']}**: torch {doc['torch']} (CUDA {doc.get('cuda')}, cuDNN "
            f"{doc.get('cudnn')}), Triton {doc['triton']}, FlashInfer {doc.get('flashinfer') or 'not installed'}, "
            f"lvsa_kernels {doc.get('lvsa_kernels')}{commit}; command `{doc['command']}`")


def render(docs: Sequence[Dict[str, Any]]) -> str:
    """The markdown section (markers included) for one or more run_gpu.py JSON documents."""
    cases, skipped = merge(docs)
    out = [START, "## Attention kernels: one forward call", ""]
    if len(docs) == 1:
        out.append(f"Measured {_run_line(docs[0])}. All methods in one process.")
    else:
        out.append("Measured in these runs; each case's methods were all measured in the same run (column `run`):")
        out += [""] + [f"{i}. {_run_line(d)}" for i, d in enumerate(docs, 1)]
    st = docs[-1]["settings"]
    timer = ("median of `triton.testing.do_bench`" if docs[-1]["device"] != "cpu" else "median of `time.perf_counter`")
    out += ["", f"Inputs: fresh `torch.randn` q/k/v `[B, S, H, D]`; errors vs a float32 `reference_attention` "
                f"(relative error = ‖out − ref‖ / ‖ref‖; bf16 bar 1e-2); time = {timer} "
                f"(warm-up {st['warmup_ms']:g} ms, rep ≥ {st['rep_ms']:g} ms and ≥ {st['min_iters']} calls); "
                "TFLOP/s = 4·B·H·D·(computed pairs) / time; peak extra = peak allocated during one call minus memory "
                "before it minus a newly allocated output. \"dense\" is the fastest dense SDPA method run (cuDNN, "
                "flash) over all tokens, mask-free (HunyuanVideo text unpadded). † = our FlashInfer backend (the "
                "direct BSR baseline needs a uniform block grid, so it skips text)."]
    models: Dict[str, List[Dict[str, Any]]] = {}
    for c in cases:
        models.setdefault(c["case"]["model"], []).append(c)
    for model, mcases in models.items():
        cs = mcases[0]["case"]
        out += ["", f"### {model} ({cs['heads']} heads x {cs['head_dim']}, {cs['dtype']}, "
                    f"{cs['tokens_per_frame']} tokens/frame"
                + (f", {cs['text_tokens']} text tokens after the video" if cs["text_tokens"] else "") + ")", ""]
        out += _summary_table(mcases, with_run=len(docs) > 1)
        out += ["", "<details><summary>all methods</summary>", ""] + _detail_table(mcases) + ["", "</details>"]
    out += ["", "### Issue 3 targets (anchor layout W=4, n_first=1, ref=21)", ""] + _targets(cases)
    for sk in skipped:
        out.append(f"- case {sk['name']} not run" + (f" (run {sk['run']})" if len(docs) > 1 else "")
                   + f": {sk['reason']}")
    ref_modes = sorted({c["reference"]["mode"] for c in cases})
    out += ["", f"Reference check: {'; '.join(ref_modes) or 'none'}.", END]
    return "\n".join(out) + "\n"


def replace_section(text: str, section: str) -> str:
    """``text`` with the marked section replaced by ``section`` (appended when there is none)."""
    i, j = text.find(START), text.find(END)
    if i >= 0 and j > i:
        tail = text[j + len(END):]
        return text[:i] + section.rstrip("\n") + (tail if tail.strip() else "\n")
    if not text.strip():
        return "# Benchmark results\n\n" + section
    return text.rstrip("\n") + "\n\n" + section


def plot(docs: Sequence[Dict[str, Any]], path: str) -> None:
    """Speedup vs best dense over latent frames T: one panel per (model, pattern), one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases, _ = merge(docs)
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for c in cases:
        text = f", {c['case']['text_tokens']} text tokens" if c["case"]["text_tokens"] else ""
        groups.setdefault((c["case"]["model"], c["case"]["pattern"] + text), []).append(c)
    if not groups:
        return
    all_names = sorted({n for c in cases for n, r in c["methods"].items() if not r.get("dense")})
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(all_names)}
    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
    for ax, ((model, pattern), gcases) in zip(axes[0], groups.items()):
        gcases = sorted(gcases, key=lambda c: c["case"]["frames"])
        frames = [c["case"]["frames"] for c in gcases]
        ax.plot(frames, [c["layout"]["ideal_speedup"] for c in gcases], "k--", label="ideal 1/density")
        for name in all_names:
            pts = [(c["case"]["frames"], c["methods"][name]["speedup_vs_dense"]) for c in gcases
                   if _ok(c["methods"].get(name)) and "speedup_vs_dense" in c["methods"][name]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name, color=colors[name])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set(title=f"{model}\n{pattern}", xlabel="latent frames T", ylabel="speedup vs best dense SDPA")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("; ".join(sorted({f"{d['device']}, {d['date']}" for d in docs})), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, nargs="+",
                   help="attention_bench.json file(s) written by run_gpu.py; a later file's case replaces an earlier one")
    p.add_argument("--md", default=os.path.join(_DIR, "RESULTS.md"))
    p.add_argument("--png", default=os.path.join(_DIR, "speedup_vs_frames.png"))
    args = p.parse_args(argv)
    docs = []
    for path in args.json:
        with open(path) as f:
            docs.append(json.load(f))
    old = open(args.md).read() if os.path.exists(args.md) else ""
    with open(args.md, "w") as f:
        f.write(replace_section(old, render(docs)))
    plot(docs, args.png)
    print(f"wrote {args.md} and {args.png} ({len(merge(docs)[0])} cases from {len(docs)} run(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
