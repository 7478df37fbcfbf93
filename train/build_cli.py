"""`scmmgpt build-dataset IN.h5ad... -o OUT_DIR`: parquet shards, the build report and the cell tokenizer.

Bad input is one line on stderr that names the file or the flag at fault (`--label-column 'x' is not a column of obs
...`), with exit status 2; never a traceback. The build itself is `data.write_dataset`; its errors name the Python
keyword (`label_column`), which this command turns into its flag.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from modeling_scmmgpt.cli_jobs import positive_int_argument

from .data import CHUNK_CELLS, LABEL_COLUMNS, write_dataset
from .ontology import UnmappedLabelsError
from .sources import COUNTS, DataError, OptionError
from .splits import check_test_size, check_validation_size

PROG = "scmmgpt build-dataset"
# build keywords whose flag is not the keyword spelt with dashes
FLAGS = {"tokenizer": "--vocab", "value_kind": "--require-counts", "on_unmapped": "--keep-unmapped"}


class UsageError(Exception):
    """A bad command line, found before the build starts."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad number) in one line too, without the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", help=".h5ad files (concatenated)")
    parser.add_argument("-o", "--output", required=True, help="output folder (written atomically)")
    parser.add_argument("--vocab", help="a saved cell tokenizer folder (the model's gene vocabulary); "
                        "default: the union of the inputs' genes")
    parser.add_argument("--label-column", help=f"obs column of cell-type labels (default: first of {LABEL_COLUMNS})")
    parser.add_argument("--label-map", help="JSON file of extra {label: CL id} entries")
    parser.add_argument("--keep-unmapped", action="store_true",
                        help="keep cells whose label maps to no CL term (label-only text) instead of failing")
    parser.add_argument("--require-counts", action="store_true", help="fail unless raw counts are found")
    parser.add_argument("--gene-column", help="var column of gene names (default: index or feature_name)")
    parser.add_argument("--split-by", choices=["cell", "donor", "dataset", "auto"], help="make a test split")
    parser.add_argument("--test-size", type=float, default=0.1,
                        help="share of the cells in the test split (with --split-by); must be in (0, 1)")
    parser.add_argument("--held-out-cell-types", nargs="*", default=[], help="labels / CL ids / names held out")
    parser.add_argument("--validation-size", type=float, default=0.0,
                        help="training cells set aside in a validation split, on which training chooses its "
                             "checkpoint: a share in (0, 1) or a number of cells (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cells-per-shard", type=positive_int_argument, default=100_000)
    parser.add_argument("--chunk-cells", type=positive_int_argument, default=CHUNK_CELLS)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    return parser


def _read_label_map(path: str | None) -> dict | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--label-map {path!r}: no such file")
    try:
        mapping = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"--label-map {path!r} is not JSON ({err})") from err
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UsageError(f"--label-map {path!r} must hold one JSON object of label: CL id strings")
    return mapping


def _check_output(output: str, overwrite: bool):
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output {output!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output {output!r} exists and is not empty; pass --overwrite to replace it")


def error_line(err: BaseException) -> str:
    """The one line said for an error of the build, the option at fault named by its flag."""
    if isinstance(err, OptionError):
        text = f"{FLAGS.get(err.option, '--' + err.option.replace('_', '-'))} {err.problem}"
    elif isinstance(err, UnmappedLabelsError):
        text = (f"{err.summary}; pass --label-map FILE (a JSON object of label: CL id) for them, or --keep-unmapped "
                "to keep them with label-only text")
    else:
        text = str(err)
    return " ".join(text.split())  # one line, whatever the message held


def _warning_line(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _build(args) -> dict:
    check_test_size(args.test_size)  # checked with or without --split-by: a bad value is a mistake either way
    check_validation_size(args.validation_size)
    label_map = _read_label_map(args.label_map)
    _check_output(args.output, args.overwrite)
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line  # "genes dropped" and the like, without source lines
        return write_dataset(
            args.inputs, args.output, args.vocab, cells_per_shard=args.cells_per_shard, overwrite=args.overwrite,
            label_column=args.label_column, label_map=label_map, gene_column=args.gene_column,
            on_unmapped="label_only" if args.keep_unmapped else "error",
            value_kind=COUNTS if args.require_counts else "auto", chunk_cells=args.chunk_cells,
            split_by=args.split_by, test_size=args.test_size, seed=args.seed,
            held_out_cell_types=args.held_out_cell_types, validation_size=args.validation_size,
        )


def build_dataset_main(argv: list[str] | None = None) -> int:
    """`scmmgpt build-dataset IN.h5ad... -o OUT_DIR`: write parquet shards, the build report and the tokenizer.
    Returns the exit status: 0, 2 for bad input (one line on stderr), 130 when interrupted."""
    args = _parser().parse_args(argv)
    failure = None
    try:
        info = _build(args)
    except KeyboardInterrupt:  # the output folder appears only once complete
        failure = "interrupted; nothing was written", 130
    except (UsageError, DataError, UnmappedLabelsError, ValueError, OSError) as err:
        failure = f"error: {error_line(err)}", 2
    if failure:
        print(f"{PROG}: {failure[0]}", file=sys.stderr)
        return failure[1]
    print(f"wrote {info['n_cells']} cells to {args.output}: splits {info['splits']}, values {info['value_kinds']}")
    if info["unmapped_labels"]:
        print(f"labels without a CL term (kept with label-only text): {info['unmapped_labels']}")
    return 0


__all__ = ["FLAGS", "build_dataset_main", "error_line"]
