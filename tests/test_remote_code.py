"""Saved folders load through `trust_remote_code` in a process where `modeling_scmmgpt` is not importable."""

import json

import numpy as np
import torch

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTCellTokenizer, ScMMGPTProcessor

from .conftest import run_fresh_python


def test_processor_expands_cell_placeholder(pbmc, minilm_tokenizer):
    tok = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=32, normalize=False)
    processor = ScMMGPTProcessor(tok, minilm_tokenizer, num_query_tokens=4)
    batch = processor(cells=pbmc[:2], text=["<cell> a cell", "<cell> another"], cell_kwargs={"use_raw": True},
                      return_tensors="pt")
    assert {"input_ids", "attention_mask", "gene_ids", "expression_values", "cell_attention_mask"} <= set(batch)
    ids = batch["input_ids"][0].tolist()
    slots = [processor.boc_token_id, *processor.cell_token_ids, processor.eoc_token_id]
    assert ids[1 : 1 + len(slots)] == slots  # after [CLS]
    assert batch["gene_ids"].shape[0] == 2
    try:
        processor(cells=pbmc[:3], text=["<cell> a cell"], cell_kwargs={"use_raw": True})
    except ValueError as err:
        assert "1 <cell> placeholders but 3 cells" in str(err)
    else:
        raise AssertionError("a placeholder/cell count mismatch must raise")


def test_fresh_process_trust_remote_code_round_trip(tmp_path, pbmc, pbmc_path, minilm_tokenizer):
    folder = tmp_path / "model"
    tok = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=64, normalize=False)
    processor = ScMMGPTProcessor(tok, minilm_tokenizer, num_query_tokens=4)
    torch.manual_seed(0)
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=len(tok))).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModel"].endswith("ScMMGPTCellModel")
    batch = processor(cells=pbmc, cell_kwargs={"use_raw": True}, return_tensors="pt")
    with torch.no_grad():
        expected = model(batch["gene_ids"], batch["expression_values"], batch["cell_attention_mask"]).cell_embeds
    np.save(tmp_path / "expected.npy", expected.numpy())

    out = run_fresh_python(
        f"""
        import anndata, numpy as np, torch
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        adata = anndata.read_h5ad({pbmc_path!r})
        batch = processor(cells=adata, cell_kwargs={{"use_raw": True}}, return_tensors="pt")
        with torch.no_grad():
            got = model(batch["gene_ids"], batch["expression_values"], batch["cell_attention_mask"]).cell_embeds
        diff = np.abs(got.numpy() - np.load({str(tmp_path / "expected.npy")!r})).max()
        print("maxdiff", diff)
        """,
        cwd=str(tmp_path),
    )
    assert float(out.split("maxdiff")[-1]) == 0.0
