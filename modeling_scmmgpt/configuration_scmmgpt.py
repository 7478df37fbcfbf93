"""Configurations of scMMGPT: the cell encoder (`ScMMGPTCellConfig`) and the full model (`ScMMGPTConfig`).

The full config composes three sub-configs, in the style of BLIP-2 / LLaVA:
`cell_config` (scGPT-style cell encoder), `qformer_config` (any BERT config; cross-attention is added by the model)
and `text_config` (any causal LM config, resolved through `AutoConfig`).
"""

from typing import Literal

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec


class ScMMGPTCellConfig(PreTrainedConfig):
    r"""
    Configuration of the scGPT-compatible cell encoder.

    A cell is a sequence of gene tokens: `<cls>` followed by up to `max_genes` (gene id, expression value) pairs.
    Each token's input is `gene_embedding(gene_id) + value_encoder(expression_value)`; the output at `<cls>` is the
    cell embedding.

    Args:
        vocab_size: number of gene tokens, special tokens included (`len(ScMMGPTCellTokenizer)`).
        hidden_size: model width (scGPT's `d_model`).
        num_hidden_layers, num_attention_heads: transformer depth and heads (scGPT's `nlayers`, `nhead`).
        intermediate_size: feed-forward width (scGPT's `d_hid`).
        input_value_mode: `"continuous"` (MLP on the log1p value, scGPT whole-human) or `"binned"` (embedding of
            per-cell quantile bins `0..n_bins-1`).
        n_bins: number of value bins (bin 0 is "not expressed").
        max_value: continuous values are clamped to this before the value MLP (as in scGPT).
        max_genes: the most gene tokens per cell (the `<cls>` token comes on top).
        pad_token_id, cls_token_id: ids of `<pad>` and `<cls>` in the gene vocabulary.
        pad_value: the expression value written at padded positions.
        mask_ratio: stage 0 (`ScMMGPTCellForMaskedValuePrediction`): share of each cell's gene tokens whose value is
            hidden (scGPT's pre-training default 0.4).
        mask_value: stage 0: the value written at hidden tokens (scGPT's -1 for continuous inputs; apart from the
            pad value and from real values, which are >= 0).
        classifier_pooling: `ScMMGPTCellForClassification`'s head input: `"cls"` (the cell embedding), `"mean"` (mean
            gene state) or `"expression_mean"` (expression-weighted mean of the gene token inputs).
        classifier_dropout: dropout before the classification head.
    """

    model_type = "scmmgpt_cell"
    attribute_map = {"d_model": "hidden_size", "nlayers": "num_hidden_layers", "nhead": "num_attention_heads"}

    vocab_size: int = 60697
    hidden_size: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    intermediate_size: int = 512
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.2
    attention_probs_dropout_prob: float = 0.2
    layer_norm_eps: float = 1e-5
    input_value_mode: Literal["continuous", "binned"] = "continuous"
    n_bins: int = 51
    max_value: float = 512.0
    max_genes: int = 2048
    pad_token_id: int | None = 0
    cls_token_id: int = 1
    pad_value: float = -2.0
    mask_ratio: float = 0.4
    mask_value: float = -1.0
    classifier_pooling: Literal["cls", "mean", "expression_mean"] = "cls"
    classifier_dropout: float = 0.1
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads ({self.num_attention_heads})"
            )
        if self.input_value_mode not in ("continuous", "binned"):
            raise ValueError(f"input_value_mode must be 'continuous' or 'binned', got {self.input_value_mode!r}")

    @classmethod
    def tiny(cls, **overrides) -> "ScMMGPTCellConfig":
        """A test-size encoder (seconds on a CPU)."""
        defaults = dict(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_genes=256,
        )
        return cls(**{**defaults, **overrides})

    @classmethod
    def scgpt_human(cls, **overrides) -> "ScMMGPTCellConfig":
        """The shape of scGPT's whole-human checkpoint (33 M cells): d_model 512, 12 layers, 8 heads, continuous values."""
        return cls(**overrides)


def check_contrastive_margin(margin: float) -> None:
    """Raise a ValueError unless `margin` is a usable contrastive margin (cosine units: CosFace uses 0.1-0.5)."""
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"contrastive_margin must be in [0, 1), got {margin}")


class ScMMGPTConfig(PreTrainedConfig):
    r"""
    Configuration of the full scMMGPT model.

    Args:
        cell_config: the cell encoder (`ScMMGPTCellConfig` or its dict).
        qformer_config: a BERT config for the Q-Former; its `encoder_hidden_size` is set to the cell encoder's width.
        text_config: the causal LM's config (any `AutoConfig` model type; Llama by default).
        num_query_tokens: learned queries of the Q-Former, i.e. soft cell tokens handed to the LLM.
        cross_attention_frequency: the Q-Former cross-attends to gene states every this many layers.
        embed_dim: width of the shared cell–text space of the contrastive / matching heads.
        projector_hidden_size: hidden width of the cell→text and text→cell MLP projectors.
        expression_decoder_hidden_size: width of the expression decoder.
        expression_distribution: what the expression decoder predicts per gene (`modeling_expression_decoder`):
            `"mse"` log1p expression trained by MSE (the paper's; folders saved without the field), `"nb"` a negative
            binomial of counts (mean and inverse dispersion) or `"zinb"` a zero-inflated one, trained by their
            likelihood on counts: `generate_cells` then draws cells rather than decoding one point per text.
        library_size_quantiles: the 101 quantiles (0 %, 1 %, …, 100 %) of the training cells' library sizes, saved by
            stage 2 for a count decoder: `generate_cells` draws the library size of sampled cells from them.
        cell_state_spread_anchors, cell_state_spread_cells, cell_state_spread_rank: size of the cell-state spread
            stage 2 fits on the training cells (`modeling_expression_decoder.CellStateSpread`): texts kept as anchors,
            residuals kept in the bank, and principal directions they are stored in.
        contrastive_temperature: initial softmax temperature of the contrastive loss (learned); named apart from
            generation's sampling `temperature` (folders saved with the old name `temperature` load into it).
        contrastive_margin: additive cosine margin subtracted from each positive pair's similarity in the contrastive
            loss (CosFace's): a cell must be closer to its own text than to any other by this much before the loss
            lets go (0: plain InfoNCE). Scoring (retrieval) is unchanged.
        text_gene_grounding: gene symbols of the cell vocabulary named in a text (`"... Expressed genes: MS4A1,
            CD79A"`, `"CD14-positive"`) add a projection of the cell encoder's embedding of that gene to their text
            tokens, so the text side reads a gene's name through the gene the cell side knows, including genes no
            training text named (in text features: retrieval and the contrastive loss; matching and captioning read
            the text's tokens alone).
        text_pooling: how a text's Q-Former outputs become one feature: `"mean"` over its tokens, or `"attention"`,
            weights learned per token state (a softmax of one learned direction; it starts as the mean), so the few
            words that tell close definitions apart (CD4 / CD8, CD25, naive / memory) can outweigh the shared rest.
        max_text_length: longest text the Q-Former reads (stage 1).
        captioning_max_cells: stage 1 captions only the first this many cells of each batch (None: all; 0: no
            captioning loss), a compute budget for small models whose step is dominated by the BERT-vocabulary LM head.
        cell_embed_loss_weight, expression_loss_weight: weights of the stage-2 text→cell losses.
        boc_token_id, eoc_token_id, cell_token_ids: ids of `<boc>`, `<eoc>` and `<cell_0>…` in the text tokenizer,
            filled in by `ScMMGPTProcessor` / the model when the special tokens are added.
    """

    model_type = "scmmgpt"
    sub_configs_defaults = {
        "cell_config": ScMMGPTCellConfig,
        "qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="bert"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    cell_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    cross_attention_frequency: int = 2
    embed_dim: int = 256
    projector_hidden_size: int = 256
    expression_decoder_hidden_size: int = 256
    expression_distribution: Literal["mse", "nb", "zinb"] = "mse"
    library_size_quantiles: list[float] | None = None
    cell_state_spread_anchors: int = 256
    cell_state_spread_cells: int = 2048
    cell_state_spread_rank: int = 32
    contrastive_temperature: float = 0.07
    contrastive_margin: float = 0.0
    text_gene_grounding: bool = False
    text_pooling: Literal["mean", "attention"] = "mean"
    max_text_length: int = 128
    captioning_max_cells: int | None = None
    cell_embed_loss_weight: float = 1.0
    expression_loss_weight: float = 1.0
    boc_token_id: int | None = None
    eoc_token_id: int | None = None
    cell_token_ids: list[int] | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if "temperature" in kwargs:  # the contrastive temperature's old name, in folders saved before the rename
            self.contrastive_temperature = kwargs.pop("temperature")
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.cell_config.hidden_size
        if self.cross_attention_frequency < 1:
            raise ValueError(f"cross_attention_frequency must be >= 1, got {self.cross_attention_frequency}")
        check_contrastive_margin(self.contrastive_margin)
        if self.text_pooling not in ("mean", "attention"):
            raise ValueError(f"text_pooling must be 'mean' or 'attention', got {self.text_pooling!r}")
        if self.expression_distribution not in ("mse", "nb", "zinb"):
            raise ValueError(f"expression_distribution must be 'mse', 'nb' or 'zinb', got "
                             f"{self.expression_distribution!r}")

    @classmethod
    def tiny(cls, **overrides) -> "ScMMGPTConfig":
        """A test-size full model: tiny encoder, 2-layer BERT Q-Former with 4 queries, 2-layer Llama."""
        text_vocab = overrides.pop("text_vocab_size", 1000)
        defaults = dict(
            cell_config=ScMMGPTCellConfig.tiny(),
            qformer_config=dict(
                model_type="bert", vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                max_position_embeddings=160,
            ),
            text_config=dict(
                model_type="llama", vocab_size=text_vocab, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
            ),
            num_query_tokens=4,
            embed_dim=16,
            projector_hidden_size=32,
            expression_decoder_hidden_size=32,
            max_text_length=64,
        )
        return cls(**{**defaults, **overrides})

    @classmethod
    def paper(cls, text_config=None, qformer_config=None, **overrides) -> "ScMMGPTConfig":
        """The published shape: scGPT whole-human encoder (60,697 gene tokens, d_model 512, 12 layers, 8 heads, 2048
        genes per cell), a BERT-base Q-Former (PubMedBERT's shape: 30,522-token vocabulary, 768 wide, 12 layers) with 32
        queries cross-attending every 2nd layer, and Llama-2-7B (`meta-llama/Llama-2-7b-hf`'s config, 6.74 B
        parameters); projectors and expression decoder 256 wide."""
        defaults = dict(
            cell_config=ScMMGPTCellConfig.scgpt_human(max_genes=2048),
            qformer_config=qformer_config or dict(model_type="bert", vocab_size=30522),  # BertConfig's defaults: base
            text_config=text_config
            or dict(
                model_type="llama", vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008, max_position_embeddings=4096,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
            ),
            num_query_tokens=32,
            cross_attention_frequency=2,
        )
        return cls(**{**defaults, **overrides})

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> "ScMMGPTConfig":
        """`ScMMGPTConfig.<preset>(**overrides)`, `preset` one of `PRESETS` (a training config's `model.preset`)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; known: {list(PRESETS)}")
        return getattr(cls, preset)(**overrides)


PRESETS = ("tiny", "paper")  # the classmethods of ScMMGPTConfig that build a whole model's shape

__all__ = ["PRESETS", "ScMMGPTCellConfig", "ScMMGPTConfig", "check_contrastive_margin"]
