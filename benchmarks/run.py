"""Runs scMMGPT's benchmarks and writes `benchmarks/results/latest.json` and `benchmarks/results/latest.md`.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--compile] [--large-batches] [--skip-data-scale]

Every measurement runs in its own process (see `benchmarks/common.py`), so each peak RSS is that configuration's own.
`make bench` runs this with defaults (under 10 minutes on a 2-core CPU).
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_model  # noqa: E402
from benchmarks.common import ROOT, machine_info, measure_in_subprocess  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
TOKENIZER_GOAL = {"continuous": 8.0, "binned": 6.0}  # × the per-cell reference loop, 50k × 20k cells (issue 18)
FLOPS_GOAL = 0.5  # of the measured matmul FLOP/s, base encoder, batch 64, CPU
DATA_SCALE_GOAL = 1.25  # peak RSS at the largest corpus / at the smallest ("flat")
IMPORT_GOAL = 3.0  # seconds to import modeling_scmmgpt once torch and transformers are imported


def plan(quick: bool, large_batches: bool = False) -> dict:
    base = [64] if quick else [1, 16, 64]
    return {
        "tokenizer_cells": 10_000 if quick else 50_000,
        "reference_cells": 200 if quick else 500,
        "encoder_batches": {"tiny": [1, 64] if quick else [1, 16, 64, 256],
                            "base": base + [256] if large_batches else base},
        "data_scale_sizes": [10_000, 40_000] if quick else [25_000, 100_000],
    }


def bench_tokenizer(p: dict) -> list[dict]:
    rows = []
    for mode in ("continuous", "binned"):
        print(f"tokenizer, {mode} ...", flush=True)
        rows.append(measure_in_subprocess("bench_tokenizer", "run", mode=mode, n_cells=p["tokenizer_cells"],
                                          reference_cells=p["reference_cells"]))
    return rows


def bench_encoder(p: dict, device: str, dtype: str, compile: bool) -> list[dict]:
    rows = []
    for name, batches in p["encoder_batches"].items():
        for batch in batches:
            print(f"encoder {name}, batch {batch} ...", flush=True)
            goal_row = name == "base" and batch == 64
            rows.append(measure_in_subprocess(
                "bench_encoder", "run", config_name=name, batch=batch, device=device, dtype=dtype, compile=compile,
                # the biggest batch warms up on one cell: a second full pass would cost a minute on a small CPU
                warmup_full=batch < 256, with_matmul_peak=goal_row,
            ))
    return rows


def bench_import(repeats: int = 3) -> dict:
    """Seconds `import modeling_scmmgpt` adds once torch and transformers are in, best of fresh processes (most of it
    is transformers' lazily imported modeling and processing modules, which any user of the model pays)."""
    print("import ...", flush=True)
    code = ("import time; import torch, transformers; t = time.perf_counter(); import modeling_scmmgpt; "
            "print(time.perf_counter() - t)")
    seconds = [float(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                    check=True).stdout) for _ in range(repeats)]
    return {"best_s": round(min(seconds), 2), "worst_s": round(max(seconds), 2), "repeats": repeats}


def bench_data_scale(p: dict, timeout: float = 300) -> dict:
    script = os.path.join(ROOT, "benchmarks", "bench_data_scale.py")
    if not os.path.exists(script):
        return {"status": "not measured: benchmarks/bench_data_scale.py not present"}
    out = os.path.join(RESULTS, "data_scale.json")
    print("data scale ...", flush=True)
    cmd = [sys.executable, script, "--sizes", *map(str, p["data_scale_sizes"]), "--json", out]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"not measured: timed out after {timeout:.0f} s"}
    if proc.returncode:
        return {"status": "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    with open(out) as f:
        return {"status": "measured", **json.load(f)}


def goals(results: dict) -> list[dict]:
    imp = results["import"]
    out = [{"goal": f"import modeling_scmmgpt adds <= {IMPORT_GOAL:g} s to torch + transformers",
            "figure": f"{imp['best_s']} s (worst of {imp['repeats']}: {imp['worst_s']} s)",
            "met": imp["best_s"] <= IMPORT_GOAL}]
    for row in results["tokenizer"]:
        ok = "speedup" in row
        goal = TOKENIZER_GOAL.get(row.get("mode"), max(TOKENIZER_GOAL.values()))
        figure = (f"{row['speedup']:.2f}x on {row['num_workers']} threads (1 thread {row['serial_speedup']:.2f}x, "
                  f"int32 ids {row['int32_speedup']:.2f}x) at {row['n_cells']} cells") if ok else row.get("error", "?")
        out.append({"goal": f"tokenizer ({row.get('mode', '?')}) >= {goal:g}x the reference loop",
                    "figure": figure, "met": bool(ok and row["speedup"] >= goal)})
    goal_rows = [r for r in results["encoder"] if "fraction_of_matmul_peak" in r]
    for row in goal_rows:
        out.append({"goal": f"encoder forward >= {FLOPS_GOAL:.0%} of matmul FLOP/s (base, batch 64, {row['device']})",
                    "figure": f"{row['fraction_of_matmul_peak']:.0%} ({row['achieved_gflops']} of "
                              f"{row['matmul_peak_gflops']} GFLOP/s)",
                    "met": row["fraction_of_matmul_peak"] >= FLOPS_GOAL})
    if not goal_rows:
        out.append({"goal": "encoder forward >= 50% of matmul FLOP/s", "figure": "not measured", "met": False})
    runs = results["data_scale"].get("runs") or []
    if len(runs) >= 2:
        ratio = max(r["stream_peak_rss_mb"] for r in runs) / runs[0]["stream_peak_rss_mb"]
        build = max(r["build_peak_rss_mb"] for r in runs) / runs[0]["build_peak_rss_mb"]
        out.append({"goal": f"peak memory flat in corpus size (largest/smallest <= {DATA_SCALE_GOAL})",
                    "figure": f"stream {ratio:.2f}x, build {build:.2f}x over {runs[0]['n_cells']}→{runs[-1]['n_cells']} cells",
                    "met": max(ratio, build) <= DATA_SCALE_GOAL})
    else:
        out.append({"goal": "peak memory flat in corpus size", "figure": results["data_scale"].get("status"), "met": False})
    for row in results["model"]:
        out.append({"goal": f"{row['name']} throughput (no goal set)", "figure": row.get("status", row.get("cells_per_s")),
                    "met": None})
    return out


def _table_rows(rows: list[dict], cells) -> list[str]:
    """A Markdown row per result (`cells(row)` gives its inner text); a failed measurement shows its error."""
    return [f"| error: {r['error']} |" if "error" in r else f"| {cells(r)} |" for r in rows]


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# scMMGPT benchmarks ({results['mode']}, {results['date']})", "",
             f"Machine: {m['cpu']}, {m['cpu_cores']} cores, {m['memory_gb']} GB RAM; torch {m['torch']} "
             f"({m['torch_threads']} threads), numpy {m['numpy']}, Python {m['python']}; device {results['device']}; "
             f"load average at start {m['load_average_at_start']:.2f}. Wall time {results['wall_s']:.0f} s.", "",
             "## Goals", "", "| goal | figure | met |", "|---|---|---|"]
    for g in results["goals"]:
        met = "n/a" if g["met"] is None else ("yes" if g["met"] else "**no**")
        lines.append(f"| {g['goal']} | {g['figure']} | {met} |")
    lines += ["", "## Cell tokenizer", "",
              "| mode | cells × genes | non-zero / cell | tokenizer cells/s (threads) | 1 thread | int32 ids | "
              "reference cells/s (on N cells) | speedup | identical | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    lines += _table_rows(results["tokenizer"], lambda r: (
        f"{r['mode']} | {r['n_cells']} × {r['n_genes']} | {r['mean_nonzero_per_cell']:.0f} | "
        f"{r['tokenizer_cells_per_s']:.0f} ({r['num_workers']}) | {r['serial_cells_per_s']:.0f} | "
        f"{r['int32_cells_per_s']:.0f} | {r['reference_cells_per_s']:.0f} ({r['reference_cells']}) | "
        f"{r['speedup']:.2f}× | {'yes' if r['identical_to_reference'] else 'NO'} | {r['peak_rss_mb']:.0f}"))
    lines += ["", "## Cell encoder forward (`torch.inference_mode`, full cells, no padding)", "",
              "| config | params (M) | tokens/cell | batch | cells/s | GFLOP/forward | achieved GFLOP/s | "
              "peak RSS MB (after imports) |", "|---|---|---|---|---|---|---|---|"]
    lines += _table_rows(results["encoder"], lambda r: (
        f"{r['config']} | {r['parameters_m']} | {r['tokens_per_cell']} | {r['batch']} | {r['cells_per_s']} | "
        f"{r['forward_gflop']} | {r['achieved_gflops']} | {r['peak_rss_mb']:.0f} ({r['baseline_rss_mb']:.0f})"))
    lines += ["", "## Multimodal model", "", "| benchmark | measures | figure |", "|---|---|---|"]
    for r in results["model"]:
        lines.append(f"| {r['name']} | {r['measures']} | {r.get('status', r.get('cells_per_s'))} |")
    lines += ["", "## Data streaming: peak RSS vs corpus size", ""]
    runs = results["data_scale"].get("runs")
    if runs:
        lines += ["| cells | build s | build peak RSS MB | stream s | stream peak RSS MB |", "|---|---|---|---|---|"]
        lines += [f"| {r['n_cells']} | {r['build_s']:.1f} | {r['build_peak_rss_mb']:.0f} | {r['stream_s']:.1f} | "
                  f"{r['stream_peak_rss_mb']:.0f} |" for r in runs]
    else:
        lines.append(results["data_scale"].get("status", "not measured"))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller inputs and fewer batch sizes (about 2 minutes)")
    parser.add_argument("--device", default="cpu", help="device of the encoder benchmarks (cpu or cuda)")
    parser.add_argument("--dtype", default=None, help="encoder dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder")
    parser.add_argument("--large-batches", action="store_true",
                        help="also the base encoder at batch 256 (1-3 more minutes on a 2-core CPU)")
    parser.add_argument("--skip-data-scale", action="store_true")
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    start = time.time()
    p = plan(args.quick, args.large_batches)
    results = {"mode": "quick" if args.quick else "full", "date": time.strftime("%Y-%m-%d %H:%M"),
               "device": args.device, "dtype": dtype, "compile": args.compile, "machine": machine_info(), "plan": p}
    results["import"] = bench_import()
    results["tokenizer"] = bench_tokenizer(p)
    results["encoder"] = bench_encoder(p, args.device, dtype, args.compile)
    results["model"] = bench_model.rows(args.quick)
    results["data_scale"] = ({"status": "skipped (--skip-data-scale)"} if args.skip_data_scale
                             else bench_data_scale(p))
    results["wall_s"] = round(time.time() - start, 1)
    results["goals"] = goals(results)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump(results, f, indent=1)
    table = markdown(results)
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
