"""Stage-1 ablations: zero-shot retrieval off the training split for config variants, over several seeds.

    python -m scmmgpt_train.ablation --config train/configs/tiny-cpu.yaml --seeds 0 1 2 --output-dir ablation \
        --variant base --variant steps600 stage1.max_steps=600 --variant t0.02 model.contrastive_temperature=0.02
    python -m scmmgpt_train.ablation --unseen-types --markers train/configs/pbmc_markers.yaml \
        --variant base --variant genes stage1.expressed_genes_probability=0.5

Each seed is its own split and trains stage 0 once (`<output>/seed_<n>/stage0_cell`); every variant then trains
stage 1 from that same encoder (`<output>/seed_<n>/<variant>/stage1`), with the seed's config plus the variant's
`SECTION.KEY=VALUE` overrides, and is scored on the seed's test cells under `shifts.SHORT_SUITE`: the cells, shifts and
logistic-regression reference of `make eval`'s table. Finished folders are reused, so an interrupted run picks up
where it stopped. Writes `<output>/ablation.md` (mean ± sd over seeds) and `<output>/results.json`.

With `--unseen-types`, each seed also holds out the three cell types `make eval` holds out for it: a second stage-0
encoder is trained without them (`<output>/seed_<n>/unseen/stage0_cell`) and every variant's stage 1 too
(`.../unseen/<variant>/stage1`); retrieval over all label texts is scored on the held-out-type cells and on the
seen-type test cells (top-1 / top-3). `--markers FILE` (YAML label → marker genes, e.g.
`train/configs/pbmc_markers.yaml`) adds the same scores with each label described by its markers
(`collators.expressed_genes_text`), and the reference those marker lists give without any model
(`robustness.marker_score_top_k`: the mean z-score of each label's markers).

Stage 1 alone is what zero-shot retrieval depends on (stage 2 keeps the Q-Former's retrieval as it is), so a variant
costs one stage-1 run per seed: ~4 minutes at tiny-cpu's 300 steps on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .config import load_config, parse_overrides
from .robustness import LOGISTIC, RETRIEVAL, held_out_types
from .trainers import quiet_libraries

ACCURACY = ": accuracy"
MARKER_RETRIEVAL = "scMMGPT (retrieval, marker texts)"


def parse_variant(words: list[str]) -> tuple[str, dict]:
    """`["name", "section.key=value", ...]` → (name, {section.key: YAML-parsed value})."""
    name = words[0]
    if "=" in name or "/" in name:
        raise ValueError(f"a variant starts with its name (no '=' or '/'), got {name!r}")
    try:
        return name, parse_overrides(words[1:])
    except ValueError as error:
        raise ValueError(f"variant {name} {error}") from None


def _processor(model, cells, stage1_dir: Path):
    """The stage-1 folder's processor: the run's cell tokenizer and the Q-Former's own text tokenizer."""
    from transformers import AutoTokenizer

    from modeling_scmmgpt.processing_scmmgpt import ScMMGPTProcessor

    def text_tokenizer():  # two loads: the processor adds cell tokens to its `tokenizer`, never to the Q-Former's
        return AutoTokenizer.from_pretrained(str(stage1_dir / "qformer_tokenizer"))

    return ScMMGPTProcessor(cells.tokenizer, text_tokenizer(), qformer_tokenizer=text_tokenizer(),
                            num_query_tokens=model.config.num_query_tokens)


def _seeded(seed: int) -> dict:
    """A seed's overrides: its split and training seed, and no time limit on the stages an ablation trains."""
    return {"pipeline.seed": seed, "data.seed": seed, "stage0_cell.max_seconds": None, "stage1.max_seconds": None}


def train_encoder(config_path: str, seed_dir: Path, seed: int, progress: bool, overrides: dict | None = None) -> Path:
    """The seed's stage-0 cell encoder (`seed_dir/stage0_cell`), trained once and shared by every variant."""
    from .pipeline import run_pipeline

    config = load_config(config_path, str(seed_dir), {**_seeded(seed), **(overrides or {})})
    run_pipeline(config, stages=["stage0_cell"], progress=progress)
    return seed_dir / "stage0_cell"


def train_variant(config_path: str, seed_dir: Path, seed: int, name: str, overrides: dict, progress: bool):
    """Stage 1 of one variant from the seed's stage-0 encoder (`train_encoder`): (its cells, model, processor)."""
    from modeling_scmmgpt import ScMMGPTModel

    from .pipeline import load_cells, run_pipeline

    config = load_config(config_path, str(seed_dir / name),
                         {**_seeded(seed), "model.cell_encoder_path": str(seed_dir / "stage0_cell"), **overrides})
    run_pipeline(config, stages=["stage1"], progress=progress)
    cells = load_cells(config.data)
    stage1_dir = seed_dir / name / "stage1"
    model = ScMMGPTModel.from_pretrained(str(stage1_dir)).eval()
    return config, cells, model, _processor(model, cells, stage1_dir)


def run_variant(config_path: str, seed_dir: Path, seed: int, name: str, overrides: dict, progress: bool) -> dict:
    """A variant's stage 1 (`train_variant`) scored under the short shift suite:
    {shift: {"<method>: accuracy" / "<method>: macro_f1": value}}."""
    from .evaluate import EvalCells
    from .pretrain import pbmc_path
    from .robustness import CountCells, evaluate_shifts, source_library_sizes
    from .stage1 import label_texts_of

    config, cells, model, processor = train_variant(config_path, seed_dir, seed, name, overrides, progress)
    source = config.data.h5ad or pbmc_path()
    test = CountCells.from_rows(cells.test, cells.tokenizer, source_library_sizes(source))
    return evaluate_shifts(model, processor, EvalCells.from_rows(cells.train, cells.tokenizer), test,
                           label_texts_of(cells.all_rows), seed=seed)


def run_unseen_variant(config_path: str, seed_dir: Path, seed: int, name: str, overrides: dict, types: list[str],
                       markers: dict | None, progress: bool) -> dict:
    """A variant's stage 1 trained without the cells of `types` (from `seed_dir/stage0_cell`, trained without them
    too), ranking all label texts: {cell group: {"<method>: top-<k>": value}}; `markers` (label → genes) adds the
    ranking by marker texts."""
    from .collators import expressed_genes_text
    from .evaluate import EvalCells
    from .robustness import SEEN, UNSEEN, evaluate_unseen_types, marker_score_top_k
    from .stage1 import label_texts_of

    overrides = {"data.held_out_cell_types": types, **overrides}
    _, cells, model, processor = train_variant(config_path, seed_dir, seed, name, overrides, progress)
    texts = {RETRIEVAL: label_texts_of(cells.all_rows)}
    if markers:
        texts[MARKER_RETRIEVAL] = {label: expressed_genes_text(text, markers[label])
                                   for label, text in texts[RETRIEVAL].items()}
    results = {}
    train = EvalCells.from_rows(cells.train, cells.tokenizer) if markers else None  # the marker reference's z-scores
    for group, rows in ((UNSEEN, cells.unseen), (SEEN, cells.test)):
        group_cells, results[group] = EvalCells.from_rows(rows, cells.tokenizer), {}
        for method, label_texts in texts.items():
            row = evaluate_unseen_types(model, processor, group_cells, label_texts, methods=("retrieval",))
            results[group].update({key.replace(RETRIEVAL, method): value for key, value in row.items()})
        if markers:
            labelled = {label: markers[label] for label in texts[RETRIEVAL]}
            results[group].update(marker_score_top_k(train, group_cells, labelled))
    return results


def _gene_list(genes) -> list[str]:
    """A label's marker genes as the YAML gives them: a list, a comma-separated string, or nothing."""
    items = genes.split(",") if isinstance(genes, str) else genes or []
    return [str(gene).strip() for gene in items if str(gene).strip()]


def load_markers(path: str, labels) -> dict:
    """The `--markers` YAML (label → marker genes, a list or a comma-separated string); every label needs some."""
    import yaml

    try:
        markers = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(markers, dict):
        raise ValueError(f"{path} must map each label to its marker genes")
    markers = {str(label): _gene_list(genes) for label, genes in markers.items()}
    missing = sorted({str(label) for label in labels} - {label for label, genes in markers.items() if genes})
    if missing:
        raise ValueError(f"{path} has no marker genes for {missing}")
    return markers


def _mean_sd(values) -> str:
    """`"mean ± sd"` of one figure over seeds, as the tables write it."""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def ablation_table(results: dict[str, dict[int, dict]]) -> str:
    """Markdown: a row per variant (and the logistic-regression reference), a column per shift, retrieval accuracy
    as mean ± sd over seeds. `results`: {variant: {seed: evaluate_shifts output}}."""
    reference = next(iter(results.values()))  # every variant's run fits the same baseline on the seed's cells
    shifts = list(next(iter(reference.values())))
    rows = [(name, RETRIEVAL, per_seed) for name, per_seed in results.items()]
    rows.append(("reference: " + LOGISTIC, LOGISTIC, reference))
    seeds = sorted({seed for per_seed in results.values() for seed in per_seed})
    lines = [f"| stage 1 (seeds {', '.join(map(str, seeds))}) | " + " | ".join(shifts) + " |",
             "|---" * (len(shifts) + 1) + "|"]
    for label, method, per_seed in rows:
        cells = [_mean_sd([r[shift][method + ACCURACY] for r in per_seed.values()]) for shift in shifts]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def unseen_ablation_table(unseen: dict[str, dict[int, dict]]) -> str:
    """Markdown: a row per variant × method, top-1 / top-3 on held-out-type and seen-type cells, mean ± sd over
    seeds. `unseen`: {variant: {seed: run_unseen_variant output}}."""
    from .robustness import SEEN, UNSEEN

    columns = [(group, k) for group in (UNSEEN, SEEN) for k in (1, 3)]
    lines = ["| stage 1 | texts | " + " | ".join(f"{group}: top-{k}" for group, k in columns) + " |",
             "|---|---" + "|---" * len(columns) + "|"]
    for name, per_seed in unseen.items():
        first = next(iter(per_seed.values()))[UNSEEN]
        for method in dict.fromkeys(key.rsplit(": ", 1)[0] for key in first):
            cells = [_mean_sd([r[group][f"{method}: top-{k}"] for r in per_seed.values()]) for group, k in columns]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell_labels(config_path: str) -> np.ndarray:
    """Every cell's label in the config's data (what `make eval` draws each seed's held-out types from)."""
    from .pipeline import load_cells

    return np.asarray(load_cells(load_config(config_path).data).all_rows["cell_type"], dtype=str)


def _shift_runs(args, seed_dir: Path, seed: int, variants: dict):
    """(variant, its `run_variant` scores) of one seed, from the seed's shared stage-0 encoder."""
    train_encoder(args.config, seed_dir, seed, not args.quiet)
    for name, overrides in variants.items():
        row = run_variant(args.config, seed_dir, seed, name, overrides, not args.quiet)
        print(f"seed {seed} {name}: retrieval "
              + ", ".join(f"{shift} {scores[RETRIEVAL + ACCURACY]:.3f}" for shift, scores in row.items()), flush=True)
        yield name, row


def _unseen_runs(args, seed_dir: Path, seed: int, variants: dict, types: list[str], markers: dict | None):
    """(variant, its `run_unseen_variant` scores) of one seed, from a stage-0 encoder trained without `types`."""
    train_encoder(args.config, seed_dir, seed, not args.quiet, {"data.held_out_cell_types": types})
    for name, overrides in variants.items():
        row = run_unseen_variant(args.config, seed_dir, seed, name, overrides, types, markers, not args.quiet)
        print(f"seed {seed} {name} without {', '.join(types)}: {json.dumps(row)}", flush=True)
        yield name, row


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scmmgpt_train.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="train/configs/tiny-cpu.yaml", help="the pipeline config the variants change")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split and training seeds")
    parser.add_argument("--output-dir", default="ablation_output", help="run folder (reused when it exists)")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [SECTION.KEY=VALUE]",
                        help="a variant: its name, then its config overrides (none: the config as it is)")
    parser.add_argument("--unseen-types", action="store_true",
                        help="also train each variant without the seed's three held-out cell types and score them")
    parser.add_argument("--markers", metavar="YAML", help="label → marker genes: with --unseen-types, also rank the "
                        "labels by marker texts (e.g. train/configs/pbmc_markers.yaml)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        variants = dict(parse_variant(words) for words in args.variant)
    except ValueError as error:
        parser.error(str(error))
    if len(variants) != len(args.variant):
        parser.error("two variants share a name")
    if args.markers and not args.unseen_types:
        parser.error("--markers scores held-out types: give --unseen-types too")
    if args.quiet:
        quiet_libraries()
    labels = _cell_labels(args.config) if args.unseen_types else None
    try:
        markers = load_markers(args.markers, set(labels)) if args.markers else None
    except (OSError, ValueError) as error:
        parser.error(str(error))
    results: dict[str, dict[int, dict]] = {name: {} for name in variants}
    unseen: dict[str, dict[int, dict]] = {name: {} for name in variants} if args.unseen_types else {}
    held_out = {seed: held_out_types(labels, seed) for seed in args.seeds} if args.unseen_types else {}
    output = Path(args.output_dir)
    for seed in args.seeds:
        for name, row in _shift_runs(args, output / f"seed_{seed}", seed, variants):
            results[name][seed] = row
        if args.unseen_types:
            for name, row in _unseen_runs(args, output / f"seed_{seed}" / "unseen", seed, variants, held_out[seed],
                                          markers):
                unseen[name][seed] = row
    tables = ablation_table(results) + (f"\n\nUnseen cell types\n\n{unseen_ablation_table(unseen)}" if unseen else "")
    (output / "results.json").write_text(json.dumps({"variants": variants, "results": results, "unseen": unseen,
                                                     "held_out_cell_types": held_out}, indent=1))
    (output / "ablation.md").write_text(f"# Stage-1 ablation ({args.config})\n\n{tables}\n", encoding="utf-8")
    print(f"\n{tables}\n\n{output / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
