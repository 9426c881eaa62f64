"""Write the end-to-end step (bench/e2e_step.py, forward and ``--train``), SVOO (bench/svoo_bench.py) and
context-parallel (bench/multigpu_step.py) JSONs into RESULTS.md.

Each goes into its own marked section (``<!-- e2e:start/end -->``, ``<!-- e2e-train:... -->``,
``<!-- svoo:... -->``, ``<!-- cp:... -->``), so the attention table written by `write_results.py` and hand-written
notes stay untouched.

    python3 bench/write_step_results.py --e2e-train bench/results/h100_e2e_train.json
    python3 bench/write_step_results.py --e2e bench/results/h100_e2e_run4.json \
        --svoo bench/results/h100_svoo_cluster_run10.json --svoo-e2e bench/results/h100_svoo_e2e_topp0.3.json --cp bench/results/h200x2_cp_world1.json \
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


def _way(rec: dict, key: str = "seconds", fmt: str = "{:.2f}") -> str:
    """One number of a way's record, or its status (``error``, ``skipped``) when it did not run."""
    return fmt.format(rec[key]) if rec["status"] == "ok" else rec["status"].split(":")[0]


def e2e_train_section(data: dict, source: str) -> str:
    """The ``--train`` table: step, forward and backward seconds per way, speedup, peak memory, differences."""
    meta = data["meta"]
    lines = [
        "## End-to-end: one training step of a Wan 2.1 1.3B-shaped transformer",
        "",
        f"{meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['dtype']}, "
        f"{meta['resolution'][0]}x{meta['resolution'][1]}, random weights (real config), batch 1; one step = forward, "
        f"{meta['train_step']['loss']}, backward into {meta['train_step']['backward']}; gradient checkpointing: "
        f"{meta['train_step']['gradient_checkpointing']}. Median of {meta['repeats']} steps after a warm-up; fwd / "
        "bwd = medians of the forward (+ loss) and backward (+ recomputation) parts of the same steps. Command: "
        f"`python3 bench/e2e_step.py --train --json-out ...` (raw: `{source}`). Dense = diffusers' processors "
        f"under cuDNN SDPA (default dispatch where cuDNN did not run); LVSA = `enable_lvsa(transformer, "
        f"backend=\"{data['results'][0].get('backend', 'triton')}\")`, default pattern.",
        "",
        "| video frames | T | tokens | frame density | dense step s (fwd / bwd) | LVSA step s (fwd / bwd) | speedup | "
        "peak GiB dense / LVSA | loss rel. diff | grad rel. L2 diff | non-finite LVSA grads |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if "lvsa" not in r:
            lines.append(f"| {r['frames']} | {r['status']} | | | | | | | | | |")
            continue
        dense = r["dense_cudnn"] if r["dense_cudnn"]["status"] == "ok" else r["dense_default"]
        lvsa = r["lvsa"]
        speedup = r.get("speedup_vs_dense_cudnn", r.get("speedup_vs_dense_default"))
        steps = [f"{_way(w)} ({_way(w, 'forward_seconds')} / {_way(w, 'backward_seconds')})" for w in (dense, lvsa)]
        peaks = " / ".join(_way(w, "peak_gib", "{:.1f}") if "peak_gib" in w or w["status"] != "ok" else "-"
                           for w in (dense, lvsa))
        diffs = [f"{r[k]:.1e}" if k in r else "-" for k in ("rel_diff_loss", "rel_l2_grad")]
        lines.append(
            f"| {r['frames']} | {r['latent_frames']} | {r['video_tokens']:,} | {r['frame_density']:.3f} | {steps[0]} | "
            f"{steps[1]} | {'-' if speedup is None else f'**{speedup:.2f}x**'} | {peaks} | {diffs[0]} | {diffs[1]} | "
            f"{_way(lvsa, 'nonfinite_grads', '{}')} |")
    lines += ["", f"grad rel. L2 diff: the gradient of `{data['results'][0].get('grad_probe', '-')}`, LVSA vs dense; "
              "like the loss difference, a pattern effect where the pattern is sparse, not an error."]
    return "\n".join(lines)


def _svoo_command(data: dict) -> str:
    """The run's svoo_bench.py command without its output folder (older JSONs did not record it)."""
    older = "python3 bench/svoo_bench.py --cases wan720,wan480 --floors 0.15,0.20,0.12 --sweep"
    words = data.get("command", older).split()
    if "--out" in words:
        i = words.index("--out")
        del words[i:i + 2]
    return " ".join(words)


def svoo_section(data: dict, source: str, e2e: List[dict], e2e_sources: List[str]) -> str:
    """The SVOO section: one attention call per case (GPU cluster path), the kernel's launch-config sweep and
    the end-to-end step runs (``bench/svoo_e2e.py``)."""
    lines = [
        "## SVOO: co-clustering + device-side plan + packed cluster kernel vs dense (one attention call)",
        "",
        f"{data['date'] + ', ' if 'date' in data else ''}{data['device']}, torch {data['torch']}"
        f"{', Triton ' + data['triton'] if 'triton' in data else ''}, Wan 2.1 1.3B shape (12 heads x 128, bf16), 81 frames, 256 query / "
        "1024 key clusters, 2 iterations, top_p 0.9, profile floor = the given keep ratio for every head; synthetic "
        "q/k drawn around 64 shared centres per head (peaked attention, as with trained weights). Command: "
        f"`{_svoo_command(data)}` (raw: `{source}`). Times in ms (`triton.testing.do_bench` medians; each component timed alone, so "
        "launch gaps count: the full calls are the numbers to compare). cluster = co-clustering (what a "
        "re-clustering step adds); refresh = centroids from cached labels (reuse steps); select = block map; "
        "permute = K and V into key-cluster order; plan = device schedule; sparse = the cluster kernel alone; "
        "reuse / recluster = one full `SVOOPattern.attention(backend=\"triton\")` call. err = relative error of "
        "the kernel on 256 sampled rows vs float32 attention over the selected blocks.",
        "",
        "| case | tokens | floor | density | recall | err | cluster | refresh | select | permute | plan | sparse | "
        "reuse call | recluster call | dense cuDNN | reuse vs dense | recluster vs dense | (cluster + permute) / sparse | sparse eff. TFLOP/s | cluster kernel |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        if "ms" not in r:
            continue
        ms = r["ms"]
        lines.append(
            f"| {r['case']} | {r['tokens']:,} | {r['floor_keep_ratio']:.2f} | {r['density']:.3f} | {r['recall']:.3f} | "
            f"{r['rel_err_sampled']:.1e} | {ms['cluster']:.2f} | {ms['refresh']:.2f} | {ms['select']:.2f} | "
            f"{ms['permute']:.2f} | {ms['plan']:.2f} | {ms['sparse_attn']:.2f} | {ms['svoo_reuse']:.2f} | "
            f"{ms['svoo_recluster']:.2f} | {ms['dense']:.2f} | **{r['speedup_reuse']:.2f}x** | "
            f"{r['speedup_recluster']:.2f}x | {r['cluster_permute_share']:.0%} | {r['sparse_effective_tflops']:.0f} | "
            f"{r.get('config', '')} |")
    ab = [r for r in data["results"] if len(r.get("kernels", {})) > 1]
    if ab:
        lines += ["", "Both cluster kernels on the same plan inputs (same run; `--cluster-kernel both`):", "",
                  "| case | floor | kernel | config | sparse ms | sparse eff. TFLOP/s | reuse call ms | reuse vs dense |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ab:
            for name, k in r["kernels"].items():
                lines.append(f"| {r['case']} | {r['floor_keep_ratio']:.2f} | {name} | {k['config']} | "
                             f"{k['ms']['sparse_attn']:.2f} | {k['sparse_effective_tflops']:.0f} | "
                             f"{k['ms']['svoo_reuse']:.2f} | {k['speedup_reuse']:.2f}x |")
    sweeps = [r for r in data["results"] if r.get("sweep")]
    if sweeps:
        r = sweeps[0]
        lines += ["", f"Cluster-kernel launch configs on {r['case']} floor {r['floor_keep_ratio']:.2f} (same run; "
                  "`BLOCK_M x BLOCK_N / warps / stages`, a second entry = the launch for short cluster remainders):", "",
                  "| configs | window | ms | query tiles |", "|---|---|---|---|"]
        for sw in r["sweep"]:
            cfg, _, window = sw["config"].rpartition(" window=")
            lines.append(f"| {cfg} | {window} | {sw['ms']:.2f} | {sw.get('query_tiles', '')} |" if "ms" in sw
                         else f"| {cfg} | {window} | {sw['error']} | |")
    if e2e:
        lines += ["", "One Wan 2.1 1.3B-shaped denoising step (random bf16 weights, batch 1) through "
                  "`enable_svoo(model, backend=\"triton\", ...)` vs diffusers' processors under cuDNN SDPA; "
                  "median of 3 (recluster: first step of a generation, every layer co-clusters; reuse: later steps). "
                  "Random weights give nearly uniform attention, so the mass-based selection keeps most clusters "
                  "at top_p 0.9; a lower top_p brings the density to the ~0.2 of the attention table above (the "
                  "profile floor then decides). Command: `python3 bench/svoo_e2e.py --top-p P` "
                  f"(raw: {', '.join(f'`{x}`' for x in e2e_sources)}).", "",
                  "| resolution x frames | top_p | floor | density (mean, min-max over layers) | dense cuDNN s | "
                  "SVOO reuse s | SVOO recluster s | reuse vs dense | recluster vs dense | rel. diff vs dense |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for e in e2e:
            lines.append(
                f"| {e['resolution'][0]}x{e['resolution'][1]} x {e['frames']} | {e['top_p']} | {e['floor']} | "
                f"{e['density_mean']:.3f} ({e['density_min']:.3f}-{e['density_max']:.3f}) | {e['dense_cudnn_s']:.3f} | "
                f"{e['svoo_reuse_s']:.3f} | {e['svoo_recluster_s']:.3f} | **{e['speedup_reuse']:.2f}x** | "
                f"{e['speedup_recluster']:.2f}x | {e['rel_diff_vs_dense']:.3f} |")
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
    ap.add_argument("--e2e", help="bench/e2e_step.py JSON (forward steps)")
    ap.add_argument("--e2e-train", help="bench/e2e_step.py --train JSON")
    ap.add_argument("--svoo")
    ap.add_argument("--svoo-e2e", nargs="*", default=[], help="bench/svoo_e2e.py JSON files")
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
    if args.e2e_train:
        data = json.loads(Path(args.e2e_train).read_text())
        if not data["meta"].get("train"):
            raise SystemExit(f"write_step_results: --e2e-train {args.e2e_train}: a forward-step JSON; expected one "
                             "written by e2e_step.py --train (give it to --e2e)")
        text = replace_section(text, "e2e-train", e2e_train_section(data, args.e2e_train))
    if args.svoo:
        e2e = [json.loads(Path(x).read_text()) for x in args.svoo_e2e]
        text = replace_section(text, "svoo", svoo_section(json.loads(Path(args.svoo).read_text()), args.svoo, e2e,
                                                          args.svoo_e2e))
    if args.cp:
        runs = sorted((json.loads(Path(p).read_text()) for p in args.cp), key=lambda r: r["meta"]["world_size"])
        dry = [p for p, r in zip(args.cp, runs) if r["meta"].get("dry_run")]
        if dry:
            raise SystemExit(f"write_step_results: --cp {' '.join(dry)}: CPU dry-run results hold no timings to report")
        text = replace_section(text, "cp", cp_section(runs, args.cp))
    md.write_text(text)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
