"""Stage-1 ablations: zero-shot retrieval off the training split for config variants, over several seeds.

    python -m scmmgpt_train.ablation --config train/configs/tiny-cpu.yaml --seeds 0 1 2 --output-dir ablation \
        --variant base --variant steps600 stage1.max_steps=600 --variant t0.02 model.contrastive_temperature=0.02

Each seed is its own split and trains stage 0 once (`<output>/seed_<n>/stage0_cell`); every variant then trains
stage 1 from that same encoder (`<output>/seed_<n>/<variant>/stage1`), with the seed's config plus the variant's
`SECTION.KEY=VALUE` overrides, and is scored on the seed's test cells under `shifts.SHORT_SUITE`: the cells, shifts and
logistic-regression reference of `make eval`'s table. Finished folders are reused, so an interrupted run picks up
where it stopped. Writes `<output>/ablation.md` (mean ± sd over seeds) and `<output>/results.json`.

Stage 1 alone is what zero-shot retrieval depends on (stage 2 keeps the Q-Former's retrieval as it is), so a variant
costs one stage-1 run per seed: ~4 minutes at tiny-cpu's 300 steps on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .config import load_config, parse_overrides
from .robustness import LOGISTIC, RETRIEVAL

ACCURACY = ": accuracy"


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


def train_encoder(config_path: str, seed_dir: Path, seed: int, progress: bool) -> Path:
    """The seed's stage-0 cell encoder (`seed_dir/stage0_cell`), trained once and shared by every variant."""
    from .pipeline import run_pipeline

    run_pipeline(load_config(config_path, str(seed_dir), _seeded(seed)), stages=["stage0_cell"], progress=progress)
    return seed_dir / "stage0_cell"


def run_variant(config_path: str, seed_dir: Path, seed: int, name: str, overrides: dict, progress: bool) -> dict:
    """Stage 1 of one variant from the seed's stage-0 encoder (`train_encoder`), scored under the short shift suite:
    {shift: {"<method>: accuracy" / "<method>: macro_f1": value}}."""
    from modeling_scmmgpt import ScMMGPTModel

    from .evaluate import EvalCells
    from .pipeline import load_cells, run_pipeline
    from .pretrain import pbmc_path
    from .robustness import CountCells, evaluate_shifts, source_library_sizes
    from .stage1 import label_texts_of

    config = load_config(config_path, str(seed_dir / name),
                         {**_seeded(seed), "model.cell_encoder_path": str(seed_dir / "stage0_cell"), **overrides})
    run_pipeline(config, stages=["stage1"], progress=progress)
    cells = load_cells(config.data)
    stage1_dir = seed_dir / name / "stage1"
    model = ScMMGPTModel.from_pretrained(str(stage1_dir)).eval()
    source = config.data.h5ad or pbmc_path()
    test = CountCells.from_rows(cells.test, cells.tokenizer, source_library_sizes(source))
    return evaluate_shifts(model, _processor(model, cells, stage1_dir), EvalCells.from_rows(cells.train,
                           cells.tokenizer), test, label_texts_of(cells.all_rows), seed=seed)


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
        cells = []
        for shift in shifts:
            values = np.array([r[shift][method + ACCURACY] for r in per_seed.values()])
            cells.append(f"{values.mean():.3f} ± {values.std():.3f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scmmgpt_train.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="train/configs/tiny-cpu.yaml", help="the pipeline config the variants change")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split and training seeds")
    parser.add_argument("--output-dir", default="ablation_output", help="run folder (reused when it exists)")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [SECTION.KEY=VALUE]",
                        help="a variant: its name, then its config overrides (none: the config as it is)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        variants = dict(parse_variant(words) for words in args.variant)
    except ValueError as error:
        parser.error(str(error))
    if len(variants) != len(args.variant):
        parser.error("two variants share a name")
    output = Path(args.output_dir)
    results: dict[str, dict[int, dict]] = {name: {} for name in variants}
    for seed in args.seeds:
        train_encoder(args.config, output / f"seed_{seed}", seed, progress=not args.quiet)
        for name, overrides in variants.items():
            results[name][seed] = run_variant(args.config, output / f"seed_{seed}", seed, name, overrides,
                                              progress=not args.quiet)
            print(f"seed {seed} {name}: retrieval "
                  + ", ".join(f"{shift} {row[RETRIEVAL + ACCURACY]:.3f}" for shift, row in results[name][seed].items()),
                  flush=True)
    table = ablation_table(results)
    (output / "results.json").write_text(json.dumps({"variants": variants, "results": results}, indent=1))
    (output / "ablation.md").write_text(f"# Stage-1 ablation ({args.config})\n\n{table}\n", encoding="utf-8")
    print(f"\n{table}\n\n{output / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
