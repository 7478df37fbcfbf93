"""`scmmgpt demo` (`make demo`): the main job on the embedded default, offline, on a laptop CPU.

Builds the dataset from the shipped PBMC cells and the Cell Ontology, pre-trains the cell encoder and a small LLM,
trains stage 1 and stage 2 (`train/configs/tiny-cpu.yaml`), evaluates the three jobs on held-out cells against
baselines on the same split, and writes `demo_output/`: `report.md`, `confusion_matrix.png`, `umap.png` and the
Hub-ready `model/`. A second run reuses the trained stages unless `--fresh`.

With several `--seeds` (`make eval`: 0 1 2), each seed draws its own train/test split and model initialisation and
gets its own folder `seed_<n>/` with the full report; `summary.md` and `results.json` give the mean ± standard
deviation of every figure over the seeds.
"""

import argparse
import json
import time
import warnings
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny-cpu.yaml"


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="scmmgpt demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="demo_output", help="where the report, figures and model go")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="the training config (default: tiny-cpu)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="split and training seeds; several give one run each and a mean ± sd summary "
                             "(default: the config's seed, one run)")
    parser.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--no-time-limits", action="store_true",
                        help="ignore the config's max_seconds guards, so that every stage runs all its steps whatever "
                             "the machine's load (make eval)")
    return parser.parse_args(argv)


def run_seed(config_path: str, output_dir: Path, seed: int | None, fresh: bool, progress: bool,
             time_limits: bool = True) -> dict:
    """Train (or reuse) every stage with `seed` as split and training seed, evaluate, write the report into
    `output_dir`; `time_limits=False` drops every stage's `max_seconds`. Returns the evaluation results."""
    from transformers import AutoProcessor

    from modeling_scmmgpt import ScMMGPTCellForClassification, ScMMGPTForConditionalGeneration
    from modeling_scmmgpt.jobs_scmmgpt import LABELS_FILE

    from .evaluate import EvalCells, evaluate_model, results_table
    from .report import training_steps, write_model_card, write_report
    from .config import STAGES, load_config
    from .pipeline import load_cells, run_pipeline
    from .stage1 import label_texts_of

    overrides = {} if seed is None else {"pipeline.seed": seed, "data.seed": seed}
    if not time_limits:
        overrides.update({f"{stage}.max_seconds": None for stage in STAGES})
    config = load_config(config_path, output_dir=str(output_dir), overrides=overrides)
    timings = {}
    start = time.perf_counter()
    print(f"[1/3] training every stage of {Path(config_path).name} on the shipped PBMC cells -> {output_dir}/"
          + ("" if seed is None else f" (seed {seed})"), flush=True)
    pipeline = run_pipeline(config, fresh=fresh, progress=progress)
    cached = [stage for stage, record in pipeline["stages"].items() if record.get("cached")]
    timings[f"training ({', '.join(cached)} reused)" if cached else "training"] = time.perf_counter() - start
    for stage, losses in pipeline["losses"].items():
        shown = ", ".join(f"{name} {first:.3f} -> {last:.3f}" for name, (first, last) in losses.items())
        print(f"      {stage}: {shown}", flush=True)
    steps = training_steps(pipeline["stages"])
    for stage, (run, planned) in steps.items():
        if run < planned:
            print(f"      warning: {stage} ran {run} of {planned} steps (max_seconds): its figures are lower than "
                  "a full run's", flush=True)

    start = time.perf_counter()
    print("[2/3] evaluating the three jobs on held-out cells against baselines", flush=True)
    model_dir = Path(pipeline["model_dir"])
    model = ScMMGPTForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    train_rows, test_rows, all_rows, cell_tokenizer, _ = load_cells(config.data)
    label_texts = label_texts_of(all_rows)
    if not (model_dir / LABELS_FILE).is_file():  # a model trained before `scmmgpt train` wrote its label texts
        (model_dir / LABELS_FILE).write_text(json.dumps(label_texts, indent=1), encoding="utf-8")
    train, test = EvalCells.from_rows(train_rows, cell_tokenizer), EvalCells.from_rows(test_rows, cell_tokenizer)
    classifier = None
    if pipeline["classifier_dir"]:
        classifier = ScMMGPTCellForClassification.from_pretrained(pipeline["classifier_dir"]).eval()
    results = evaluate_model(model, processor, train, test, label_texts, progress=progress,
                             seed=config.pipeline.seed, classifier=classifier)
    timings["evaluation"] = time.perf_counter() - start

    print("[3/3] writing the report", flush=True)
    report = write_report(results, test, output_dir, list(label_texts), timings, steps=steps)
    (output_dir / "results.json").write_text(json.dumps(scalar_results(results), indent=1), encoding="utf-8")
    card = write_model_card(model_dir, results, config)  # the held-out figures replace the card's empty table
    print()
    print(results_table(results))
    print()
    print(f"report: {report}   figures: {output_dir / 'confusion_matrix.png'}, {output_dir / 'umap.png'}   "
          f"model card: {card}")
    print(f"model (Hub-ready): {model_dir}   e.g. scmmgpt annotate {model_dir} cells.h5ad -o annotated.h5ad")
    if classifier is not None:
        print(f"fine-tuned classifier (Hub-ready): {pipeline['classifier_dir']}   e.g. scmmgpt annotate "
              f"{pipeline['classifier_dir']} cells.h5ad -o annotated.h5ad")
    return results


def scalar_results(results: dict) -> dict:
    """{job: {method: {metric: value}}}, the numbers of `evaluate_model`'s results without arrays and texts."""
    return {job: {name: {k: v for k, v in row.items() if isinstance(v, float)} for name, row in rows.items()}
            for job, rows in results.items()}


def summarize_seeds(per_seed: dict[int, dict]) -> tuple[dict, str]:
    """Mean and standard deviation over seeds of every figure: ({job: {method: {metric: [mean, sd]}}}, Markdown)."""
    import numpy as np

    scalars = [scalar_results(results) for results in per_seed.values()]
    summary: dict = {}
    lines = [f"| job | method | metric | mean ± sd over seeds {', '.join(map(str, per_seed))} |", "|---|---|---|---|"]
    for job, rows in scalars[0].items():
        for name, metrics in rows.items():
            for metric in metrics:
                values = np.array([s[job][name][metric] for s in scalars])
                summary.setdefault(job, {}).setdefault(name, {})[metric] = [float(values.mean()), float(values.std())]
                lines.append(f"| {job} | {name} | {metric} | {values.mean():.3f} ± {values.std():.3f} |")
    return summary, "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    output_dir = Path(args.output_dir)
    progress = not args.no_progress
    if not args.seeds or len(args.seeds) == 1:
        run_seed(args.config, output_dir, args.seeds[0] if args.seeds else None, args.fresh, progress,
                 not args.no_time_limits)
        return 0
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"scmmgpt demo: --seeds repeats a seed: {args.seeds}")
    per_seed = {seed: run_seed(args.config, output_dir / f"seed_{seed}", seed, args.fresh, progress,
                               not args.no_time_limits) for seed in args.seeds}
    summary, table = summarize_seeds(per_seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    (output_dir / "summary.md").write_text(f"# scMMGPT over {len(per_seed)} seeds\n\n{table}\n", encoding="utf-8")
    print()
    print(table)
    print(f"\nsummary: {output_dir / 'summary.md'}   per-seed reports: {output_dir}/seed_*/report.md")
    return 0
