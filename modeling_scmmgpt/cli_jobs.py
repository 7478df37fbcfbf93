"""`scmmgpt annotate | embed | describe | generate`: the jobs on any AnnData, from the command line.

Each reads an `.h5ad`, runs the model from a saved folder, and writes an `.h5ad` with the results in `obs` / `obsm`.
Gene names are matched to the model's vocabulary from `var_names` or the `var` column that matches most genes
(Ensembl IDs in `var_names` with symbols in `feature_name`, as CELLxGENE writes them, work as they are). Raw counts are
normalised (total 1e4 + log1p) like the training data; log-normalised input is used as it is.
"""

import argparse
import json
import os
import sys
import warnings

import numpy as np

LABELS_FILE = "label_texts.json"  # label → text, saved beside a trained model by the training pipeline


class CLIError(Exception):
    """A problem with the user's input, reported as one line and exit status 2."""


def _read_h5ad(path: str):
    if not os.path.exists(path):
        raise CLIError(f"{path}: no such file")
    if not path.endswith((".h5ad", ".h5")):
        raise CLIError(f"{path}: expected an AnnData .h5ad file")
    import anndata

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return anndata.read_h5ad(path)
    except Exception as err:  # h5py / anndata raise many types for a damaged file
        raise CLIError(f"{path}: not a readable .h5ad file ({type(err).__name__}: {err})") from err


CLASSIFIER = "ScMMGPTCellForClassification"


def _architectures(model_dir: str) -> list[str]:
    if not os.path.isdir(model_dir) or not os.path.exists(os.path.join(model_dir, "config.json")):
        raise CLIError(f"{model_dir}: not a saved model folder (no config.json)")
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(model_dir), "architectures", None) or []


def load_model(model_dir: str):
    """The scMMGPT model saved in `model_dir` (stage 2 if it has an LLM, else stage 1) and its processor."""
    from transformers import AutoProcessor

    from . import ScMMGPTForConditionalGeneration, ScMMGPTModel

    architectures = _architectures(model_dir)
    if CLASSIFIER in architectures:
        raise CLIError(f"{model_dir} is a fine-tuned cell type classifier: it only annotates (scmmgpt annotate)")
    model_class = ScMMGPTForConditionalGeneration if "ScMMGPTForConditionalGeneration" in architectures else ScMMGPTModel
    model = model_class.from_pretrained(model_dir).eval()
    model.processor = AutoProcessor.from_pretrained(model_dir)
    return model


def cell_inputs(adata, tokenizer, normalize: str = "auto") -> dict:
    """The matrix, gene names and normalisation to hand the cell tokenizer for this AnnData."""
    candidates = {"var_names": [str(g) for g in adata.var_names]}
    for column in adata.var.columns:
        if adata.var[column].dtype == object or str(adata.var[column].dtype) == "category":
            candidates[column] = [str(g) for g in adata.var[column]]
    hits = {name: int((tokenizer.convert_genes_to_ids(genes) >= 0).sum()) for name, genes in candidates.items()}
    best = max(hits, key=hits.get)
    if hits[best] == 0:
        raise CLIError(f"none of the {adata.n_vars} genes (var_names or any var column) is in the model's vocabulary "
                       f"of {len(tokenizer.gene_names)} genes; first genes: {candidates['var_names'][:5]}")
    matrix = adata.X
    if normalize == "auto":
        sample = matrix[: min(200, adata.n_obs)]
        values = sample.data if hasattr(sample, "data") else np.asarray(sample).ravel()
        normalize = "yes" if values.size and np.allclose(values, np.round(values)) else "no"
    return {"cells": matrix, "gene_names": candidates[best], "normalize": normalize == "yes"}


def _common_arguments(parser: argparse.ArgumentParser, with_input: bool = True):
    parser.add_argument("model", help="a saved scMMGPT model folder")
    if with_input:
        parser.add_argument("input", help="input .h5ad (cells × genes; raw counts or log-normalised)")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--normalize", choices=["auto", "yes", "no"], default="auto",
                        help="normalise total counts + log1p (auto: when the values are integer counts)")


def _labels(args, model_dir: str) -> tuple[list[str], list[str] | None]:
    if args.labels:
        return list(args.labels), None
    path = os.path.join(model_dir, LABELS_FILE)
    if not os.path.exists(path):
        raise CLIError(f"give --labels: {model_dir} has no {LABELS_FILE} with the cell types it was trained on")
    with open(path, encoding="utf-8") as f:
        texts = json.load(f)
    return list(texts), list(texts.values())


def _write(adata, path: str):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    adata.write_h5ad(path)
    print(f"wrote {path} ({adata.n_obs} cells)")


def annotate_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt annotate", description="Cell type annotation: writes "
                                     "obs['scmmgpt_cell_type'] and obsm['scmmgpt_cell_type_scores'].")
    _common_arguments(parser)
    parser.add_argument("--labels", nargs="+", help="candidate cell types (default: those the model was trained on)")
    parser.add_argument("--method", choices=["retrieval", "likelihood", "generate"], default=None,
                        help="zero-shot method of a scMMGPT model (default: retrieval); a fine-tuned classifier "
                             "folder uses its head")
    return _run(parser, argv, _annotate)


def _annotate_with_classifier(args):
    """A fine-tuned `ScMMGPTCellForClassification` folder: its own labels, probabilities as scores."""
    from transformers import AutoFeatureExtractor

    from . import ScMMGPTCellForClassification

    if args.labels or args.method:
        raise CLIError(f"{args.model} is a fine-tuned classifier with fixed labels: drop --labels / --method")
    model = ScMMGPTCellForClassification.from_pretrained(args.model).eval()
    adata = _read_h5ad(args.input)
    feature_extractor = AutoFeatureExtractor.from_pretrained(args.model)
    inputs = cell_inputs(adata, feature_extractor, args.normalize)
    result = model.annotate(inputs.pop("cells"), feature_extractor=feature_extractor, batch_size=args.batch_size,
                            progress=True, **inputs)
    return adata, result


def _annotate(args):
    if CLASSIFIER in _architectures(args.model):
        adata, result = _annotate_with_classifier(args)
        _write_annotation(adata, result, args.output)
        return
    args.method = args.method or "retrieval"
    model, adata = load_model(args.model), _read_h5ad(args.input)
    labels, texts = _labels(args, args.model)
    inputs = cell_inputs(adata, model.processor.feature_extractor, args.normalize)
    result = model.annotate(inputs.pop("cells"), labels, method=args.method, label_texts=texts,
                            batch_size=args.batch_size, progress=True, **inputs)
    _write_annotation(adata, result, args.output)


def _write_annotation(adata, result, path: str):
    adata.obs["scmmgpt_cell_type"] = result.predictions
    adata.obsm["scmmgpt_cell_type_scores"] = result.scores.astype(np.float32)
    adata.uns["scmmgpt_cell_type_labels"] = np.asarray(result.labels, dtype=object)
    _write(adata, path)


def embed_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt embed", description="Cell embeddings: writes obsm['X_scmmgpt'].")
    _common_arguments(parser)
    parser.add_argument("--space", choices=["encoder", "aligned"], default="encoder",
                        help="encoder: the cell encoder's <cls> embedding; aligned: the shared cell–text space")
    return _run(parser, argv, _embed)


def _embed(args):
    model, adata = load_model(args.model), _read_h5ad(args.input)
    inputs = cell_inputs(adata, model.processor.feature_extractor, args.normalize)
    adata.obsm["X_scmmgpt"] = model.embed(inputs.pop("cells"), space=args.space, batch_size=args.batch_size,
                                          progress=True, **inputs)
    _write(adata, args.output)


def describe_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt describe",
                                     description="Cell descriptions: writes obs['scmmgpt_description'].")
    _common_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return _run(parser, argv, _describe)


def _describe(args):
    model, adata = load_model(args.model), _read_h5ad(args.input)
    inputs = cell_inputs(adata, model.processor.feature_extractor, args.normalize)
    normalize = inputs.pop("normalize")
    adata.obs["scmmgpt_description"] = model.describe(
        inputs.pop("cells"), gene_names=inputs["gene_names"], batch_size=args.batch_size, progress=True,
        max_new_tokens=args.max_new_tokens, cell_kwargs={"normalize": normalize})
    _write(adata, args.output)


def generate_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="scmmgpt generate",
                                     description="Pseudo-cells from text: an AnnData of N cells over the model's genes.")
    parser.add_argument("model", help="a saved scMMGPT model folder")
    parser.add_argument("text", nargs="+", help="one or more prompts, e.g. 'cell type: CD14-positive monocyte.'")
    parser.add_argument("-n", type=int, default=10, help="cells per prompt")
    parser.add_argument("-o", "--output", required=True, help="output .h5ad")
    parser.add_argument("--seed", type=int, default=0)
    return _run(parser, argv, _generate)


def _generate(args):
    if args.n < 1:
        raise CLIError("-n must be at least 1")
    model = load_model(args.model)
    cells = model.generate_cells(args.text, n_per_text=args.n, seed=args.seed).to_anndata()
    _write(cells, args.output)


def _run(parser, argv, job) -> int:
    args = parser.parse_args(argv)
    try:
        job(args)
    except (CLIError, ValueError) as err:
        print(f"scmmgpt: error: {err}", file=sys.stderr)
        return 2
    return 0


__all__ = ["annotate_main", "embed_main", "describe_main", "generate_main", "load_model", "cell_inputs"]
