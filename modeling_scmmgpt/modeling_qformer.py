"""The Q-Former: a BERT whose learned queries cross-attend to the cell encoder's gene states (BLIP-2's design).

Parameter names follow `BertModel` (`embeddings.*`, `encoder.layer.N.attention.self.query`, ...) so that any BERT
checkpoint (all-MiniLM-L6-v2 for the embedded model, PubMedBERT in the paper) loads with `load_bert_weights`; the
cross-attention and the queries' own feed-forward (`intermediate_query` / `output_query`) are added on top, the latter
initialised from the text feed-forward as in BLIP-2.

One stack serves three uses through its attention mask (see `ScMMGPTModel`):
queries only (cell features), text only (text features), and queries + text (matching: bidirectional; captioning:
queries see queries, text sees the queries and earlier text).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer


class QFormerEmbeddings(nn.Module):
    """BERT word + position (+ token type 0) embeddings for text; queries are prepended as they are."""

    def __init__(self, config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(max(config.type_vocab_size, 1), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.LongTensor | None = None, query_embeds: torch.Tensor | None = None,
                text_extra: torch.Tensor | None = None):
        parts = []
        if query_embeds is not None:
            parts.append(query_embeds)
        if input_ids is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            text = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
            if text_extra is not None:  # (batch, tokens, hidden) added to the tokens' embeddings (gene grounding)
                text = text + text_extra
            parts.append(text + self.token_type_embeddings.weight[0])
        return self.dropout(self.LayerNorm(torch.cat(parts, dim=1)))


class QFormerAttention(nn.Module):
    """BERT attention block (`self.query/key/value`, `output.dense/LayerNorm`) run through SDPA."""

    def __init__(self, config, kv_width: int | None = None):
        super().__init__()
        width, kv_width = config.hidden_size, kv_width or config.hidden_size
        self.num_heads = config.num_attention_heads
        self.self = nn.Module()
        self.self.query = nn.Linear(width, width)
        self.self.key = nn.Linear(kv_width, width)
        self.self.value = nn.Linear(kv_width, width)
        self.output = nn.Module()
        self.output.dense = nn.Linear(width, width)
        self.output.LayerNorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.dropout = config.attention_probs_dropout_prob
        self.output_dropout = nn.Dropout(config.hidden_dropout_prob)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, -1).transpose(1, 2)

    def forward(self, hidden_states, attention_bias=None, key_value_states=None):
        kv = hidden_states if key_value_states is None else key_value_states
        query, key, value = self._heads(self.self.query(hidden_states)), self._heads(self.self.key(kv)), self._heads(self.self.value(kv))
        attn = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_bias, dropout_p=self.dropout if self.training else 0.0
        )
        attn = attn.transpose(1, 2).reshape(hidden_states.shape)
        return self.output.LayerNorm(hidden_states + self.output_dropout(self.output.dense(attn)))


def _feed_forward_halves(config) -> tuple[nn.Module, nn.Module]:
    """BERT's feed-forward as its two named halves: `intermediate.dense` and `output.dense/LayerNorm`."""
    intermediate, output = nn.Module(), nn.Module()
    intermediate.dense = nn.Linear(config.hidden_size, config.intermediate_size)
    output.dense = nn.Linear(config.intermediate_size, config.hidden_size)
    output.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    return intermediate, output


class QFormerLayer(GradientCheckpointingLayer):
    """Self-attention over [queries; text], cross-attention of the queries to gene states (every few layers), and
    separate feed-forwards for queries and text."""

    def __init__(self, config, has_cross_attention: bool):
        super().__init__()
        self.attention = QFormerAttention(config)
        self.crossattention = QFormerAttention(config, config.encoder_hidden_size) if has_cross_attention else None
        # BERT-compatible names for the text half; BLIP-2's `*_query` names for the queries' half
        self.intermediate, self.output = _feed_forward_halves(config)
        self.intermediate_query, self.output_query = _feed_forward_halves(config)
        self.act = ACT2FN[config.hidden_act]
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def _feed_forward(self, hidden_states, intermediate, output):
        out = self.dropout(output.dense(self.act(intermediate.dense(hidden_states))))
        return output.LayerNorm(hidden_states + out)

    def forward(self, hidden_states, attention_bias, query_length: int, cell_states=None, cell_bias=None):
        hidden_states = self.attention(hidden_states, attention_bias)
        queries, text = hidden_states[:, :query_length], hidden_states[:, query_length:]
        parts = []
        if query_length:
            if self.crossattention is not None and cell_states is not None:
                queries = self.crossattention(queries, cell_bias, key_value_states=cell_states)
            parts.append(self._feed_forward(queries, self.intermediate_query, self.output_query))
        if text.shape[1]:
            parts.append(self._feed_forward(text, self.intermediate, self.output))
        return torch.cat(parts, dim=1)


class QFormerLMHead(nn.Module):
    """BERT's masked-LM head shape (`transform` then the word embeddings as output matrix), used for captioning.
    The output matrix is read from the embeddings at call time rather than stored, so nothing is saved twice."""

    def __init__(self, config):
        super().__init__()
        self.transform = nn.Module()
        self.transform.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.act = ACT2FN[config.hidden_act]
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states, word_embeddings: torch.Tensor):
        hidden_states = self.transform.LayerNorm(self.act(self.transform.dense(hidden_states)))
        return F.linear(hidden_states, word_embeddings, self.bias)


class ScMMGPTQFormer(nn.Module):
    """The Q-Former stack. `forward` takes embeddings through `embeddings(...)` and an attention mask built by the
    caller; cross-attention to the (layer-normed) gene states happens in layers 0, f, 2f, ... (f =
    `cross_attention_frequency`)."""

    def __init__(self, config, cross_attention_frequency: int):
        super().__init__()
        self.config = config
        self.embeddings = QFormerEmbeddings(config)
        self.cell_layernorm = nn.LayerNorm(config.encoder_hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % cross_attention_frequency == 0)
            for i in range(config.num_hidden_layers)
        )
        self.lm_head = QFormerLMHead(config)

    def text_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Next-token logits over the BERT vocabulary, (batch, length, vocab)."""
        return self.lm_head(hidden_states, self.embeddings.word_embeddings.weight)

    def forward(self, hidden_states, attention_bias, query_length: int, cell_states=None, cell_mask=None):
        """hidden_states: (batch, queries + text, hidden) from `embeddings`; attention_bias: (batch, 1, L, L) bool;
        cell_states: (batch, genes, cell_hidden); cell_mask: (batch, genes). Returns (batch, L, hidden)."""
        cell_bias = None
        if cell_states is not None:
            cell_states = self.cell_layernorm(cell_states)
            if cell_mask is not None:
                cell_bias = cell_mask.bool()[:, None, None, :]
        for layer in self.encoder.layer:
            hidden_states = layer(hidden_states, attention_bias, query_length, cell_states, cell_bias)
        return hidden_states

    @torch.no_grad()
    def load_bert_weights(self, state_dict: dict[str, torch.Tensor]) -> list[str]:
        """Copy a `BertModel` state dict (keys with or without a `bert.` prefix) into the Q-Former; the queries'
        feed-forward starts as a copy of the text one (BLIP-2). Returns the Q-Former keys left at initialisation."""
        state_dict = {k.removeprefix("bert."): v for k, v in state_dict.items()}
        for key in list(state_dict):
            for bert_name, query_name in (("intermediate.", "intermediate_query."), ("output.dense", "output_query.dense"),
                                          ("output.LayerNorm", "output_query.LayerNorm")):
                if ".attention." not in key and f".{bert_name}" in key:
                    state_dict.setdefault(key.replace(f".{bert_name}", f".{query_name}"), state_dict[key])
        own = self.state_dict()
        loaded = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
        self.load_state_dict(loaded, strict=False)
        return sorted(set(own) - set(loaded))


__all__ = ["ScMMGPTQFormer"]
