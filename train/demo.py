"""`scmmgpt demo` (`make demo`): the main job on the embedded default, offline, on a laptop CPU.

Builds the dataset from the shipped PBMC cells and the Cell Ontology, pre-trains the cell encoder and a small LLM,
trains stage 1 and stage 2 (`train/configs/tiny-cpu.yaml`), evaluates the three jobs on held-out cells against
baselines on the same split, and writes `demo_output/`: `report.md`, `confusion_matrix.png`, `umap.png` and the
Hub-ready `model/`. A second run reuses the trained stages unless `--fresh`.
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
    parser.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing them")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers import AutoProcessor

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration

    from .evaluate import EvalCells, evaluate_model, results_table
    from .report import write_report
    from .run import load_cells, load_config, run_pipeline
    from .stage1 import label_texts_of

    output_dir = Path(args.output_dir)
    progress = not args.no_progress
    config = load_config(args.config, output_dir=str(output_dir))
    timings = {}

    start = time.perf_counter()
    print(f"[1/3] training every stage of {Path(args.config).name} on the shipped PBMC cells -> {output_dir}/",
          flush=True)
    pipeline = run_pipeline(config, fresh=args.fresh, progress=progress)
    timings["training (cached stages reused)" if not args.fresh else "training"] = time.perf_counter() - start
    for stage, losses in pipeline["losses"].items():
        shown = ", ".join(f"{name} {first:.3f} -> {last:.3f}" for name, (first, last) in losses.items())
        print(f"      {stage}: {shown}", flush=True)

    start = time.perf_counter()
    print("[2/3] evaluating the three jobs on held-out cells against baselines", flush=True)
    model_dir = Path(pipeline["model_dir"])
    model = ScMMGPTForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    model.processor = processor
    train_rows, test_rows, all_rows, cell_tokenizer = load_cells(config.data)
    label_texts = label_texts_of(all_rows)
    (model_dir / "label_texts.json").write_text(json.dumps(label_texts, indent=1), encoding="utf-8")
    train, test = EvalCells.from_rows(train_rows, cell_tokenizer), EvalCells.from_rows(test_rows, cell_tokenizer)
    results = evaluate_model(model, processor, train, test, label_texts, progress=progress)
    timings["evaluation"] = time.perf_counter() - start

    print("[3/3] writing the report", flush=True)
    report = write_report(results, test, output_dir, list(label_texts), timings)
    summary = {job: {name: {k: v for k, v in row.items() if isinstance(v, float)} for name, row in rows.items()}
               for job, rows in results.items()}
    (output_dir / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print()
    print(results_table(results))
    print()
    print(f"report: {report}   figures: {output_dir / 'confusion_matrix.png'}, {output_dir / 'umap.png'}")
    print(f"model (Hub-ready): {model_dir}   e.g. scmmgpt annotate {model_dir} cells.h5ad -o annotated.h5ad")
    return 0
