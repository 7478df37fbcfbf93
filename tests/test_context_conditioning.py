"""Richer conditioning (issue 17, part 3): a source with CELLxGENE's tissue / disease / development-stage columns (or
only their ontology-term-id columns) gets them in each cell's text, and a tiny model trained a few steps on such cells
generates, for one cell type, cells of the tissue its text names."""

import copy

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

from scmmgpt_train.data import build_dataset

TYPES = ("B cell", "CD14-positive monocyte")
TISSUES = ("blood", "lung")
N_GENES, PER_GROUP = 40, 48
TYPE_MARKERS = {"B cell": range(0, 5), "CD14-positive monocyte": range(5, 10)}
TISSUE_MARKERS = {"blood": range(10, 15), "lung": range(15, 20)}


def context_cells(seed: int = 0) -> anndata.AnnData:
    """Counts of 2 cell types × 2 tissues (`PER_GROUP` cells each): a type's markers and a tissue's markers at 20
    reads on average, the other genes rarely expressed (0.05), so that even a random stage 1 reads the four groups
    into distinct states."""
    rng = np.random.default_rng(seed)
    obs, rates = [], []
    for cell_type in TYPES:
        for tissue in TISSUES:
            rate = np.full(N_GENES, 0.05)
            rate[list(TYPE_MARKERS[cell_type])] = 20.0
            rate[list(TISSUE_MARKERS[tissue])] = 20.0
            rates += [rate] * PER_GROUP
            obs += [{"cell_type": cell_type, "tissue": tissue, "disease": "normal",
                     "development_stage": "unknown"}] * PER_GROUP
    counts = rng.poisson(np.array(rates) * rng.uniform(0.7, 1.3, (len(rates), 1))).astype(np.float32)
    obs = pd.DataFrame(obs, index=[f"cell{i}" for i in range(len(obs))])
    return anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=[f"GENE{j}" for j in range(N_GENES)]))


def test_texts_carry_the_context_columns_or_their_term_ids():
    ds = build_dataset(context_cells(), label_column="cell_type")
    texts = set(ds["text"])
    assert len(texts) == 4
    for text in texts:
        assert text.startswith("cell type: ") and " Disease: normal." in text
        assert "Development stage" not in text  # "unknown" is no context
        assert text.count(" Tissue: ") == 1 and text.rstrip(".").endswith("Disease: normal")
    lung = [t for t, tissue in zip(ds["text"], context_cells().obs["tissue"]) if tissue == "lung"]
    assert all(" Tissue: lung." in t for t in lung)
    # a file holding the ids alone: the ids are read as their terms' labels (cellxgene-ontology-guide's UBERON)
    pytest.importorskip("cellxgene_ontology_guide")
    ids_only = context_cells()
    ids_only.obs["tissue_ontology_term_id"] = ids_only.obs.pop("tissue").map({"blood": "UBERON:0000178",
                                                                              "lung": "UBERON:0002048"})
    texts = build_dataset(ids_only, label_column="cell_type")["text"]
    assert {t.split(" Tissue: ")[1].split(".")[0] for t in texts} == {"blood", "lung"}


def test_pbmc_texts_are_unchanged(pbmc_path):
    """PBMC has no context column: its texts stay `cell type: {name}. {definition}`."""
    ds = build_dataset(pbmc_path, label_column="bulk_labels")
    assert not any(lead in text for text in set(ds["text"]) for lead in (" Tissue:", " Disease:", "Development stage"))


def train_tiny_context_model(tmp_path, minilm_tokenizer, seed: int = 0, **stage2):
    """A tiny stage-2 model (random stage 1, a small Llama tuned in full, an NB decoder warmed up on true states)
    trained on text → cell examples of `context_cells` (~30 s on a CPU). With 150 steps the LLM still read every
    text into one average state; with a 200-step warm-up the expression loss drew the states off the true ones,
    towards where the less trained decoder spreads its distribution over both types."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig

    from modeling_scmmgpt import ScMMGPTProcessor
    from scmmgpt_train.pretrain import train_text_tokenizer
    from scmmgpt_train.stage1 import build_stage1_model
    from scmmgpt_train.stage2 import STAGE2_TRAINING, Stage2Arguments, build_stage2_model, train_stage2

    ds, cell_tokenizer = build_dataset(context_cells(), label_column="cell_type", return_tokenizer=True)
    text_tokenizer = train_text_tokenizer(list(ds["text"]) * 5, vocab_size=400)
    processor = ScMMGPTProcessor(cell_tokenizer, text_tokenizer, qformer_tokenizer=copy.deepcopy(minilm_tokenizer),
                                 num_query_tokens=4)
    torch.manual_seed(seed)
    stage1 = build_stage1_model(cell_tokenizer, minilm_tokenizer, num_query_tokens=4, embed_dim=16,
                                expression_decoder_hidden_size=32)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(text_tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                       max_position_embeddings=256))
    model = build_stage2_model(stage1, llm, processor)
    sft = SFTConfig(output_dir=str(tmp_path), max_steps=400, per_device_train_batch_size=16, learning_rate=3e-3,
                    lr_scheduler_type="cosine", warmup_steps=5, logging_steps=50, save_strategy="no", report_to=[],
                    use_cpu=True, max_length=256, remove_unused_columns=False, disable_tqdm=True, seed=seed,
                    **STAGE2_TRAINING)
    args = Stage2Arguments(**{**dict(tuning="full", text_to_cell_fraction=1.0, decoder_warmup_steps=800,
                                     train_expression_decoder=False, expression_distribution="nb"), **stage2})
    _, model = train_stage2(model, ds, processor, sft, args)
    return model.eval(), processor, ds


def test_generation_follows_the_tissue_in_the_text(tmp_path, minilm_path):
    from transformers import AutoTokenizer

    from modeling_scmmgpt import ScMMGPTJobs

    # a fresh tokenizer: the session's `minilm_tokenizer` carries the cell tokens of tests that use it as an LLM
    # tokenizer, which would change the Q-Former's vocabulary, hence its seeded initialisation, with the test order
    model, processor, ds = train_tiny_context_model(tmp_path, AutoTokenizer.from_pretrained(minilm_path))
    assert model.config.expression_distribution == "nb" and len(model.config.library_size_quantiles) == 101
    jobs = ScMMGPTJobs(model, processor, verbose=False)
    texts = {(label, tissue): text for label, tissue, text in zip(ds["cell_type"], context_cells().obs["tissue"],
                                                                   ds["text"])}
    genes = list(processor.feature_extractor.gene_names)
    column = {g: j for j, g in enumerate(genes)}
    marker = {t: [column[f"GENE{j}"] for j in TISSUE_MARKERS[t]] for t in TISSUES}
    for cell_type in TYPES:
        generated = {tissue: jobs.generate_cells(texts[(cell_type, tissue)], n_per_text=40, seed=0).expression
                     for tissue in TISSUES}
        # the text's tissue decides which tissue's markers the generated cells express
        for tissue, other in (("lung", "blood"), ("blood", "lung")):
            own = generated[tissue][:, marker[tissue]].mean()
            assert own > 2 * generated[other][:, marker[tissue]].mean(), (cell_type, tissue)
        # ... and the cell type still decides the type markers
        type_markers = [column[f"GENE{j}"] for j in TYPE_MARKERS[cell_type]]
        other_markers = [column[f"GENE{j}"] for j in TYPE_MARKERS[next(t for t in TYPES if t != cell_type)]]
        assert generated["lung"][:, type_markers].mean() > 2 * generated["lung"][:, other_markers].mean()
