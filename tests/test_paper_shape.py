"""The paper's shapes: the `paper` preset (and `paper.yaml`, built through it) has the published sizes, counted on the
meta device (no weights, no download) against formulas written out here; and the paper-shape benchmark runs on CPU.

Published sizes: scGPT whole-human encoder (60,697-token gene vocabulary, d_model 512, 12 layers, 8 heads, d_hid 512),
BERT-base (110 M parameters) as the Q-Former with 32 queries cross-attending every 2nd layer, Llama-2-7B (6.74 B), and
LoRA r 8 on Llama-2-7B's q / v projections: 4,194,304 trainable parameters (PEFT's own figure).
"""

import json
import re
from pathlib import Path

import pytest
import torch

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellTokenizer, ScMMGPTConfig, ScMMGPTModel
from modeling_scmmgpt import ScMMGPTForConditionalGeneration

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "train" / "configs" / "paper.yaml"
TINY = ROOT / "train" / "configs" / "tiny-cpu.yaml"
SCGPT_HUMAN_VOCAB = 60_697
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------------------------------- formulas
def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def norm(width: int) -> int:
    return 2 * width  # LayerNorm: weight and bias


def cell_encoder_params(c) -> int:
    """scGPT's encoder: gene embedding + LayerNorm, the continuous value MLP (1 → d → d) + LayerNorm, post-norm layers
    with a fused QKV projection and a d → d_hid → d feed-forward."""
    d, ff = c.hidden_size, c.intermediate_size
    layer = linear(d, 3 * d) + linear(d, d) + linear(d, ff) + linear(ff, d) + 2 * norm(d)
    return c.vocab_size * d + norm(d) + linear(1, d) + linear(d, d) + norm(d) + c.num_hidden_layers * layer


def bert_params(b, pooler: bool = True) -> int:
    """BertModel: word + position + token type embeddings, LayerNorm; per layer Q/K/V/output, LayerNorm, feed-forward,
    LayerNorm; the pooler."""
    h, ff = b.hidden_size, b.intermediate_size
    embeddings = (b.vocab_size + b.max_position_embeddings + b.type_vocab_size) * h + norm(h)
    layer = 4 * linear(h, h) + norm(h) + linear(h, ff) + linear(ff, h) + norm(h)
    return embeddings + b.num_hidden_layers * layer + (linear(h, h) if pooler else 0)


def stage1_params(config) -> int:
    """ScMMGPTModel: the cell encoder; the Q-Former = BERT without pooler + cross-attention to the gene states in
    every f-th layer + the queries' own feed-forward in every layer + the captioning head (transform, LayerNorm,
    vocabulary bias; its matrix is the word embeddings); the query tokens, the projection of the cell summary into
    them, the gene states' LayerNorm, the two contrastive projections, the matching head and the logit scale; with
    `text_gene_grounding`, the projection of the cell encoder's gene embeddings into the Q-Former's text embeddings."""
    b, c = config.qformer_config, config.cell_config.hidden_size
    h, ff, layers = b.hidden_size, b.intermediate_size, b.num_hidden_layers
    cross_layers = len(range(0, layers, config.cross_attention_frequency))
    cross = linear(h, h) + 2 * linear(c, h) + linear(h, h) + norm(h)
    query_feed_forward = linear(h, ff) + linear(ff, h) + norm(h)
    captioning_head = linear(h, h) + norm(h) + b.vocab_size
    heads = (config.num_query_tokens * h + linear(c, h) + norm(c) + 2 * linear(h, config.embed_dim) + linear(h, 2)
             + 1 + (linear(c, h) if config.text_gene_grounding else 0))
    return (cell_encoder_params(config.cell_config) + bert_params(b, pooler=False) + cross_layers * cross
            + layers * query_feed_forward + captioning_head + heads)


def _llama_widths(t) -> tuple[int, int, int]:
    return t.hidden_size, t.num_key_value_heads * (t.hidden_size // t.num_attention_heads), t.intermediate_size


def llama_params(t) -> int:
    """LlamaForCausalLM: embeddings + layers × (Q, K, V, O + gate, up, down + 2 RMSNorms) + final norm + LM head."""
    d, kv, ff = _llama_widths(t)
    layer = 2 * linear(d, d, False) + 2 * linear(d, kv, False) + 3 * linear(d, ff, False) + 2 * d
    return t.vocab_size * d + t.num_hidden_layers * layer + d + t.vocab_size * d


def lora_params(t, modules, r: int) -> int:
    """LoRA of rank r on each named projection of every layer: A (r × in) + B (out × r)."""
    d, kv, ff = _llama_widths(t)
    shapes = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d), "gate_proj": (d, ff),
              "up_proj": (d, ff), "down_proj": (ff, d)}
    return t.num_hidden_layers * sum(r * (n_in + n_out) for n_in, n_out in (shapes[m] for m in modules))


def projector_and_decoder_params(config) -> int:
    """Cell → text and text → cell MLPs (hidden p), and the expression decoder: gene embedding (width w), multi-head
    cross-attention of the genes to the cell state (Q w×w, K and V w×h, in-projection biases, output projection),
    MLP on [context, gene, context · gene] (3w → w → 1)."""
    h, d = config.qformer_config.hidden_size, config.text_config.hidden_size
    p, w = config.projector_hidden_size, config.expression_decoder_hidden_size
    projectors = linear(h, p) + linear(p, d) + linear(d, p) + linear(p, h)
    attention = w * w + 2 * w * h + 3 * w + linear(w, w)
    return projectors + config.cell_config.vocab_size * w + attention + linear(3 * w, w) + linear(w, 1)


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def trainable(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ---------------------------------------------------------------------------------------------------- the preset
@pytest.fixture(scope="module")
def paper_model():
    with torch.device("meta"):
        return ScMMGPTForConditionalGeneration(ScMMGPTConfig.paper())


def test_paper_preset_has_the_published_shapes_and_parameter_counts(paper_model):
    from transformers import BertConfig, BertModel

    config = paper_model.config
    cell, bert, llm = config.cell_config, config.qformer_config, config.text_config
    assert next(paper_model.parameters()).device.type == "meta"
    assert (cell.vocab_size, cell.d_model, cell.nlayers, cell.nhead, cell.intermediate_size, cell.max_genes,
            cell.input_value_mode) == (SCGPT_HUMAN_VOCAB, 512, 12, 8, 512, 2048, "continuous")
    assert (bert.vocab_size, bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads,
            bert.intermediate_size) == (30522, 768, 12, 12, 3072)
    assert (config.num_query_tokens, config.cross_attention_frequency) == (32, 2)
    assert (llm.vocab_size, llm.hidden_size, llm.num_hidden_layers, llm.num_attention_heads, llm.num_key_value_heads,
            llm.intermediate_size) == (32000, 4096, 32, 32, 32, 11008)

    # the BERT formula against transformers' own BertModel, then BERT-base's published 110 M
    with torch.device("meta"):
        assert count(BertModel(BertConfig())) == bert_params(BertConfig())
    assert round(bert_params(bert) / 1e6, -1) == 110
    layers = paper_model.scmmgpt.qformer.encoder.layer
    assert [i for i, layer in enumerate(layers) if layer.crossattention is not None] == [0, 2, 4, 6, 8, 10]

    assert count(paper_model.scmmgpt.cell_model) == cell_encoder_params(cell)
    assert count(paper_model.scmmgpt) == stage1_params(config)
    assert count(paper_model.language_model) == llama_params(llm)
    assert round(llama_params(llm) / 1e9, 2) == 6.74  # Llama-2-7B
    assert count(paper_model) == stage1_params(config) + projector_and_decoder_params(config) + llama_params(llm)
    print(f"paper shape: cell encoder {cell_encoder_params(cell) / 1e6:.2f} M, stage 1 {stage1_params(config) / 1e6:.2f}"
          f" M, LLM {llama_params(llm) / 1e9:.3f} B, total {count(paper_model) / 1e9:.3f} B")


def test_stage2_lora_trains_the_adapters_projectors_and_decoder_only(paper_model):
    """Stage 2's own tuning (`apply_tuning` with its defaults: LoRA r 8 on the LLM's attention and MLP projections,
    projectors and decoder in full) wrapped by PEFT as SFTTrainer does; and r 8 on q / v alone gives PEFT's
    published 4,194,304 for Llama-2-7B."""
    import copy

    from peft import get_peft_model

    from scmmgpt_train.stage2 import LLM_LORA_TARGETS, Stage2Arguments, apply_tuning

    llm = paper_model.config.text_config
    assert lora_params(llm, ("q_proj", "v_proj"), 8) == 4_194_304
    assert lora_params(llm, ("q_proj", "k_proj", "v_proj", "o_proj"), 8) == 8_388_608
    args = Stage2Arguments()
    assert (args.tuning, args.lora_r, args.lora_alpha, args.train_expression_decoder) == ("lora", 8, 32, True)
    targeted = {name.rsplit(".", 1)[-1] for name, _ in paper_model.named_modules()
                if name.startswith("language_model.") and re.fullmatch(LLM_LORA_TARGETS, name)}
    assert targeted == set(LLAMA_PROJECTIONS)

    with torch.device("meta"):
        model = copy.deepcopy(paper_model)
    model, lora = apply_tuning(model, args)
    peft_model = get_peft_model(model, lora)
    expected = lora_params(llm, LLAMA_PROJECTIONS, 8) + projector_and_decoder_params(paper_model.config)
    assert trainable(peft_model) == expected
    print(f"stage 2 trainable: LoRA {lora_params(llm, LLAMA_PROJECTIONS, 8) / 1e6:.2f} M + projectors and decoder "
          f"{projector_and_decoder_params(paper_model.config) / 1e6:.2f} M = {expected / 1e6:.2f} M")


# ---------------------------------------------------------------------------------------------------- the configs
def _model_section_config(path, cell_tokenizer, text_tokenizer, tmp_path, overrides=None):
    from scmmgpt_train.config import STAGES, load_config
    from scmmgpt_train.stage1 import stage1_config
    from scmmgpt_train.stages import stage1_model_arguments

    overrides = {**({} if torch.cuda.is_available() else {f"{s}.use_cpu": True for s in STAGES}), **(overrides or {})}
    parsed = load_config(path, output_dir=str(tmp_path / "run"), overrides=overrides)
    arguments = stage1_model_arguments(parsed.model, cell_tokenizer, parsed.stage1[1].captioning_max_cells)
    return parsed, stage1_config(cell_tokenizer, text_tokenizer, **arguments)


@pytest.fixture
def text_tokenizer(minilm_path):
    """The Q-Former's tokenizer as a training run loads it (the session's `minilm_tokenizer` may carry tokens other
    tests' processors added to it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path)


def test_paper_yaml_builds_through_the_paper_preset(tmp_path, text_tokenizer, monkeypatch):
    """paper.yaml's model section, with its PubMedBERT Hub id replaced by a local BERT-base config (PubMedBERT's
    shape; nothing is downloaded) and scGPT's 60,697-token vocabulary, builds the paper preset's stage-1 model; the
    tiny presets are never called on the way."""
    from transformers import BertConfig

    def refuse(*args, **kwargs):
        raise AssertionError("the paper path called a tiny preset")

    monkeypatch.setattr(ScMMGPTConfig, "tiny", classmethod(refuse))
    monkeypatch.setattr(ScMMGPTCellConfig, "tiny", classmethod(refuse))
    BertConfig(vocab_size=30522).save_pretrained(tmp_path / "pubmedbert")
    genes = [f"GENE{i}" for i in range(SCGPT_HUMAN_VOCAB - 3)]  # <pad>, <cls>, <eoc> come on top
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=genes, max_genes=2048)
    parsed, config = _model_section_config(PAPER, cell_tokenizer, text_tokenizer, tmp_path,
                                           {"model.qformer_path": str(tmp_path / "pubmedbert")})
    assert parsed.model.preset == "paper" and parsed.data.max_genes == cell_tokenizer.max_genes
    assert len(cell_tokenizer) == SCGPT_HUMAN_VOCAB

    reference = ScMMGPTConfig.paper()  # the preset itself
    for part in ("cell_config", "qformer_config", "text_config"):
        mine, theirs = getattr(config, part).to_dict(), getattr(reference, part).to_dict()
        differing = {k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k)}
        assert differing <= {"_name_or_path", "transformers_version", "architectures"}, (part, differing)
    for field in ("num_query_tokens", "cross_attention_frequency", "embed_dim", "projector_hidden_size",
                  "expression_decoder_hidden_size", "max_text_length"):
        assert getattr(config, field) == getattr(reference, field), field
    with torch.device("meta"):
        model = ScMMGPTModel(config)
    assert count(model) == stage1_params(config)


def test_tiny_cpu_config_keeps_building_the_tiny_preset(tmp_path, pbmc, text_tokenizer):
    """tiny-cpu.yaml names no preset: its `cell_preset: tiny` picks the tiny one, with its 64-wide Q-Former."""
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=256)
    parsed, config = _model_section_config(TINY, cell_tokenizer, text_tokenizer, tmp_path)
    assert parsed.model.preset == "tiny"
    assert config.text_config.to_dict() == ScMMGPTConfig.tiny().text_config.to_dict()
    q, c = config.qformer_config, config.cell_config
    assert (q.hidden_size, q.num_hidden_layers, q.intermediate_size, q.vocab_size) == (64, 2, 128, 30522)
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size, c.max_genes) == (64, 2, len(cell_tokenizer), 256)
    with torch.device("meta"):
        assert count(ScMMGPTModel(config)) == stage1_params(config)


def test_presets_are_checked():
    from scmmgpt_train.config import ModelArguments

    assert ModelArguments().preset == "paper" and ModelArguments(cell_preset="tiny").preset == "tiny"
    assert ModelArguments(preset="tiny", cell_preset="scgpt_human").preset == "tiny"
    with pytest.raises(ValueError, match="model preset"):
        ModelArguments(preset="huge")
    with pytest.raises(ValueError, match="cell_preset"):
        ModelArguments(cell_preset="scgpt_mouse")
    with pytest.raises(ValueError, match="unknown model preset"):
        ScMMGPTConfig.from_preset("huge")


# ---------------------------------------------------------------------------------------------------- the benchmark
def test_paper_shape_benchmark_runs_on_cpu(tmp_path, capsys):
    """The CPU mode of benchmarks/bench_paper_shape.py at its smallest: every row measured (QLoRA skipped, saying
    why), written as JSON and printed as a table."""
    from benchmarks.bench_paper_shape import main

    out = tmp_path / "paper_shape.json"
    result = main(["--device", "cpu", "--llm", "tiny", "--cell-side", "tiny", "--genes", "16", "--cells", "2",
                   "--new-tokens", "2", "--peak-n", "256", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["rows"] == result["rows"]
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["stage1", "stage2_lora", "embed", "annotate_retrieval", "describe", "generate_cells",
                          "stage2_qlora"]
    assert rows.pop("stage2_qlora")["status"].startswith("skipped: bitsandbytes 4-bit needs CUDA")
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row["status"])
        assert row["batch"] == 2 and f"| {name} | 2 |" in printed
        for figure in ("seconds", "cells_per_s", "tokens_per_s", "peak_memory_mb", "tflop_per_step", "mfu"):
            assert row[figure] > 0, (name, figure)
    # stage 2 trains the LoRA adapters, projectors and decoder of a bigger model; stage 1 trains everything
    assert rows["stage1"]["trainable_params_m"] == rows["stage1"]["parameters_m"]
    assert 0 < rows["stage2_lora"]["trainable_params_m"] < rows["stage2_lora"]["parameters_m"]
    assert rows["stage1"]["tokens_per_s"] == pytest.approx(rows["stage1"]["cells_per_s"] * 17, rel=1e-3)
    assert rows["describe"]["tokens_per_s"] == pytest.approx(rows["describe"]["cells_per_s"] * 2, rel=1e-3)
    assert result["settings"]["steps"] == 1 and "measured fp32" in result["peak_source"]
