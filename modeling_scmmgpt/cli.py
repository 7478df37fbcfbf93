"""The `scmmgpt` command. Each sub-command imports its (possibly heavy) implementation only when it runs."""

import argparse
import importlib
import sys

# sub-command → (module, function taking argv, one-line help); the functions parse their own arguments
COMMANDS = {
    "demo": ("scmmgpt_train.demo", "main", "run the main job on the embedded default, offline"),
    "annotate": ("modeling_scmmgpt.cli_jobs", "annotate_main", "cell type annotation of an .h5ad"),
    "embed": ("modeling_scmmgpt.cli_jobs", "embed_main", "cell embeddings of an .h5ad"),
    "describe": ("modeling_scmmgpt.cli_jobs", "describe_main", "written descriptions of the cells of an .h5ad"),
    "generate": ("modeling_scmmgpt.cli_jobs", "generate_main", "pseudo-cells from a text prompt"),
    "build-dataset": ("scmmgpt_train.build_cli", "build_dataset_main", "turn .h5ad files into a text-paired HF dataset"),
    "train": ("scmmgpt_train.run", "main", "train every stage from a YAML config (train/configs/*.yaml)"),
    "convert-scgpt": ("modeling_scmmgpt.convert_scgpt", "main", "convert a scGPT model folder into a from_pretrained folder"),
    "push": ("modeling_scmmgpt.hub_push", "push_main", "check a saved model folder and upload it to the Hub (--dry-run lists it)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="scmmgpt", description="scMMGPT: single cells and text in one model.")
    parser.add_argument("command", choices=sorted(COMMANDS), help="; ".join(f"{k}: {v[2]}" for k, v in COMMANDS.items()))
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    args = parser.parse_args(argv[:1])
    module_name, function_name, _ = COMMANDS[args.command]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
