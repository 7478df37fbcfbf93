"""`scmmgpt train`: the whole training pipeline from one YAML config: data → stage 0 (cell encoder, and a small LLM when
none is given) → stage 1 (alignment) → stage 2 (generation) → a Hub-ready folder; and, from stage 1's or stage 0's
cell encoder (`classifier.encoder`), a fine-tuned cell type classifier (`classifier`, a Hub-ready folder of its own).

    scmmgpt train --config train/configs/tiny-cpu.yaml [--output-dir DIR] [--fresh] [--stages stage1 stage2]
    accelerate launch --config_file train/accelerate/multi_gpu.yaml -m scmmgpt_train.run --config CONFIG

The config schema is `config.py` (each section parsed with `HfArgumentParser`: `TrainingArguments`, or TRL's
`SFTConfig` for stage 2, next to the stage's own arguments), the stages `stages.py`, and the resumable pipeline
`pipeline.py`: each stage writes into its own subfolder, marks it complete after its save, is skipped on a re-run
(unless `--fresh`) and resumes from its last checkpoint when it was interrupted.
"""

from __future__ import annotations

import argparse

from .config import STAGES, ConfigError, load_config, parse_overrides
from .pipeline import is_main_process, run_pipeline
from .trainers import quiet_libraries


# each stage's held-out figures next to the reference it should beat (random encoder, per-gene mean, untrained head)
SHOWN_METRICS = ("masked_value_mse", "masked_value_mse_random_init", "masked_value_mse_gene_mean", "perplexity_before",
                 "perplexity_after", "retrieval_accuracy_before", "retrieval_accuracy", "knn_accuracy",
                 "generated_state_accuracy", "accuracy_before", "accuracy", "macro_f1")


def _summary(result: dict) -> str:
    lines = [f"output: {result['output_dir']}  (final model: {result['model_dir']})"]
    for name, record in result["stages"].items():
        how = "cached" if record["cached"] else f"{record['seconds']:.0f}s"
        losses = ", ".join(f"{k} {a:.3f}→{b:.3f}" for k, (a, b) in record["losses"].items())
        lines.append(f"  {name:<11} [{how}] {losses}")
        shown = {k: v for k, v in record["metrics"].items() if k in SHOWN_METRICS}
        if shown:
            lines.append("              " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    lines.append(f"total {result['seconds']:.0f}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`scmmgpt train --config CONFIG [--output-dir DIR] [--fresh] [--stages ...] [--set section.key=value ...]`."""
    parser = argparse.ArgumentParser(prog="scmmgpt train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML config (train/configs/tiny-cpu.yaml, paper.yaml)")
    parser.add_argument("--output-dir", help="run folder (default: the config's pipeline.output_dir)")
    parser.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing finished ones")
    parser.add_argument("--stages", nargs="+", choices=STAGES, help="stages to run (default: the config's)")
    parser.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config values (YAML-parsed), e.g. --set stage1.max_steps=20")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-step log lines (the logs still go "
                        "to each stage's trainer_state.json)")
    args = parser.parse_args(argv)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as error:
        parser.error(f"--set {error}")
    try:  # a config mistake is one line here, before any stage trains
        config = load_config(args.config, args.output_dir, overrides)
    except (OSError, ValueError) as error:
        parser.error(f"--config {args.config}: {error}")
    if args.quiet:
        quiet_libraries()
    try:
        result = run_pipeline(config, fresh=args.fresh, progress=not args.quiet, stages=args.stages)
    except ConfigError as error:  # data, stages and options that do not fit: one line, before the stage trains
        parser.error(str(error))
    if is_main_process():
        print(_summary(result))
    return 0


__all__ = ["main"]


if __name__ == "__main__":
    import sys

    sys.exit(main())
