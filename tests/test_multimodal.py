"""The multimodal model on tiny configs (random weights, CPU, seconds): stage-1 and stage-2 forward, placeholders,
generation with the KV cache, the jobs, save/load (also through remote code), LoRA."""

import json

import numpy as np
import pytest
import torch

from modeling_scmmgpt import (
    ScMMGPTCellConfig,
    ScMMGPTCellTokenizer,
    ScMMGPTConfig,
    ScMMGPTForConditionalGeneration,
    ScMMGPTJobs,
    ScMMGPTModel,
    ScMMGPTProcessor,
)
from modeling_scmmgpt.pipeline_scmmgpt import save_pipelines

from modeling_scmmgpt.processing_scmmgpt import ANNOTATE_PROMPT

from .conftest import run_fresh_python

TYPES = ["dendritic cell", "CD14-positive monocyte", "B cell"]  # Cell Ontology names: the jobs read their texts


def tiny_config(cell_vocab, text_vocab, text_config=None, **overrides):
    qformer = dict(model_type="bert", vocab_size=text_vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs = dict(cell_config=ScMMGPTCellConfig.tiny(vocab_size=cell_vocab), qformer_config=qformer,
                  text_vocab_size=text_vocab, **overrides)
    if text_config is not None:
        kwargs["text_config"] = {**text_config, "vocab_size": text_vocab}
    return ScMMGPTConfig.tiny(**kwargs)


@pytest.fixture(scope="module")
def processor(pbmc, minilm_tokenizer):
    import copy

    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=64, normalize=False)
    return ScMMGPTProcessor(cell_tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)


@pytest.fixture(scope="module")
def cells(pbmc):
    return pbmc[:6]


def make_generator(processor, text_config=None):
    torch.manual_seed(0)
    config = tiny_config(len(processor.feature_extractor), len(processor.tokenizer), text_config)
    model = ScMMGPTForConditionalGeneration(config)
    model.set_cell_token_ids(processor)
    return model.eval()


def describe_batch(processor, cells):
    texts = [f"<cell> Describe this cell: cell type: {t}." for t in cells.obs["bulk_labels"]]
    batch = processor(cells=cells, text=texts, cell_kwargs={"use_raw": True}, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    batch["labels"][:, : 2 + processor.num_query_tokens + 2] = -100  # the prompt: [CLS] <boc> <cell_i>… <eoc>
    batch.pop("token_type_ids", None)
    return dict(batch)


def test_stage1_forward_shapes_and_losses(processor, cells):
    torch.manual_seed(0)
    model = ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer)))
    cell_batch = processor(cells=cells, cell_kwargs={"use_raw": True}, return_tensors="pt")
    text = processor.qformer_text([f"cell type: {t}." for t in cells.obs["bulk_labels"]])
    out = model(**cell_batch, **text)
    for loss in (out.loss, out.loss_contrastive, out.loss_matching, out.loss_captioning):
        assert loss.ndim == 0 and torch.isfinite(loss)
    torch.testing.assert_close(out.loss, out.loss_contrastive + out.loss_matching + out.loss_captioning)
    assert out.cell_embeds.shape == out.text_embeds.shape == (6, 16)
    torch.testing.assert_close(out.cell_embeds.norm(dim=-1), torch.ones(6))
    out.loss.backward()
    assert model.query_tokens.grad.abs().sum() > 0 and model.cell_model.encoder.embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="outside the Q-Former's vocabulary"):
        model.get_text_features(torch.tensor([[10**6]]))


def test_stage1_captioning_max_cells_captions_the_first_cells_only(processor, cells):
    torch.manual_seed(0)
    model = ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer))).eval()
    cell_batch = processor(cells=cells, cell_kwargs={"use_raw": True}, return_tensors="pt")
    text = processor.qformer_text([f"cell type: {t}." for t in cells.obs["bulk_labels"]])
    first_two = model(**{k: v[:2] for k, v in {**cell_batch, **text}.items()}).loss_captioning
    model.config.captioning_max_cells = 2
    torch.testing.assert_close(model(**cell_batch, **text).loss_captioning, first_two)
    model.config.captioning_max_cells = 0
    out = model(**cell_batch, **text)
    assert out.loss_captioning == 0
    torch.testing.assert_close(out.loss, out.loss_contrastive + out.loss_matching)


def test_stage1_contrastive_margin_penalises_positive_pairs_only(processor, cells):
    torch.manual_seed(0)
    model = ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer))).eval()
    cell_embeds, text_embeds = torch.nn.functional.normalize(torch.randn(2, 5, 16), dim=-1)
    same = torch.eye(5, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True  # two cells of one text: both positives of each other's text
    plain, logits = model._contrastive_loss(cell_embeds, text_embeds, same)
    model.config.contrastive_margin = 0.3
    margined, margined_logits = model._contrastive_loss(cell_embeds, text_embeds, same)
    torch.testing.assert_close(margined_logits, logits)  # scoring (retrieval) sees no margin
    shifted = logits - model.contrastive_logit_scale.exp() * 0.3 * same
    targets = same.float() / same.sum(1, keepdim=True)
    expected = (torch.nn.functional.cross_entropy(shifted, targets)
                + torch.nn.functional.cross_entropy(shifted.T, targets)) / 2
    torch.testing.assert_close(margined, expected)
    assert margined > plain
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="contrastive_margin must be in"):
            tiny_config(10, 10, contrastive_margin=bad)


def test_stage1_label_negatives_join_each_cells_candidates_but_its_own_and_the_batchs(processor, cells):
    torch.manual_seed(0)
    model = ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer))).eval()
    cell_batch = processor(cells=cells, cell_kwargs={"use_raw": True}, return_tensors="pt")
    batch_texts = [f"cell type: {t}." for t in cells.obs["bulk_labels"]]
    text = processor.qformer_text(batch_texts)
    absent = ["cell type: plasmacytoid dendritic cell.", "cell type: erythrocyte."]
    negatives = processor.qformer_text([batch_texts[0], *absent])  # the first is a cell's text in the batch
    own = torch.tensor([1] + [-1] * (len(batch_texts) - 1))  # as if the first cell's label's text were the second
    torch.manual_seed(1)  # the matching loss draws its hard negatives
    plain = model(**cell_batch, **text)
    torch.manual_seed(1)
    out = model(**cell_batch, **text, negative_texts=negatives, label_text_index=own)
    torch.testing.assert_close(out.logits_per_cell, plain.logits_per_cell)  # retrieval scores are unchanged
    torch.testing.assert_close(out.loss_matching, plain.loss_matching)
    extra = model.get_text_features(**processor.qformer_text(absent))
    scale = model.contrastive_logit_scale.exp()
    same = torch.tensor([[a == b for b in batch_texts] for a in batch_texts])
    targets = same.float() / same.sum(1, keepdim=True)
    negative_logits = scale * out.cell_embeds @ extra.T
    negative_logits[0, 0] = -1e4  # the first cell's own label's text: no negative of it
    cell_to_text = torch.cat([plain.logits_per_cell, negative_logits], 1)
    expected = (torch.nn.functional.cross_entropy(cell_to_text, torch.nn.functional.pad(targets, (0, 2)))
                + torch.nn.functional.cross_entropy(plain.logits_per_cell.T, targets)) / 2
    torch.testing.assert_close(out.loss_contrastive, expected)
    assert out.loss_contrastive > plain.loss_contrastive  # more candidates to beat
    in_batch_only = processor.qformer_text(batch_texts[:2])
    torch.manual_seed(1)
    torch.testing.assert_close(model(**cell_batch, **text, negative_texts=in_batch_only).loss, plain.loss)


def test_qformer_text_names_the_gene_of_each_token(processor):
    from modeling_scmmgpt.processing_scmmgpt import qformer_text_inputs

    vocab = processor.feature_extractor.vocab
    texts = ["cell type: CD4-positive T cell. Expressed genes: MS4A1, HLA-DRA.", "a cell expressing no gene"]
    encoded = processor.qformer_text(texts, gene_ids=True)
    assert set(encoded) == {"qformer_input_ids", "qformer_attention_mask", "qformer_gene_ids"}
    plain = processor.qformer_text(texts)
    torch.testing.assert_close(encoded["qformer_input_ids"], plain["qformer_input_ids"])  # the same tokens
    tokens = processor.qformer_tokenizer.convert_ids_to_tokens(encoded["qformer_input_ids"][0])
    named = {}
    for token, gene in zip(tokens, encoded["qformer_gene_ids"][0].tolist()):
        named.setdefault(gene, []).append(token)
    inverse = {i: g for g, i in vocab.items()}
    assert {inverse[g]: "".join(t.removeprefix("##") for t in ts) for g, ts in named.items() if g} == {
        "CD4": "cd4", "MS4A1": "ms4a1", "HLA-DRA": "hla-dra"}  # "-positive" and the punctuation name no gene
    assert not encoded["qformer_gene_ids"][1].any()
    alone = qformer_text_inputs(processor.qformer_tokenizer, texts[:1], 128, vocab)
    torch.testing.assert_close(alone["qformer_gene_ids"][0], encoded["qformer_gene_ids"][0, : alone["qformer_gene_ids"].shape[1]])


def test_stage1_gene_grounding_reads_gene_names_through_the_cell_encoder(processor, cells, tmp_path):
    texts = ["cell type: B cell. Expressed genes: MS4A1, CD79A.", "cell type: B cell. Expressed genes: GNLY, NKG7."]
    encoded = processor.qformer_text(texts, gene_ids=True)
    torch.manual_seed(0)
    plain = ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer))).eval()
    assert plain.gene_text_projection is None  # off by default: gene ids change nothing
    torch.testing.assert_close(plain.get_text_features(**encoded),
                               plain.get_text_features(encoded["qformer_input_ids"], encoded["qformer_attention_mask"]))
    torch.manual_seed(0)
    model = ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer),
                                     text_gene_grounding=True))
    grounded = model.get_text_features(**encoded)
    ungrounded = model.get_text_features(encoded["qformer_input_ids"], encoded["qformer_attention_mask"])
    assert (grounded - ungrounded).abs().max() > 1e-3
    with torch.no_grad():  # the text reads the cell encoder's own gene embedding: change it, the text feature moves
        model.cell_model.encoder.embedding.weight[processor.feature_extractor.vocab["MS4A1"]] += torch.randn(32)
    moved = model.get_text_features(**encoded)
    assert (moved[0] - grounded[0]).abs().max() > 1e-3
    torch.testing.assert_close(moved[1], grounded[1])  # the second text names no MS4A1
    cell_batch = processor(cells=cells[:2], cell_kwargs={"use_raw": True}, return_tensors="pt")
    model(**cell_batch, **encoded).loss.backward()
    assert model.gene_text_projection.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path / "grounded")
    loaded = ScMMGPTModel.from_pretrained(tmp_path / "grounded").eval()
    torch.testing.assert_close(loaded.get_text_features(**encoded), model.eval().get_text_features(**encoded))
    jobs = ScMMGPTJobs(loaded, processor, verbose=False)  # retrieval reads the label texts' genes too
    scores = jobs.annotate(cells[:2], ["B", "NK"], method="retrieval", label_texts=texts, use_raw=True).scores
    features = jobs.embed(cells[:2], space="aligned", use_raw=True)
    with torch.no_grad():
        np.testing.assert_allclose(scores, features @ loaded.get_text_features(**encoded).numpy().T, atol=1e-5)


def test_stage1_attention_text_pooling_starts_as_the_mean_and_learns_which_tokens_count(processor, cells, tmp_path):
    texts = ["cell type: CD4-positive, CD25-positive, alpha-beta regulatory T cell.",
             "cell type: CD8-positive, alpha-beta cytotoxic T cell."]
    encoded = processor.qformer_text(texts)
    features = {}
    for pooling in ("mean", "attention"):
        torch.manual_seed(0)
        config = tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer), text_pooling=pooling)
        features[pooling] = ScMMGPTModel(config).eval()
    model = features["attention"]
    with torch.no_grad():  # a zero pooling direction weighs every token alike: the mean
        torch.testing.assert_close(model.get_text_features(**encoded), features["mean"].get_text_features(**encoded))
    cell_batch = processor(cells=cells[:2], cell_kwargs={"use_raw": True}, return_tensors="pt")
    model.train()(**cell_batch, **encoded).loss.backward()
    assert model.text_pooling_query.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model.text_pooling_query.normal_(std=3.0)
        pooled = model.get_text_features(**encoded)
        assert (pooled - features["mean"].get_text_features(**encoded)).abs().max() > 1e-3
        # padding takes no weight: the shorter text alone gives its padded batch feature
        alone = processor.qformer_text(texts[1:])
        assert alone["qformer_attention_mask"].shape[1] < encoded["qformer_attention_mask"].shape[1]
        torch.testing.assert_close(model.get_text_features(**alone)[0], pooled[1], atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "attention")
    loaded = ScMMGPTModel.from_pretrained(tmp_path / "attention").eval()
    torch.testing.assert_close(loaded.text_pooling_query, model.text_pooling_query)
    with pytest.raises(ValueError, match="text_pooling must be"):
        tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer), text_pooling="max")


def test_stage1_queries_summarise_the_cell_weighted_by_expression(processor, cells):
    torch.manual_seed(0)
    model = ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer))).eval()
    batch = processor(cells=cells, cell_kwargs={"use_raw": True}, return_tensors="pt")
    ids, values, mask = batch["gene_ids"], batch["expression_values"], batch["cell_attention_mask"]
    with torch.no_grad():
        states, queries = model._encode_cells(ids, values, mask)
        # a gene whose value is 0 adds nothing to the summary, whatever its state
        zeroed = values.clone()
        zeroed[:, 1] = 0.0
        moved = states.clone()
        moved[:, 1] += 10.0
        torch.testing.assert_close(model._queries(moved, ids, zeroed, mask), model._queries(states, ids, zeroed, mask))
        # a highly expressed gene pulls the summary toward its state, so queries differ from the unweighted mean
        normed = model.qformer.cell_layernorm(states)
        genes = (mask.bool() & (ids != model.config.cell_config.cls_token_id)).unsqueeze(-1).float()
        plain = model.query_tokens + model.cell_query_projection((normed * genes).sum(1) / genes.sum(1))[:, None]
        assert (queries - plain).abs().max() > 1e-3
        torch.testing.assert_close(model.query_outputs(ids, values, mask), model._read_cells(states, queries, mask))

def test_qformer_loads_bert_checkpoint(minilm_path):
    from transformers import BertConfig

    bert = BertConfig.from_pretrained(minilm_path)
    config = ScMMGPTConfig.tiny(qformer_config=bert.to_dict(), num_query_tokens=4)
    model = ScMMGPTModel(config)
    missing = model.load_qformer_from_bert(minilm_path)
    from safetensors.torch import load_file

    bert_weights = load_file(f"{minilm_path}/model.safetensors")
    key = "encoder.layer.3.attention.self.query.weight"
    torch.testing.assert_close(model.qformer.state_dict()[key], bert_weights[key.removeprefix("bert.")])
    # the queries' feed-forward starts as BERT's; cross-attention (every 2nd layer) is new
    torch.testing.assert_close(model.qformer.encoder.layer[1].output_query.dense.weight,
                               bert_weights["encoder.layer.1.output.dense.weight"])
    assert any("crossattention" in k for k in missing) and not any(".attention.self" in k for k in missing)
    assert model.qformer.encoder.layer[0].crossattention is not None and model.qformer.encoder.layer[1].crossattention is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stage2_forward_and_text_to_cell_losses(processor, cells, family):
    text_config = None if family == "llama" else {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4}
    model = make_generator(processor, text_config).train()
    batch = describe_batch(processor, cells)
    out = model(**batch)
    assert out.logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(out.loss)
    assert out.loss_cell_embed is None  # no output cell slots in a describe batch
    # text → cell: the target is the cell slot string; the target cell gives the true states and expression
    prompts = [f"Generate a cell. cell type: {t}. Cell:" + processor.cell_slot_text for t in cells.obs["bulk_labels"]]
    text = processor(text=prompts, return_tensors="pt")
    labels = text["input_ids"].masked_fill(text["attention_mask"] == 0, -100)
    boc = (text["input_ids"] == processor.boc_token_id).int().argmax(1)
    labels[torch.arange(labels.shape[1])[None] < boc[:, None]] = -100  # the target starts at <boc>
    target = processor(cells=cells, cell_kwargs={"use_raw": True}, return_tensors="pt")
    out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], labels=labels,
                target_gene_ids=target["gene_ids"], target_expression_values=target["expression_values"],
                target_cell_attention_mask=target["cell_attention_mask"], decoder_gene_ids=target["gene_ids"],
                decoder_targets=target["expression_values"].clamp(min=0), decoder_mask=target["cell_attention_mask"])
    assert out.cell_states.shape == (6, 4, 32) and out.expression.shape == target["gene_ids"].shape
    expected = out.loss_lm + out.loss_cell_embed + out.loss_expression  # weights 1
    torch.testing.assert_close(out.loss, expected)
    # the head's own output: the same parts, weighted by the config
    model.config.cell_embed_loss_weight, model.config.expression_loss_weight = 2.0, 0.5
    slot_states = torch.randn(6, 4, model.config.text_config.hidden_size)
    head = model.text_to_cell_loss(slot_states, (target["gene_ids"], target["expression_values"],
                                                 target["cell_attention_mask"]))
    assert head.expression is None and head.loss_expression is None
    torch.testing.assert_close(head.loss, 2.0 * head.loss_cell_embed)
    model.config.cell_embed_loss_weight = model.config.expression_loss_weight = 1.0
    out.loss.backward()
    assert model.expression_decoder.gene_embedding.weight.grad.abs().sum() > 0
    assert model.text_to_cell_projector[0].weight.grad.abs().sum() > 0


def test_placeholder_count_mismatch_raises(processor, cells):
    model = make_generator(processor)
    batch = describe_batch(processor, cells[:2])
    batch["input_ids"][0, 2] = processor.tokenizer.convert_tokens_to_ids("[unused1]")  # one slot lost
    with pytest.raises(ValueError, match="cell slot tokens but"):
        model(**batch)


def test_generate_same_with_and_without_cache_and_cells_encoded_once(processor, cells):
    model = make_generator(processor)
    text = processor(cells=cells[:3], text=["<cell> Describe this cell:"] * 3, cell_kwargs={"use_raw": True},
                     return_tensors="pt")
    text.pop("token_type_ids", None)
    calls = []
    hook = model.scmmgpt.cell_model.register_forward_hook(lambda *_: calls.append(1))
    cached = model.generate(**text, max_new_tokens=8, do_sample=False, use_cache=True, min_new_tokens=8)
    n_cached_calls = len(calls)
    uncached = model.generate(**text, max_new_tokens=8, do_sample=False, use_cache=False, min_new_tokens=8)
    hook.remove()
    assert torch.equal(cached, uncached) and cached.shape[1] == text["input_ids"].shape[1] + 8
    assert n_cached_calls == 1  # cells encoded in the prefill only
    assert len(calls) - n_cached_calls == 8  # without a cache every step re-reads the prompt, cells included


def test_described_text_never_holds_cell_slots(processor, cells):
    """A model whose LM head scores only two cell slot tokens (one of them positively at every step): describing must
    neither emit a slot nor, without a cache, read an emitted one as an extra cell placeholder."""
    model = make_generator(processor)
    head = model.get_output_embeddings().weight
    direction = torch.randn(head.shape[1])
    with torch.no_grad():
        head.zero_()
        head[model.config.cell_token_ids[1]], head[model.config.cell_token_ids[2]] = direction, -direction
    jobs = ScMMGPTJobs(model, processor, verbose=False)
    for use_cache in (True, False):
        texts = jobs.describe(cells[:2], max_new_tokens=4, use_raw=True, generate_kwargs={"use_cache": use_cache})
        assert len(texts) == 2
    batch = {k: v for k, v in processor(cells=cells[:2], text=["<cell> Describe this cell:"] * 2,
                                        cell_kwargs={"use_raw": True}, return_tensors="pt").items()
             if k != "token_type_ids"}
    free = model.generate(**batch, max_new_tokens=1, do_sample=False, use_cache=True, suppress_tokens=[])
    assert set(free[:, -1].tolist()) <= set(model.config.cell_token_ids)  # unsuppressed: a slot wins
    # the model's generation config suppresses them for any generate call, cached or not
    for use_cache in (True, False):
        out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False, use_cache=use_cache)
        assert not set(out[:, batch["input_ids"].shape[1]:].flatten().tolist()) & set(model.config.cell_token_ids)


def test_jobs_run_end_to_end(processor, cells):
    model = make_generator(processor)
    jobs = ScMMGPTJobs(model, processor, verbose=False)
    kw = {"use_raw": True}
    for method in ("retrieval", "likelihood", "generate"):
        result = jobs.annotate(cells, TYPES, method=method, **kw)
        assert len(result.predictions) == 6 and result.scores.shape == (6, 3) and set(result.predictions) <= set(TYPES)
    # likelihood scores equal a direct per-label computation through forward
    scores = jobs.annotate(cells[:1], TYPES, method="likelihood", **kw).scores[0]
    manual = []
    for label in TYPES:
        prompt = processor(cells=cells[:1], text=[ANNOTATE_PROMPT], cell_kwargs=kw, return_tensors="pt")
        n_prompt = prompt["input_ids"].shape[1]
        ids = processor.tokenizer(" " + label, add_special_tokens=False, return_tensors="pt")["input_ids"]
        full = torch.cat([prompt["input_ids"], ids], 1)
        with torch.no_grad():
            logits = model(input_ids=full, gene_ids=prompt["gene_ids"], expression_values=prompt["expression_values"],
                           cell_attention_mask=prompt["cell_attention_mask"]).logits
        logp = torch.log_softmax(logits[0, n_prompt - 1 : -1], -1).gather(-1, ids[0, :, None]).mean()
        manual.append(float(logp))
    np.testing.assert_allclose(scores, manual, atol=1e-4)
    texts = jobs.describe(cells[:2], max_new_tokens=4, **kw)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    generated = jobs.generate_cells(["cell type: monocyte.", "cell type: B cell."], n_per_text=3, seed=0)
    assert generated.expression.shape == (6, len(processor.feature_extractor.gene_names))
    assert (generated.expression >= 0).all()
    again = jobs.generate_cells(["cell type: monocyte.", "cell type: B cell."], n_per_text=3, seed=0)
    np.testing.assert_array_equal(generated.expression, again.expression)
    assert not np.allclose(generated.expression[0], generated.expression[1])  # draws differ
    assert jobs.embed(cells, **kw).shape == (6, 32) and jobs.embed(cells, space="aligned", **kw).shape == (6, 16)
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        jobs.generate_cells("x", genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match="duplicates"):
        jobs.annotate(cells, ["a", "a"])


def test_save_load_round_trip_with_llm_and_remote_code(processor, cells, tmp_path):
    model = make_generator(processor)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipelines(folder)
    auto_map = json.loads((folder / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "modeling_scmmgpt.ScMMGPTForConditionalGeneration"
    expected = ScMMGPTJobs(model, processor, verbose=False).annotate(cells, TYPES, method="likelihood",
                                                                     use_raw=True).scores
    loaded = ScMMGPTJobs.from_pretrained(folder, verbose=False)
    np.testing.assert_allclose(loaded.annotate(cells, TYPES, method="likelihood", use_raw=True).scores, expected,
                               atol=1e-5)
    np.save(tmp_path / "expected.npy", expected)
    out = run_fresh_python(
        f"""
        import anndata, numpy as np, scanpy, os
        from transformers import AutoModelForCausalLM, pipeline
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules")
        adata = anndata.read_h5ad(os.path.join(os.path.dirname(scanpy.__file__), "datasets", "10x_pbmc68k_reduced.h5ad"))
        annotate = pipeline("cell-annotation", model={str(folder)!r}, trust_remote_code=True)
        out = annotate(adata[:6], labels={TYPES!r}, method="likelihood", use_raw=True, top_k=3)
        scores = np.array([[dict((t["label"], t["score"]) for t in o["top_labels"])[l] for l in {TYPES!r}] for o in out])
        print("maxdiff", np.abs(scores - np.load({str(tmp_path / "expected.npy")!r})).max())
        """,
        cwd=str(tmp_path),
    )
    assert float(out.split("maxdiff")[-1]) < 1e-5


def test_lora_trains_only_adapters_and_projectors(processor, cells):
    from peft import LoraConfig, get_peft_model

    model = make_generator(processor).train()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=r"language_model\..*\.(q_proj|v_proj)",
                        modules_to_save=["cell_to_text_projector", "text_to_cell_projector", "expression_decoder"])
    peft_model = get_peft_model(model, config)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**describe_batch(processor, cells)).loss.backward()
    optimizer.step()
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert any("lora_B" in n for n in changed) and any("cell_to_text_projector" in n for n in changed)
    assert changed <= trainable


def test_trainer_scales_the_loss_for_gradient_accumulation(processor, tmp_path):
    """The models' losses are batch means: with gradient accumulation Trainer must divide them itself."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=4, report_to=[], use_cpu=True)
    for model in (make_generator(processor),
                  ScMMGPTModel(tiny_config(len(processor.feature_extractor), len(processor.qformer_tokenizer)))):
        assert Trainer(model=model, args=args).model_accepts_loss_kwargs is False
