"""`scmmgpt demo` (`make demo`): the main job on the embedded default, offline, on a laptop CPU.

Builds the dataset from the shipped PBMC cells and the Cell Ontology, pre-trains the cell encoder and a small LLM,
trains stage 1 and stage 2 (`train/configs/tiny-cpu.yaml`), evaluates the three jobs on held-out cells against
baselines on the same split, and writes `demo_output/`: `report.md`, `confusion_matrix.png`, `umap.png`,
`marker_genes.png` and the Hub-ready `model/`. A second run reuses the trained stages unless `--fresh`.

With several `--seeds` (`make eval`: 0 1 2), each seed draws its own train/test split and model initialisation and
gets its own folder `seed_<n>/` with the full report; `summary.md` and `results.json` give the mean ± standard
deviation of every figure over the seeds.

Off the training split (`scmmgpt_train.robustness`): `--shift-suite short` (the default) scores retrieval, the
fine-tuned classifier and two baselines on the held-out cells under 50 % depth, 70 % genes, a σ 0.3 batch effect and
the three combined; `--shift-suite full` adds 20 / 10 % depth, 50 % genes, σ 0.6, the input conventions, the
likelihood and generate methods and the descriptions. `--unseen-types` trains a second model per seed without three
cell types (a seeded draw among those with 20 cells or more) into `<run folder>_unseen/` and scores annotation of
their cells over all label texts, top-1 and top-3. `make eval` runs both in full over 3 seeds.
"""

import argparse
import json
import time
import warnings
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny-cpu.yaml"
FIGURES = ("confusion_matrix.png", "umap.png", "marker_genes.png")  # besides shifts.png with a shift suite
# each shift suite's stage-2 annotation methods and whether it scores descriptions (its shifts: shifts.SUITES)
SHIFT_SUITES = {"short": (("retrieval",), False), "full": (("retrieval", "likelihood", "generate"), True)}


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
    parser.add_argument("--shift-suite", choices=("none", *SHIFT_SUITES), default="short",
                        help="annotation under dataset shift: 'short' (default: 3 single shifts + combined, retrieval, "
                             "fine-tuned and 2 baselines, ~seconds), 'full' (every shift, method and the "
                             "descriptions), 'none'")
    parser.add_argument("--unseen-types", action="store_true",
                        help="also train a model per seed without three cell types (into <run folder>_unseen/) and "
                             "score annotation of their cells over all label texts")
    return parser.parse_args(argv)


def _overrides(seed: int | None, time_limits: bool) -> dict:
    """Config overrides of one seed's run: split and training seed, and no `max_seconds` guards if asked."""
    from .config import STAGES

    overrides = {} if seed is None else {"pipeline.seed": seed, "data.seed": seed}
    if not time_limits:
        overrides.update({f"{stage}.max_seconds": None for stage in STAGES})
    return overrides


def _trained_model(model_dir):
    """(stage-2 model in eval mode, its processor) of a trained folder."""
    from transformers import AutoProcessor

    from modeling_scmmgpt import ScMMGPTForConditionalGeneration

    return ScMMGPTForConditionalGeneration.from_pretrained(model_dir).eval(), AutoProcessor.from_pretrained(model_dir)


def run_seed(config_path: str, output_dir: Path, seed: int | None, fresh: bool, progress: bool,
             time_limits: bool = True, shift_suite: str = "short", unseen_types: bool = False) -> dict:
    """Train (or reuse) every stage with `seed` as split and training seed, evaluate, write the report into
    `output_dir`; `time_limits=False` drops every stage's `max_seconds`; `shift_suite` ("short", "full", "none") adds
    `results["shifts"]`; `unseen_types` trains the held-out-types model too and adds `results["unseen"]` and
    `results["unseen_types"]`. Returns the evaluation results."""
    from modeling_scmmgpt import ScMMGPTCellForClassification
    from modeling_scmmgpt.jobs_scmmgpt import LABELS_FILE

    from .config import load_config
    from .evaluate import EvalCells, evaluate_model, results_table
    from .pipeline import load_cells, run_pipeline
    from .report import write_model_card, write_report
    from .robustness import evaluate_coarse_labels, held_out_types
    from .stage1 import label_texts_of

    config = load_config(config_path, output_dir=str(output_dir), overrides=_overrides(seed, time_limits))
    timings = {}
    start = time.perf_counter()
    print(f"[1/3] training every stage of {Path(config_path).name} on the shipped PBMC cells -> {output_dir}/"
          + ("" if seed is None else f" (seed {seed})"), flush=True)
    pipeline = run_pipeline(config, fresh=fresh, progress=progress)
    cached = [stage for stage, record in pipeline["stages"].items() if record.get("cached")]
    timings[f"training ({', '.join(cached)} reused)" if cached else "training"] = time.perf_counter() - start
    steps = _print_training(pipeline)

    start = time.perf_counter()
    print("[2/3] evaluating the three jobs on held-out cells against baselines", flush=True)
    model_dir = Path(pipeline["model_dir"])
    model, processor = _trained_model(model_dir)
    cells = load_cells(config.data)
    label_texts = label_texts_of(cells.all_rows)
    if not (model_dir / LABELS_FILE).is_file():  # a model trained before `scmmgpt train` wrote its label texts
        (model_dir / LABELS_FILE).write_text(json.dumps(label_texts, indent=1), encoding="utf-8")
    train, test = EvalCells.from_rows(cells.train, cells.tokenizer), EvalCells.from_rows(cells.test, cells.tokenizer)
    classifier = None
    if pipeline["classifier_dir"]:
        classifier = ScMMGPTCellForClassification.from_pretrained(pipeline["classifier_dir"]).eval()
    results = evaluate_model(model, processor, train, test, label_texts, progress=progress,
                             seed=config.pipeline.seed, classifier=classifier)
    results["coarse_labels"] = evaluate_coarse_labels(model, processor, train, test, label_texts, progress=progress)
    timings["evaluation"] = time.perf_counter() - start
    if shift_suite != "none":
        start = time.perf_counter()
        results["shifts"] = run_shift_suite(config, cells, train, (model, processor, classifier), label_texts,
                                            shift_suite, progress)
        timings[f"shift suite ({shift_suite})"] = time.perf_counter() - start
        print(f"      shift suite ({shift_suite}): {timings[f'shift suite ({shift_suite})']:.0f} s", flush=True)
    held_out = None
    if unseen_types:
        start = time.perf_counter()
        types = held_out_types(cells.all_rows["cell_type"], config.pipeline.seed)
        results["unseen"] = run_unseen_types(config_path, output_dir, seed, types, fresh, progress, time_limits,
                                             (model, processor, train, test))
        results["unseen_types"], held_out = types, {config.pipeline.seed: types}
        timings["unseen types (training + evaluation)"] = time.perf_counter() - start

    print("[3/3] writing the report", flush=True)
    report = write_report(results, test, output_dir, list(label_texts), timings, steps=steps, held_out=held_out)
    (output_dir / "results.json").write_text(json.dumps(scalar_results(results), indent=1), encoding="utf-8")
    card = write_model_card(model_dir, results, config)  # the held-out figures replace the card's empty table
    print()
    print(results_table(results))
    print()
    print(f"report: {report}   figures: {', '.join(str(output_dir / f) for f in FIGURES)}   "
          f"model card: {card}")
    print(f"model (Hub-ready): {model_dir}   e.g. scmmgpt annotate {model_dir} cells.h5ad -o annotated.h5ad")
    if classifier is not None:
        print(f"fine-tuned classifier (Hub-ready): {pipeline['classifier_dir']}   e.g. scmmgpt annotate "
              f"{pipeline['classifier_dir']} cells.h5ad -o annotated.h5ad")
    return results


def _print_training(pipeline: dict) -> dict:
    """Print each stage's first and last losses and a warning for stages cut short; returns `training_steps`."""
    from .report import training_steps

    for stage, losses in pipeline["losses"].items():
        shown = ", ".join(f"{name} {first:.3f} -> {last:.3f}" for name, (first, last) in losses.items())
        print(f"      {stage}: {shown}", flush=True)
    steps = training_steps(pipeline["stages"])
    for stage, (run, planned) in steps.items():
        if run < planned:
            print(f"      warning: {stage} ran {run} of {planned} steps (max_seconds): its figures are lower than "
                  "a full run's", flush=True)
    return steps


def run_shift_suite(config, cells, train, models: tuple, label_texts: dict, suite: str, progress: bool) -> dict:
    """`robustness.evaluate_shifts` on the run's test cells, rebuilt as counts with the source's library sizes.
    `models`: (stage-2 model, processor, fine-tuned classifier or None)."""
    from .pretrain import pbmc_path
    from .robustness import CountCells, evaluate_shifts, source_library_sizes
    from .shifts import SUITES

    source = config.data.h5ad or (None if config.data.dataset_dir else pbmc_path())
    test = CountCells.from_rows(cells.test, cells.tokenizer, source and source_library_sizes(source))
    methods, describe = SHIFT_SUITES[suite]
    model, processor, classifier = models
    return evaluate_shifts(model, processor, train, test, label_texts, suite=SUITES[suite], methods=methods,
                           classifier=classifier, describe=describe, seed=config.pipeline.seed, progress=progress)


def unseen_dir(output_dir: Path) -> Path:
    """The held-out-types model's run folder beside a run's: `<output_dir>_unseen`."""
    return Path(output_dir).with_name(Path(output_dir).name + "_unseen")


def run_unseen_types(config_path: str, output_dir: Path, seed: int | None, types: list[str], fresh: bool,
                     progress: bool, time_limits: bool, all_types: tuple) -> dict:
    """Train (or reuse) a model without the cells of `types` into `unseen_dir(output_dir)`, no classifier; score
    retrieval and likelihood over all label texts on their cells and on its seen-type test cells, and the all-types
    model (`all_types`: model, processor, its train and test `EvalCells`) on its own test cells of the seen types.
    Returns {cell group: figures}; `unseen_types.json` in the folder keeps them with the types."""
    import numpy as np

    from .config import load_config
    from .evaluate import EvalCells
    from .pipeline import is_complete, load_cells, run_pipeline
    from .robustness import SEEN, SEEN_ALL_TYPES, UNSEEN, evaluate_unseen_types, reference_top_k
    from .stage1 import label_texts_of

    folder = unseen_dir(output_dir)
    base = load_config(config_path)
    overrides = {**_overrides(seed, time_limits), "data.held_out_cell_types": types,
                 # the fine-tuned classifier is not scored on unseen types: its head knows the training labels only
                 "pipeline.stages": [stage for stage in base.pipeline.stages if stage != "classifier"]}
    llm = Path(output_dir) / "stage0_llm"
    if base.model.llm_path is None and is_complete(llm):  # pre-trained on every cell's text either way: reused
        overrides["model.llm_path"] = str(llm)
    config = load_config(config_path, output_dir=str(folder), overrides=overrides)
    print(f"      unseen cell types: training without {', '.join(types)} -> {folder}/", flush=True)
    pipeline = run_pipeline(config, fresh=fresh, progress=progress)
    _print_training(pipeline)
    cells = load_cells(config.data)
    label_texts = label_texts_of(cells.all_rows)
    train, seen, unseen = (EvalCells.from_rows(rows, cells.tokenizer)
                           for rows in (cells.train, cells.test, cells.unseen))
    model, processor = _trained_model(pipeline["model_dir"])
    all_model, all_processor, all_train, all_test = all_types
    keep = ~np.isin(all_test.labels, types)
    all_seen = EvalCells(all_test.matrix[keep], all_test.labels[keep], [t for t, k in zip(all_test.texts, keep) if k],
                         all_test.gene_names)
    results = {
        UNSEEN: {**evaluate_unseen_types(model, processor, unseen, label_texts, progress=progress),
                 **reference_top_k(train, unseen, len(label_texts))},
        SEEN: {**evaluate_unseen_types(model, processor, seen, label_texts, progress=progress),
               **reference_top_k(train, seen, len(label_texts))},
        SEEN_ALL_TYPES: {**evaluate_unseen_types(all_model, all_processor, all_seen, label_texts, progress=progress),
                         **reference_top_k(all_train, all_seen, len(label_texts))},
    }
    (folder / "unseen_types.json").write_text(json.dumps({"held_out_cell_types": types, "results": results},
                                                         indent=1), encoding="utf-8")
    return results


def scalar_results(results: dict) -> dict:
    """{job: {method: {metric: value}}}, the numbers of `evaluate_model`'s results (and of the shift suite's and the
    unseen types', rows by shift / cell group) without arrays, texts and lists."""
    return {job: {name: {k: v for k, v in row.items() if isinstance(v, float)} for name, row in rows.items()}
            for job, rows in results.items() if isinstance(rows, dict)}


TABLE_JOBS = ("annotation", "description", "pseudo_cells")  # shifts, unseen types, coarse labels: tables of their own


def summarize_seeds(per_seed: dict[int, dict]) -> tuple[dict, str]:
    """Mean and standard deviation over seeds of every figure: ({job: {method: {metric: [mean, sd]}}}, Markdown of
    the three jobs' figures)."""
    import numpy as np

    scalars = [scalar_results(results) for results in per_seed.values()]
    summary: dict = {}
    lines = [f"| job | method | metric | mean ± sd over seeds {', '.join(map(str, per_seed))} |", "|---|---|---|---|"]
    for job, rows in scalars[0].items():
        for name, metrics in rows.items():
            for metric in metrics:
                values = np.array([s[job][name][metric] for s in scalars])
                summary.setdefault(job, {}).setdefault(name, {})[metric] = [float(values.mean()), float(values.std())]
                if job in TABLE_JOBS:
                    lines.append(f"| {job} | {name} | {metric} | {values.mean():.3f} ± {values.std():.3f} |")
    return summary, "\n".join(lines)


def main(argv=None) -> int:
    from .report import pseudo_cell_sections, robustness_sections
    from .trainers import quiet_libraries

    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    output_dir = Path(args.output_dir)
    progress = not args.no_progress
    if not progress:
        quiet_libraries()
    options = dict(time_limits=not args.no_time_limits, shift_suite=args.shift_suite, unseen_types=args.unseen_types)
    if not args.seeds or len(args.seeds) == 1:
        run_seed(args.config, output_dir, args.seeds[0] if args.seeds else None, args.fresh, progress, **options)
        return 0
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"scmmgpt demo: --seeds repeats a seed: {args.seeds}")
    per_seed = {seed: run_seed(args.config, output_dir / f"seed_{seed}", seed, args.fresh, progress, **options)
                for seed in args.seeds}
    summary, table = summarize_seeds(per_seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    held_out = {seed: results["unseen_types"] for seed, results in per_seed.items() if "unseen_types" in results}
    sections = [*pseudo_cell_sections(summary.get("pseudo_cells", {})),
                *robustness_sections(summary, output_dir, held_out)]
    (output_dir / "results.json").write_text(json.dumps({**summary, "unseen_types": held_out}, indent=1),
                                             encoding="utf-8")
    (output_dir / "summary.md").write_text("\n".join([f"# scMMGPT over {len(per_seed)} seeds", "", table, *sections])
                                           + "\n", encoding="utf-8")
    print()
    print(table)
    print("\n".join(sections))
    print(f"\nsummary: {output_dir / 'summary.md'}   per-seed reports: {output_dir}/seed_*/report.md")
    return 0
