"""Regenerate the pruned Cell Ontology scMMGPT ships, `modeling_scmmgpt/cell_ontology.json.gz`, from the
`CL-ontology-<version>.json.zst` that cellxgene-ontology-guide carries (the newest it has by default).

    pip install 'scmmgpt[ontology]'
    python tools/prune_cell_ontology.py [--source CL-ontology-v2026-03-26.json.zst] [TARGET]

A maintainer's tool, outside the package: the format (reader and writer) is `modeling_scmmgpt.ontology_scmmgpt`'s
(`write_pruned_ontology`). Training texts come from the shipped file, so a new release changes them: say so in the
commit.
"""

import argparse
from pathlib import Path

from modeling_scmmgpt.ontology_scmmgpt import ONTOLOGY_FILE, load_cell_ontology, write_pruned_ontology

SHIPPED = Path(__file__).resolve().parent.parent / "modeling_scmmgpt" / ONTOLOGY_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the pruned Cell Ontology scMMGPT ships.")
    parser.add_argument("target", nargs="?", default=str(SHIPPED), help=f"the file to write (default: {SHIPPED})")
    parser.add_argument("--source", help="a CL-ontology-*.json.zst (default: the newest the installed guide carries)")
    args = parser.parse_args(argv)
    target = write_pruned_ontology(args.target, args.source)
    ontology = load_cell_ontology(target)
    print(f"{target}: Cell Ontology {ontology.version}, {len(ontology)} terms, {target.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
