"""Collators: stage-1 and stage-2 batches hold exactly the models' inputs, cells tokenised as the tokenizer would
tokenise the original file, labels masked on prompts and padding, seeded decoder genes."""

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from modeling_scmmgpt.processing_scmmgpt import ScMMGPTProcessor
from scmmgpt_train.augment import batch_seed
from scmmgpt_train.collators import IGNORE_INDEX, Stage1Collator, Stage2Collator
from scmmgpt_train.data import build_dataset
from scmmgpt_train.streaming import rows_to_matrix

STAGE1_KEYS = {"gene_ids", "expression_values", "cell_attention_mask", "qformer_input_ids", "qformer_attention_mask"}
STAGE2_KEYS = {
    "input_ids", "attention_mask", "labels", "gene_ids", "expression_values", "cell_attention_mask",
    "target_gene_ids", "target_expression_values", "target_cell_attention_mask",
    "decoder_gene_ids", "decoder_targets", "decoder_mask", "decoder_counts", "decoder_size_factors",
}
N_QUERY = 4


@pytest.fixture(scope="module")
def built(pbmc_path):
    return build_dataset(pbmc_path, return_tokenizer=True)


@pytest.fixture(scope="module")
def rows(built):
    ds, _ = built
    return [ds[i] for i in range(8)]


@pytest.fixture(scope="module")
def processor(built, minilm_path):
    from transformers import AutoTokenizer

    return ScMMGPTProcessor(feature_extractor=built[1], tokenizer=AutoTokenizer.from_pretrained(minilm_path),
                            num_query_tokens=N_QUERY)


def with_task(rows, *tasks):
    return [{**r, "task": t} for r, t in zip(rows, tasks)]


# ---------------------------------------------------------------------------------------------------- stage 1
def test_stage1_cells_match_tokenising_the_original_file(built, rows, pbmc, minilm_tokenizer):
    _, tok = built
    batch = Stage1Collator(tok, minilm_tokenizer, max_text_length=24)(rows)
    assert set(batch) == STAGE1_KEYS and all(isinstance(v, torch.Tensor) for v in batch.values())
    expected = tok(pbmc[:8], use_raw=True, normalize=False, return_tensors="pt")  # raw.X is log-normalised
    assert torch.equal(batch["gene_ids"], expected["gene_ids"])
    assert torch.equal(batch["expression_values"], expected["expression_values"])
    assert torch.equal(batch["cell_attention_mask"], expected["attention_mask"])
    text = minilm_tokenizer([r["text"] for r in rows], padding="longest", truncation=True, max_length=24,
                            return_tensors="pt")
    assert batch["qformer_input_ids"].shape == (8, 24) and torch.equal(batch["qformer_input_ids"], text["input_ids"])
    assert torch.equal(batch["qformer_attention_mask"], text["attention_mask"])


def test_stage1_label_negatives_come_tokenised_with_each_cells_own_label(built, rows, minilm_tokenizer):
    _, tok = built
    own_type = rows[0]["cell_type"]
    negatives = {"B cell": "cell type: B cell. A lymphocyte of B lineage.", own_type: rows[0]["text"]}
    collate = Stage1Collator(tok, minilm_tokenizer, max_text_length=24, negative_texts=negatives)
    batch = collate(rows)
    assert set(batch) == STAGE1_KEYS | {"negative_texts", "label_text_index"}
    again = collate(rows[::-1])  # the next batch: the same negatives, its own cells' rows among them
    assert torch.equal(again["negative_texts"]["qformer_input_ids"], batch["negative_texts"]["qformer_input_ids"])
    assert again["label_text_index"].tolist() == batch["label_text_index"].tolist()[::-1]
    text = minilm_tokenizer(list(negatives.values()), padding="longest", truncation=True, max_length=24,
                            return_tensors="pt")
    assert torch.equal(batch["negative_texts"]["qformer_input_ids"], text["input_ids"])
    assert torch.equal(batch["negative_texts"]["qformer_attention_mask"], text["attention_mask"])
    assert batch["label_text_index"].tolist() == [1 if r["cell_type"] == own_type else -1 for r in rows]
    plain = Stage1Collator(tok, minilm_tokenizer, max_text_length=24)(rows)
    for key in STAGE1_KEYS:  # the cells and their own texts are as without negatives
        assert torch.equal(plain[key], batch[key]), key


def test_stage1_normalises_count_rows(minilm_tokenizer):
    import anndata

    x = sparse.random(6, 30, density=0.4, format="csr", random_state=0, dtype=np.float32)
    x.data = np.ceil(x.data * 9)
    ad = anndata.AnnData(x, obs=pd.DataFrame({"cell_type": ["B cell"] * 6}, index=[f"c{i}" for i in range(6)]))
    ad.var_names = [f"G{i}" for i in range(30)]
    ds, tok = build_dataset(ad, return_tokenizer=True)
    batch = Stage1Collator(tok, minilm_tokenizer)(list(ds))
    expected = tok(ad, return_tensors="pt")  # counts: the tokenizer normalises to 1e4 and log1p
    assert torch.equal(batch["gene_ids"], expected["gene_ids"])
    torch.testing.assert_close(batch["expression_values"], expected["expression_values"])


def test_stage1_tokenises_a_stream_on_the_fly(tmp_path, pbmc_path, built, minilm_tokenizer):
    from scmmgpt_train.data import write_dataset
    from scmmgpt_train.streaming import stream_dataset

    write_dataset(pbmc_path, tmp_path / "pbmc", cells_per_shard=200, progress=False)
    loader = torch.utils.data.DataLoader(stream_dataset(tmp_path / "pbmc", seed=0, buffer_size=50), batch_size=64,
                                         collate_fn=Stage1Collator(built[1], minilm_tokenizer))
    batches = list(loader)
    assert sum(len(b["gene_ids"]) for b in batches) == 700
    assert all(set(b) == STAGE1_KEYS and b["cell_attention_mask"][:, 0].all() for b in batches)


# ---------------------------------------------------------------------------------------------------- stage 2
def test_stage2_keys_are_constant_whatever_the_mix(processor, rows):
    collate = Stage2Collator(processor)
    for tasks in (["cell_to_text"] * 3, ["text_to_cell"] * 3, ["cell_to_text", "text_to_cell", "cell_to_text"]):
        batch = collate(with_task(rows, *tasks))
        assert set(batch) == STAGE2_KEYS
        assert all(v.shape[0] == 3 for v in batch.values())


def test_stage2_cell_to_text_prompt_slots_and_labels(processor, rows):
    batch = Stage2Collator(processor)(with_task(rows[:2], "cell_to_text", "cell_to_text"))
    tok = processor.tokenizer
    for i, row in enumerate(rows[:2]):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        assert [t for t in ids.tolist() if t in processor.cell_token_ids] == processor.cell_token_ids
        target = tok(row["text"], add_special_tokens=False)["input_ids"]
        assert labels[labels != IGNORE_INDEX].tolist() == target  # prompt and padding ignored
        n = int(mask.sum())
        assert ids[n - len(target): n].tolist() == target and (labels[n:] == IGNORE_INDEX).all()
        assert (ids[n:] == tok.pad_token_id).all()
    assert not batch["decoder_mask"].any() and (batch["target_cell_attention_mask"].sum(1) == 1).all()
    assert (batch["cell_attention_mask"].sum(1) > 100).all()


def test_stage2_text_to_cell_targets_and_decoder_genes(processor, rows, built):
    _, tok = built
    batch = Stage2Collator(processor)(with_task(rows[:2], "text_to_cell", "text_to_cell"))
    assert (batch["cell_attention_mask"].sum(1) == 1).all()  # no input cell: `<cls>` only
    assert batch["gene_ids"][:, 0].eq(tok.cls_token_id).all()
    slots = processor.tokenizer(processor.cell_slot_text, add_special_tokens=False)["input_ids"]
    assert len(slots) == N_QUERY + 2
    for i, row in enumerate(rows[:2]):
        labels = batch["labels"][i]
        assert labels[labels != IGNORE_INDEX].tolist() == slots
        prompt = processor.tokenizer(f"Generate a cell matching this description: {row['text']}\n",
                                     add_special_tokens=False)["input_ids"]
        assert batch["input_ids"][i][labels == IGNORE_INDEX][: len(prompt)].tolist() == prompt
        genes, targets, mask = (batch[k][i][batch["decoder_mask"][i].bool()].numpy()
                                for k in ("decoder_gene_ids", "decoder_targets", "decoder_mask"))
        stored = dict(zip(row["gene_ids"], row["expression"]))
        n_expressed = len(stored)
        assert len(genes) == 2 * n_expressed and len(set(genes.tolist())) == len(genes)
        # log-normalised data: targets are the stored values; sampled genes are unexpressed, target 0
        assert np.array_equal(targets[:n_expressed], np.array([stored[g] for g in genes[:n_expressed]], np.float32))
        assert not set(genes[n_expressed:].tolist()) & set(stored) and not targets[n_expressed:].any()
        assert genes.min() >= 3 and genes.max() < len(tok)
        # loss weights: 1 per expressed gene, and the sampled zeros stand for every unexpressed gene, so the weights
        # sum to the vocabulary's gene count (the weighted MSE estimates the MSE over all genes without bias)
        n_genes = len(tok.gene_names)
        assert (mask[:n_expressed] == 1).all()
        np.testing.assert_allclose(mask[n_expressed:], (n_genes - n_expressed) / n_expressed, rtol=1e-6)
        assert mask.sum() == pytest.approx(n_genes, rel=1e-5)
    stored = rows_to_matrix(rows[:2], len(tok.gene_names))
    expected = tok(stored, gene_names=tok.gene_names, normalize=False, return_tensors="pt")
    assert torch.equal(batch["target_gene_ids"], expected["gene_ids"])
    assert torch.equal(batch["target_expression_values"], expected["expression_values"])


def test_stage2_decoder_sampling_is_seeded(processor, rows):
    rows = with_task(rows[:3], *["text_to_cell"] * 3)
    first, again = Stage2Collator(processor, seed=1)(rows), Stage2Collator(processor, seed=1)(rows)
    other = Stage2Collator(processor, seed=2)(rows)
    assert torch.equal(first["decoder_gene_ids"], again["decoder_gene_ids"])
    assert not torch.equal(first["decoder_gene_ids"], other["decoder_gene_ids"])


def test_stage2_decoder_targets_of_counts_are_log1p_normalised(processor):
    row = {"cell_id": "x", "text": "cell type: B cell.", "task": "text_to_cell", "gene_ids": [3, 7, 9],
           "expression": [1.0, 3.0, 6.0], "total_counts": 20.0, "value_kind": "counts"}
    collate = Stage2Collator(processor, max_decoder_genes=2)
    genes, targets, weights = collate.decoder_genes(row)
    assert genes[:2].tolist() == [9, 7]  # the top-2 expressed genes, highest first
    np.testing.assert_allclose(targets[:2], np.log1p(np.array([6.0, 3.0]) / 20.0 * 1e4), rtol=1e-6)
    assert len(genes) == 4 and not set(genes[2:].tolist()) & {3, 7, 9} and not targets[2:].any()
    n_genes = len(processor.feature_extractor.gene_names)
    assert weights[:2].tolist() == [1.0, 1.0] and weights[2:].sum() == pytest.approx(n_genes - 3)


def test_stage2_decoder_counts_are_the_cells_counts_and_size_factors_their_libraries(processor, rows, pbmc):
    # a count row: the stored counts themselves, at its stored library
    row = {"cell_id": "x", "text": "cell type: B cell.", "task": "text_to_cell", "gene_ids": [3, 7, 9],
           "expression": [1.0, 3.0, 6.0], "total_counts": 20.0, "value_kind": "counts"}
    batch = Stage2Collator(processor)([row])
    expressed = batch["decoder_targets"][0] > 0
    assert sorted(batch["decoder_counts"][0][expressed].tolist()) == [1.0, 3.0, 6.0]
    assert not batch["decoder_counts"][0][~expressed].any()
    assert batch["decoder_size_factors"][0].item() == pytest.approx(20.0 / 1e4)
    # PBMC's log-normalised rows: integer counts that normalise back to the stored values, at a library within 0.1 %
    # of the file's own n_counts; cell → text rows get size factor 1 and no counts
    batch = Stage2Collator(processor)(with_task(rows[:3], "text_to_cell", "text_to_cell", "cell_to_text"))
    for i, row in enumerate(rows[:2]):
        counts, targets = batch["decoder_counts"][i].double(), batch["decoder_targets"][i].double()
        assert torch.equal(counts, counts.round()) and (counts[targets > 0] >= 1).all()
        size_factor = batch["decoder_size_factors"][i].item()
        assert size_factor * 1e4 == pytest.approx(pbmc.obs["n_counts"][row["cell_id"]], rel=1e-3)
        torch.testing.assert_close(torch.log1p(counts / size_factor), targets, atol=2e-3, rtol=0)
    assert batch["decoder_size_factors"][2].item() == 1.0 and not batch["decoder_counts"][2].any()


def test_stage2_task_draw_is_seeded_and_mixed(processor, built):
    ds, _ = built
    collate = Stage2Collator(processor, text_to_cell_fraction=0.5, seed=0)
    kinds = [collate.kind(ds[i]) for i in range(100)]
    assert kinds == [Stage2Collator(processor, seed=0).kind(ds[i]) for i in range(100)]
    assert 30 < kinds.count("text_to_cell") < 70


def test_stage2_truncates_targets_never_prompts(processor, rows):
    batch = Stage2Collator(processor, max_length=20)(with_task(rows[:1], "cell_to_text"))
    assert batch["input_ids"].shape[1] == 20
    with pytest.raises(ValueError, match="do not fit in max_length=8"):
        Stage2Collator(processor, max_length=8)(with_task(rows[:1], "cell_to_text"))
    with pytest.raises(ValueError, match="exactly one '<cell>'"):
        Stage2Collator(processor)([{**rows[0], "task": "cell_to_text", "prompt": "no cell here"}])
    with pytest.raises(ValueError, match="must contain '<cell>'"):
        Stage2Collator(processor, cell_to_text_prompt="Describe.")


def test_stage1_writes_cell_type_texts_other_ways_from_the_ontology(built, rows, minilm_tokenizer):
    from scmmgpt_train.ontology import cell_type_text_variants

    variants = cell_type_text_variants([r["cell_type_ontology_term_id"] for r in rows])
    tail = " Tissue: blood."
    rows = [{**r, "text": r["text"] + tail} for r in rows]
    collate = Stage1Collator(built[1], minilm_tokenizer, text_variants=variants, text_variant_probability=1.0, seed=0)

    def batch_texts(collate):  # one batch's draws, seeded as the collator seeds them
        rng = np.random.default_rng(batch_seed(0, rows, b"text variants"))
        return [collate.text(r, rng) for r in rows]

    texts = batch_texts(collate)
    for row, text in zip(rows, texts):
        original, others = variants[row["cell_type_ontology_term_id"]]
        assert text.endswith(tail) and text[: -len(tail)] in others and row["text"].startswith(original)
    again = Stage1Collator(built[1], minilm_tokenizer, text_variants=variants, text_variant_probability=1.0, seed=0)
    assert batch_texts(again) == texts  # seeded by the batch
    never = Stage1Collator(built[1], minilm_tokenizer, text_variants=variants, text_variant_probability=0.0)
    assert batch_texts(never) == [r["text"] for r in rows]


def test_stage1_writes_each_cell_its_own_text_of_the_genes_it_expresses_most(built, rows, minilm_tokenizer):
    from scmmgpt_train.collators import ExpressedGenes

    ds, tok = built
    genes = ExpressedGenes.fit(ds, tok, n_genes=5)
    matrix = rows_to_matrix(list(ds), len(tok.gene_names)).toarray()  # PBMC's stored log1p(CP10k) values
    np.testing.assert_allclose(genes.mean_expression, matrix.mean(0), rtol=1e-5, atol=1e-6)
    row = rows[0]
    named = genes.genes(row)
    lift = matrix[0] - matrix.mean(0)
    expressed = np.flatnonzero(matrix[0] > 0)
    assert named == [tok.gene_names[j] for j in expressed[np.argsort(-lift[expressed], kind="stable")[:5]]]
    assert len(set(named)) == 5 and all(matrix[0, tok.gene_names.index(g)] > 0 for g in named)
    text = genes.text(row, row["text"])
    assert text == row["text"].split(". ", 1)[0] + ". Expressed genes: " + ", ".join(named) + "."
    assert ExpressedGenes.fit(iter(ds), tok, max_cells=3).mean_expression == pytest.approx(matrix[:3].mean(0))

    always = Stage1Collator(tok, minilm_tokenizer, expressed_genes=genes, expressed_genes_probability=1.0, seed=0)
    rng = np.random.default_rng(0)
    texts = [always.text(r, rng) for r in rows]
    assert texts == [genes.text(r, r["text"]) for r in rows] and len(set(texts)) == len(rows)
    never = Stage1Collator(tok, minilm_tokenizer, expressed_genes=genes, expressed_genes_probability=0.0)
    assert [never.text(r, rng) for r in rows] == [r["text"] for r in rows]
    with pytest.raises(ValueError, match="no cells"):
        ExpressedGenes.fit([], tok)


def test_stage1_names_the_gene_of_each_text_token_for_a_grounding_model(built, rows, minilm_tokenizer):
    from scmmgpt_train.collators import ExpressedGenes

    ds, tok = built
    genes = ExpressedGenes.fit(ds, tok, n_genes=4)
    options = dict(expressed_genes=genes, expressed_genes_probability=1.0, seed=0)
    plain = Stage1Collator(tok, minilm_tokenizer, **options)(rows)
    grounded = Stage1Collator(tok, minilm_tokenizer, gene_vocab=tok.vocab, **options)(rows)
    assert set(plain) == STAGE1_KEYS and set(grounded) == STAGE1_KEYS | {"qformer_gene_ids"}
    for key in STAGE1_KEYS:
        assert torch.equal(plain[key], grounded[key]), key
    ids = grounded["qformer_gene_ids"]
    assert ids.shape == grounded["qformer_input_ids"].shape and not ids[grounded["qformer_attention_mask"] == 0].any()
    for i, row in enumerate(rows):  # each text names its 4 genes; their tokens carry their vocabulary ids
        named = {tok.gene_names[j - 3] for j in ids[i][ids[i] > 0].tolist()}
        cell_type = row["text"].split(". ")[0]  # "cell type: CD4-positive ...": CD4 is a gene of the vocabulary too
        assert set(genes.genes(row)) <= named and all(g in cell_type for g in named - set(genes.genes(row)))
