"""Write the end-to-end step (bench/e2e_step.py), SVOO (bench/svoo_bench.py) and context-parallel
(bench/multigpu_step.py) JSONs into RESULTS.md.

Each goes into its own marked section (``<!-- e2e:start/end -->``, ``<!-- svoo:... -->``, ``<!-- cp:... -->``),
so the attention table written by `write_results.py` and hand-written notes stay untouched.

    python3 bench/write_step_results.py --e2e bench/results/h100_e2e_run4.json \
        --svoo bench/results/h100_svoo_run5.json --cp bench/results/h200x2_cp_world1.json \
        bench/results/h200x2_cp_world2.json --md bench/RESULTS.md --png bench/e2e_speedup.png
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import List, Optional


def replace_section(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"


def e2e_section(data: dict, source: str, png: Optional[str]) -> str:
    meta = data["meta"]
    lines = [
        "## End-to-end: one denoising step of a Wan 2.1 1.3B-shaped transformer",
        "",
        f"{meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['dtype']}, "
        f"{meta['resolution'][0]}x{meta['resolution'][1]}, random weights (real config), batch 1, one transformer forward; "
        f"median of {meta['repeats']} runs after a warm-up. Command: `python3 bench/e2e_step.py --repeats {meta['repeats']} "
        f"--time-budget 300 --json-out ...` (raw: `{source}`). LVSA = `enable_lvsa(transformer, backend=\"triton\")`, "
        "default pattern (W=3, n_first=1, ref=21). \"default\" = diffusers' default attention dispatch.",
        "",
        "| video frames | T | tokens | kfi | frame density | dense cuDNN s | dense default s | LVSA s | vs cuDNN | vs default | rel. diff vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(
            f"| {r['frames']} | {r['latent_frames']} | {r['video_tokens']:,} | {r['kfi']} | {r['frame_density']:.3f} | "
            f"{r['dense_cudnn']['seconds']:.3f} | {r['dense_default']['seconds']:.3f} | {r['lvsa']['seconds']:.3f} | "
            f"{r['speedup_vs_dense_cudnn']:.2f}x | {r['speedup_vs_dense_default']:.2f}x | {r['rel_diff']:.1e} |")
    lines += ["", "rel. diff compares the whole transformer output with the dense (cuDNN) step; where the pattern is "
              "sparse it measures the pattern's effect, not an error."]
    if png:
        lines += ["", f"![LVSA step speedup]({Path(png).name})"]
    return "\n".join(lines)


def svoo_section(data: dict, source: str) -> str:
    lines = [
        "## SVOO: clustering + permutation + block-sparse attention vs dense (one attention call)",
        "",
        f"{data['device']}, torch {data['torch']}, Wan 2.1 1.3B shape (12 heads x 128, bf16), 81 frames; synthetic "
        f"clustered q/k. Command: `python3 bench/svoo_bench.py --time-budget 200` (raw: `{source}`). Times in ms. "
        "reuse = one full `SVOOPattern.attention` call on a step that reuses clusters; recluster = one that re-clusters.",
        "",
        "| case | tokens | floor | density | recall | cluster | select+layout | permute | sparse attn | unpermute | reuse call | recluster call | dense cuDNN | sparse attn vs dense | full call vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        ms = r["ms"]
        lines.append(
            f"| {r['case']} | {r['tokens']:,} | {r['floor_keep_ratio']:.2f} | {r['density']:.3f} | {r['recall']:.3f} | "
            f"{ms['cluster']:.1f} | {ms['select_layout']:.1f} | {ms['permute']:.2f} | {ms['sparse_attn']:.1f} | "
            f"{ms['unpermute']:.2f} | {ms['svoo_reuse']:.1f} | {ms['svoo_recluster']:.1f} | {ms['dense']:.1f} | "
            f"{ms['dense'] / ms['sparse_attn']:.2f}x | {r['speedup_reuse']:.2f}x |")
    lines += ["", "Not at target: the planning path (selection, layout and schedule built on the host every call) "
              "dominates, and the kernel runs short ~74-token key clusters at low efficiency. See the issue 6 note."]
    return "\n".join(lines)


def cp_section(runs: List[dict], sources: List[str]) -> str:
    meta = runs[0]["meta"]
    lines = [
        "## Multi-GPU: one Wan 2.1 1.3B-shaped step under diffusers' Ulysses context parallelism",
        "",
        f"{meta['device']} x world size, torch {meta['torch']}, diffusers {meta['diffusers']}, NCCL {meta['nccl']} "
        f"(NCCL_NVLS_ENABLE={meta['NCCL_NVLS_ENABLE']}), {meta['dtype']}, {meta['frames']} frames "
        f"(T={meta['latent_frames']}, {meta['tokens']:,} tokens), random weights broadcast from rank 0; median of "
        f"{meta['repeats']} steps after a warm-up. Dense = diffusers' `{meta['dense_backend']}` backend with its own "
        f"Ulysses; LVSA = `enable_lvsa(backend=\"{meta['lvsa_backend']}\")` under the same parallel config. "
        "Command: `torchrun --standalone --nproc_per_node N bench/multigpu_step.py --ref /tmp/cp_ref.pt --repeats 2 ...` "
        f"(raw: {', '.join(f'`{s}`' for s in sources)}).",
        "",
        "| GPUs | LVSA s | dense s | LVSA vs dense | LVSA speedup vs 1 GPU | LVSA scaling efficiency | dense scaling efficiency | rel. diff vs 1 GPU (LVSA / dense) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        w, r = run["meta"]["world_size"], run["results"]
        lv, de = r["lvsa"], r["dense"]
        lines.append(
            f"| {w} | {lv['seconds']:.3f} | {de['seconds']:.3f} | {de['seconds'] / lv['seconds']:.2f}x | "
            f"{lv.get('speedup_vs_1gpu', 1.0):.2f}x | {lv.get('efficiency', 1.0):.1%} | {de.get('efficiency', 1.0):.1%} | "
            f"{lv.get('rel_diff_vs_1gpu', 0.0):.1e} / {de.get('rel_diff_vs_1gpu', 0.0):.1e} |")
    return "\n".join(lines)


def plot_e2e(data: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["results"]
    frames = [r["frames"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(frames, [r["speedup_vs_dense_cudnn"] for r in rows], "o-", label="LVSA vs dense cuDNN")
    ax.plot(frames, [r["speedup_vs_dense_default"] for r in rows], "s--", label="LVSA vs dense default")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("video frames (480x832)")
    ax.set_ylabel("step speedup")
    ax.set_title(f"Wan 2.1 1.3B step, {data['meta']['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--e2e")
    ap.add_argument("--svoo")
    ap.add_argument("--cp", nargs="+", help="multigpu_step.py JSONs, one per world size")
    ap.add_argument("--md", default="bench/RESULTS.md")
    ap.add_argument("--png", help="step speedup plot (written next to RESULTS.md)")
    args = ap.parse_args(argv)
    md = Path(args.md)
    text = md.read_text() if md.exists() else "# Benchmark results\n"
    if args.e2e:
        data = json.loads(Path(args.e2e).read_text())
        if args.png:
            plot_e2e(data, args.png)
        text = replace_section(text, "e2e", e2e_section(data, args.e2e, args.png))
    if args.svoo:
        text = replace_section(text, "svoo", svoo_section(json.loads(Path(args.svoo).read_text()), args.svoo))
    if args.cp:
        runs = sorted((json.loads(Path(p).read_text()) for p in args.cp), key=lambda r: r["meta"]["world_size"])
        text = replace_section(text, "cp", cp_section(runs, args.cp))
    md.write_text(text)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
