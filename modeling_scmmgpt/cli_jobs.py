"""`scmmgpt annotate | embed | describe | generate`: the jobs on any `.h5ad`, from the command line.

Each job reads its `.h5ad` backed (the matrix stays on disk and is read chunk by chunk), runs `ScMMGPTJobs` on the
model folder, and writes a copy of the input with the results added in `obs` / `obsm` and the input decision in
`uns['scmmgpt']`: the copy is written beside the output under a temporary name and renamed when complete, so that a
crash never leaves a half-written file, and the input is never overwritten. Bad input gets one line on stderr and
exit status 2.
"""

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import warnings

import numpy as np

from .inputs_scmmgpt import NORMALIZE_CHOICES, read_h5ad
from .jobs_scmmgpt import GENERATED_OUTPUTS, LABELS_FILE, ScMMGPTJobs, model_kind, require_job
from .ontology_scmmgpt import load_cell_ontology


class CLIError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def positive_int_argument(text: str) -> int:
    """argparse `type=`: a whole number >= 1; anything else (`0`, `-3`, `abc`) is a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


# ---------------------------------------------------------------------------------------------------- loading
def load_jobs(model_dir: str, job: str) -> ScMMGPTJobs:
    """The jobs of the model saved in `model_dir`, after checking that its kind can do `job`."""
    if not os.path.isdir(model_dir) or not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CLIError(f"{model_dir}: not a saved model folder (no config.json)")
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    if not sys.stderr.isatty():  # progress bars only where someone watches them
        hf_logging.disable_progress_bar()
    require_job(model_kind(AutoConfig.from_pretrained(model_dir)), job)
    return ScMMGPTJobs.from_pretrained(model_dir)


def _check_paths(input_path: str | None, output: str):
    if not output.endswith(".h5ad"):
        raise CLIError(f"-o {output}: the output must be an .h5ad file")
    if os.path.isdir(output):
        raise CLIError(f"-o {output} is a folder; give an .h5ad file name")
    if input_path is not None:
        if not os.path.isfile(input_path):
            raise CLIError(f"{input_path}: no such file")
        if os.path.abspath(input_path) == os.path.abspath(output) or (
                os.path.exists(output) and os.path.samefile(input_path, output)):
            raise CLIError(f"-o {output} is the input file; write the results to a new file")


def _input_options(args) -> dict:
    return {"layer": args.layer, "use_raw": args.use_raw or None, "gene_column": args.gene_column,
            "normalize": args.normalize}


# ---------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _atomic_output(path: str):
    """A temporary file beside `path` to write; renamed to `path` when the block completes, removed if it fails, so
    that a crash never leaves a half-written output."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=".scmmgpt-", suffix=".h5ad.tmp", dir=folder)
    os.close(handle)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(input_path: str, output: str, obs: dict | None = None, obsm: dict | None = None,
                  uns: dict | None = None):
    """A copy of `input_path` with `obs` columns, `obsm` arrays and `uns['scmmgpt']` added, written atomically to
    `output`. The matrices are copied as bytes, never loaded, except from files written before anndata's current
    on-disk format (read whole and written anew)."""
    import h5py

    with _atomic_output(output) as tmp:
        shutil.copyfile(input_path, tmp)
        with h5py.File(tmp, "r+") as f:
            current = isinstance(f.get("obs"), h5py.Group) and "encoding-type" in f["obs"].attrs
            if current:
                _add_results(f, obs or {}, obsm or {}, uns)
        if not current:
            _add_results_in_memory(input_path, tmp, obs or {}, obsm or {}, uns)
    print(f"wrote {output}", file=sys.stderr)


def _add_results(f, obs: dict, obsm: dict, uns: dict | None):
    from anndata.io import read_elem, write_elem

    if obs:
        table = read_elem(f["obs"])
        for column, values in obs.items():
            table[column] = values
        del f["obs"]
        write_elem(f, "obs", table)
    for key, array in obsm.items():
        group = f.require_group("obsm")
        if key in group:
            del group[key]
        write_elem(group, key, array)
    if uns:
        group = f.require_group("uns")
        if "scmmgpt" in group:
            del group["scmmgpt"]
        write_elem(group, "scmmgpt", uns)


def _add_results_in_memory(input_path: str, tmp: str, obs: dict, obsm: dict, uns: dict | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = read_h5ad(input_path, backed=False)
    for column, values in obs.items():
        adata.obs[column] = values
    for key, array in obsm.items():
        adata.obsm[key] = array
    if uns:
        adata.uns["scmmgpt"] = uns
    adata.write_h5ad(tmp)


def _write_generated(batches, n_cells: int, output: str):
    """Generated cells (`iter_generated_cells`' batches, `n_cells` in all) written batch by batch, atomically, into
    the `.h5ad` that `GeneratedCells.to_anndata()` would give: memory stays that of one batch whatever `-n`."""
    import h5py
    import pandas as pd
    from anndata.io import write_elem

    texts, sizes, start = [], [], 0
    with _atomic_output(output) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        for key in ("layers", "obsm", "varm", "obsp", "varp"):
            write_elem(f, key, {})
        for batch in batches:
            values = batch.log1p() if batch.output == "counts" else None  # counts get their log1p layer
            if start == 0:
                first = batch
                matrix = _dense_dataset(f, "X", n_cells, batch.expression)
                layer = None if values is None else _dense_dataset(f["layers"], "log1p", n_cells, values)
            matrix[start : start + len(batch.texts)] = batch.expression
            if layer is not None:
                layer[start : start + len(batch.texts)] = values
            texts += batch.texts
            sizes += [] if batch.library_sizes is None else list(batch.library_sizes)
            start += len(batch.texts)
        obs = pd.DataFrame({"prompt": texts}, index=[f"pseudo_{i}" for i in range(len(texts))])
        if first.library_sizes is not None:
            obs["library_size"] = np.asarray(sizes, dtype=np.float64)
        write_elem(f, "obs", obs)
        write_elem(f, "var", pd.DataFrame(index=first.gene_names))
        write_elem(f, "uns", {"scmmgpt": {"output": first.output}})
    print(f"wrote {output} ({start} cells)", file=sys.stderr)


def _dense_dataset(group, name: str, n_rows: int, like: np.ndarray):
    """An empty (n_rows, like's columns) dense array of like's dtype in anndata's on-disk encoding."""
    dataset = group.create_dataset(name, shape=(n_rows, like.shape[1]), dtype=like.dtype,
                                   chunks=(max(1, min(n_rows, len(like))), like.shape[1]))
    dataset.attrs["encoding-type"], dataset.attrs["encoding-version"] = "array", "0.2.0"
    return dataset


# ---------------------------------------------------------------------------------------------------- the jobs
def _common_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("model", help="a saved scMMGPT model folder")
    parser.add_argument("input", help="input .h5ad (cells × genes: raw counts or log-normalised; see --layer)")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad (a copy of the input with the results)")
    parser.add_argument("--batch-size", type=positive_int_argument, default=64, help="cells per forward pass")
    parser.add_argument("--layer", help="read layers[LAYER] instead of .X (e.g. a counts layer)")
    parser.add_argument("--use-raw", action="store_true",
                        help="read .raw (default: .X, or .raw when .X holds scaled values and .raw does not)")
    parser.add_argument("--gene-column", help="var column with gene symbols or Ensembl IDs (default: the one that "
                                              "matches the model's vocabulary best)")
    parser.add_argument("--normalize", choices=NORMALIZE_CHOICES, default="auto",
                        help="normalise to 10k per cell + log1p (auto: when the values are counts or normalised but "
                             "not logged; log1p data is used as it is)")


def _run(parser, argv, job) -> int:
    args = parser.parse_args(argv)
    shown = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"{parser.prog}: warning: {message}\n"  # one line each
    try:
        job(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing was written", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = shown
    return 0


def _cell_job(args, job: str):
    """(jobs, the input's backed AnnData, its CellInputs) after checking paths, model and input."""
    _check_paths(args.input, args.output)
    jobs = load_jobs(args.model, job)
    adata = read_h5ad(args.input, backed=True)
    return jobs, jobs.read(adata, **_input_options(args))


def annotate_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="scmmgpt annotate",
        description="Cell type annotation: writes obs['scmmgpt_cell_type'], obs['scmmgpt_cell_type_ontology_term_id'] "
                    "(the CL id of labels read from the Cell Ontology), obsm['scmmgpt_cell_type_scores'] and, in "
                    "uns['scmmgpt'], the labels with the text each was scored by and its CL id.")
    _common_arguments(parser)
    parser.add_argument("--labels", nargs="+",
                        help="candidate cell types: labels the model was trained on (its "
                             f"{LABELS_FILE}), Cell Ontology names or exact synonyms ('B cell', 'NK cell', any case), "
                             "or CL ids (CL:0000623), which are reported by their ontology name ('natural killer "
                             "cell'; the id is in obs['scmmgpt_cell_type_ontology_term_id']); default: the model's "
                             "own labels")
    parser.add_argument("--label-texts", metavar="FILE",
                        help="a JSON object label → text for free-text labels (e.g. {\"my T cells\": \"cell type: T "
                             "cell. ...\"}); its texts win over the model's and the ontology's, and its labels are the "
                             "candidates when --labels is not given")
    parser.add_argument("--method", choices=["retrieval", "likelihood", "generate"], default=None,
                        help="zero-shot method of a scMMGPT model (default: retrieval); a fine-tuned classifier "
                             "folder uses its head")
    parser.add_argument("--no-subtypes", dest="subtypes", action="store_false",
                        help="score a Cell Ontology label coarser than the model's own types ('T cell') by its own "
                             "text alone; by default it takes the best of its text and those of the types it covers "
                             "(which: uns['scmmgpt']['label_subtypes'])")
    return _run(parser, argv, _annotate)


def _read_label_texts(path: str | None) -> dict | None:
    """The --label-texts file: a JSON object of label → text."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            texts = json.load(f)
    except (OSError, ValueError) as err:
        raise CLIError(f"--label-texts {path}: cannot read it as JSON ({err})") from err
    if not isinstance(texts, dict) or not texts or not all(isinstance(t, str) and t.strip() for t in texts.values()):
        raise CLIError(f"--label-texts {path}: must be a JSON object of label → non-empty text")
    return texts


def _annotate(args):
    import pandas as pd

    label_texts = _read_label_texts(args.label_texts)
    jobs, cells = _cell_job(args, "annotate")
    if jobs.kind.name == "classifier" and (args.labels or args.method or label_texts):
        raise CLIError(f"{args.model} is a fine-tuned classifier with fixed labels: drop --labels / --label-texts / "
                       "--method")
    result = jobs.annotate(cells, args.labels, method=args.method, label_texts=label_texts,
                           batch_size=args.batch_size, subtypes=args.subtypes)
    obs = {"scmmgpt_cell_type": pd.Categorical(result.predictions, categories=result.labels)}
    uns = {**cells.record(), "job": "annotate", "method": args.method or jobs.kind.annotation_methods[0],
           "labels": np.asarray(result.labels, dtype=object)}
    if result.label_texts is not None:
        uns["label_texts"] = np.asarray(result.label_texts, dtype=object)
        uns["label_ids"] = np.asarray([i or "" for i in result.label_ids], dtype=object)  # "": not an ontology label
    if any(result.label_ids or ()):
        term_of = dict(zip(result.labels, result.label_ids))
        obs["scmmgpt_cell_type_ontology_term_id"] = pd.Categorical([term_of.get(p) for p in result.predictions])
        uns["cell_ontology"] = load_cell_ontology().version
    if result.subtypes:  # JSON: labels such as "CD4+/CD25 T Reg" are no HDF5 keys
        uns["label_subtypes"] = json.dumps(result.subtypes)
    write_results(args.input, args.output, obs=obs,
                  obsm={"scmmgpt_cell_type_scores": result.scores.astype(np.float32)}, uns=uns)


def embed_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt embed", description="Cell embeddings: writes obsm['X_scmmgpt'].")
    _common_arguments(parser)
    parser.add_argument("--space", choices=["encoder", "aligned"], default="encoder",
                        help="encoder: the cell encoder's <cls> embedding; aligned: the shared cell–text space")
    return _run(parser, argv, _embed)


def _embed(args):
    jobs, cells = _cell_job(args, "embed")
    embeddings = jobs.embed(cells, space=args.space, batch_size=args.batch_size)
    write_results(args.input, args.output, obsm={"X_scmmgpt": embeddings},
                  uns={**cells.record(), "job": "embed", "space": args.space})


def describe_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt describe",
                                     description="Cell descriptions: writes obs['scmmgpt_description'].")
    _common_arguments(parser)
    parser.set_defaults(batch_size=16)
    parser.add_argument("--max-new-tokens", type=positive_int_argument, default=None,
                        help="length limit (default: long enough for the longest label text the model learned)")
    return _run(parser, argv, _describe)


def _describe(args):
    jobs, cells = _cell_job(args, "describe")
    texts = jobs.describe(cells, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    write_results(args.input, args.output, obs={"scmmgpt_description": np.asarray(texts, dtype=object)},
                  uns={**cells.record(), "job": "describe"})


def generate_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt generate",
                                     description="Pseudo-cells from text: an AnnData of N cells over the model's genes.")
    parser.add_argument("model", help="a saved scMMGPT model folder")
    parser.add_argument("text", nargs="+", help="one or more prompts, e.g. 'cell type: CD14-positive monocyte.'")
    parser.add_argument("-n", type=positive_int_argument, default=10, help="cells per prompt")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad")
    parser.add_argument("--seed", type=int, default=0, help="every random draw comes from it: the same seed, the "
                                                             "same cells")
    parser.add_argument("--values", choices=GENERATED_OUTPUTS, default=None,
                        help="counts: draws from the model's count distribution, integers in .X with log1p(CP10k) in "
                             ".layers['log1p']; log1p: those draws log-normalised; mean: the decoder's log1p mean, one "
                             "point per prompt (default: counts for a model with a count decoder, else mean)")
    parser.add_argument("--library-size", type=float, default=None,
                        help="library size of sampled cells (default: drawn from the training cells')")
    parser.add_argument("--state-spread", type=float, default=None,
                        help="scale of the training cells' spread around a prompt's state that each cell's state is "
                             "drawn from (0: one state per prompt; default: 1 for counts / log1p, 0 for mean)")
    parser.add_argument("--batch-size", type=positive_int_argument, default=256, help="cells decoded at a time")
    return _run(parser, argv, _generate)


def _generate(args):
    _check_paths(None, args.output)
    jobs = load_jobs(args.model, "generate_cells")
    values = args.values or ("mean" if jobs.expression_distribution == "mse" else "counts")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        batches = jobs.iter_generated_cells(args.text, n_per_text=args.n, seed=args.seed, batch_size=args.batch_size,
                                            output=values, library_size=args.library_size,
                                            state_spread=args.state_spread)
        _write_generated(batches, len(args.text) * args.n, args.output)


__all__ = ["annotate_main", "embed_main", "describe_main", "generate_main", "load_jobs", "positive_int_argument",
           "write_results"]
