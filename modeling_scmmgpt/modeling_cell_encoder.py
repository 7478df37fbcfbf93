"""The scGPT-compatible cell encoder: gene embedding + value encoder + transformer encoder + `<cls>` pooling.

Blocks in dependency order, top to bottom. Module names follow scGPT's (`encoder`, `value_encoder`, `linear1`, `norm1`,
...) so that `convert_scgpt.py` maps a real checkpoint with a short, readable table.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_scmmgpt import ScMMGPTCellConfig
from .saving import SafeSerializationMixin


@dataclass
class ScMMGPTCellModelOutput(ModelOutput):
    r"""
    cell_embeds (`torch.FloatTensor` of shape `(batch, hidden_size)`): the output at `<cls>`, the cell embedding.
    last_hidden_state (`torch.FloatTensor` of shape `(batch, genes + 1, hidden_size)`): gene states (position 0 = `<cls>`).
    hidden_states (`tuple[torch.FloatTensor]`, optional): the input embedding and every layer's output.
    """

    cell_embeds: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def masked_mean(states: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Weighted mean over the tokens of `states` (batch, tokens, hidden): `weights` (batch, tokens) is a 0/1 mask or
    any non-negative weights, 0 outside the tokens averaged (None: all tokens alike); a row of zero weight gives 0."""
    if weights is None:
        return states.mean(1)
    weights = weights.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(1) / weights.sum(1).clamp(min=1e-6)


def masked_mse(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the positions where `mask` is set (None: all); 0 (still in the graph) when nothing is
    masked, never NaN. Shared by masked value prediction, the expression decoder loss and its warm-up."""
    squared = (predictions - targets.to(predictions.dtype)) ** 2
    if mask is None:
        return squared.mean()
    mask = mask.to(predictions.dtype)
    return (squared * mask).sum() / mask.sum().clamp(min=1.0)


class GeneEncoder(nn.Module):
    """Gene token embedding followed by LayerNorm (scGPT's `GeneEncoder`)."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.enc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, gene_ids: torch.LongTensor) -> torch.Tensor:
        return self.enc_norm(self.embedding(gene_ids))


class ContinuousValueEncoder(nn.Module):
    """MLP on each gene's (clamped) expression value (scGPT's `ContinuousValueEncoder`)."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.linear1 = nn.Linear(1, config.hidden_size)
        self.linear2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.max_value = config.max_value

    def forward(self, expression_values: torch.Tensor) -> torch.Tensor:
        x = expression_values.clamp(max=self.max_value).unsqueeze(-1).to(self.linear1.weight.dtype)
        return self.dropout(self.norm(self.linear2(F.relu(self.linear1(x)))))


class CategoryValueEncoder(nn.Module):
    """Embedding of per-cell value bins (scGPT's `CategoryValueEncoder`)."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.n_bins, config.hidden_size)
        self.enc_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, expression_values: torch.Tensor) -> torch.Tensor:
        bins = expression_values.round().long().clamp(0, self.embedding.num_embeddings - 1)
        return self.enc_norm(self.embedding(bins))


class CellSelfAttention(nn.Module):
    """Multi-head self-attention over gene tokens through `F.scaled_dot_product_attention` (fused QKV projection)."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.attention_probs_dropout_prob

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None) -> torch.Tensor:
        batch, length, width = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, length, head_dim)
        attn = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_bias, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(attn.transpose(1, 2).reshape(batch, length, width))


class CellEncoderLayer(GradientCheckpointingLayer):
    """Post-norm transformer encoder layer, as `nn.TransformerEncoderLayer(norm_first=False)` that scGPT uses."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.self_attn = CellSelfAttention(config)
        self.linear1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.activation = nn.GELU() if config.hidden_act == "gelu" else nn.ReLU()

    def forward(self, hidden_states: torch.Tensor, attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        hidden_states = self.norm1(hidden_states + self.dropout(self.self_attn(hidden_states, attention_bias)))
        feed_forward = self.linear2(self.dropout(self.activation(self.linear1(hidden_states))))
        return self.norm2(hidden_states + self.dropout(feed_forward))


class ScMMGPTCellPreTrainedModel(SafeSerializationMixin, PreTrainedModel):
    # SafeSerializationMixin: atomic save_pretrained, safetensors-only from_pretrained with clear errors
    config_class = ScMMGPTCellConfig
    config: ScMMGPTCellConfig
    base_model_prefix = "cell_model"
    main_input_name = "gene_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CellEncoderLayer"]


class ScMMGPTCellModel(ScMMGPTCellPreTrainedModel):
    r"""
    The cell encoder. Inputs come from `ScMMGPTCellTokenizer`:

    - `gene_ids` (batch, L) vocabulary ids, position 0 = `<cls>`;
    - `expression_values` (batch, L) continuous values or bin indices;
    - `attention_mask` (batch, L) 1 for real tokens, 0 for padding.

    Returns `cell_embeds` (batch, hidden_size), the `<cls>` output, and `last_hidden_state` (batch, L, hidden_size).
    """

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__(config)
        self.encoder = GeneEncoder(config)
        self.value_encoder = (
            ContinuousValueEncoder(config) if config.input_value_mode == "continuous" else CategoryValueEncoder(config)
        )
        self.layers = nn.ModuleList(CellEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.encoder.embedding

    def set_input_embeddings(self, value: nn.Embedding):
        self.encoder.embedding = value

    def embed_tokens(self, gene_ids, expression_values, attention_mask=None) -> torch.Tensor:
        """Input embedding of each gene token: gene embedding + value embedding; (batch, L, hidden_size)."""
        if attention_mask is not None:  # padded positions carry pad_value, which a bin embedding cannot take
            expression_values = expression_values.masked_fill(attention_mask == 0, 0.0)
        return self.encoder(gene_ids) + self.value_encoder(expression_values)

    def forward(
        self,
        gene_ids: torch.LongTensor,
        expression_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ScMMGPTCellModelOutput:
        if gene_ids.dim() != 2 or gene_ids.shape != expression_values.shape:
            raise ValueError(
                f"gene_ids and expression_values must both be (batch, genes); got {tuple(gene_ids.shape)} and "
                f"{tuple(expression_values.shape)}"
            )
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        hidden_states = self.embed_tokens(gene_ids, expression_values, attention_mask)
        attention_bias = None
        if attention_mask is not None:  # (batch, 1, 1, L) boolean: True = attend
            attention_bias = attention_mask.bool()[:, None, None, :]
        all_hidden = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_bias)
            if output_hidden_states:
                all_hidden += (hidden_states,)
        return ScMMGPTCellModelOutput(
            cell_embeds=hidden_states[:, 0], last_hidden_state=hidden_states, hidden_states=all_hidden
        )


__all__ = ["ScMMGPTCellModel", "ScMMGPTCellPreTrainedModel", "ScMMGPTCellModelOutput", "masked_mean"]
