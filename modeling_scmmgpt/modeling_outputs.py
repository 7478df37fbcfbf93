"""What the scMMGPT models return (`modeling_scmmgpt`): `ModelOutput` dataclasses of the stage-1 and stage-2 models
and of the text→cell path."""

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class ScMMGPTModelOutput(ModelOutput):
    r"""
    loss: sum of the three stage-1 losses. loss_contrastive / loss_matching / loss_captioning: each of them.
    logits_per_cell (`(batch, batch)`): scaled cell–text similarities (training under several processes: of the
    global batch, every rank's cells × every rank's texts). cell_embeds / text_embeds (`(batch, embed_dim)`):
    normalised features in the shared space.
    """

    loss: torch.FloatTensor | None = None
    loss_contrastive: torch.FloatTensor | None = None
    loss_matching: torch.FloatTensor | None = None
    loss_captioning: torch.FloatTensor | None = None
    logits_per_cell: torch.FloatTensor | None = None
    cell_embeds: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None


@dataclass
class ScMMGPTCausalLMOutput(ModelOutput):
    r"""
    loss: LM loss + weighted text→cell losses. loss_lm / loss_cell_embed / loss_expression: each of them.
    logits (`(batch, length, vocab)`), cache: as the LLM's. cell_states (`(n, num_query_tokens, qformer_hidden)`): the
    cell states reconstructed from the output cell slots; expression (`(n, genes)`): the decoded log1p expression.
    """

    loss: torch.FloatTensor | None = None
    loss_lm: torch.FloatTensor | None = None
    loss_cell_embed: torch.FloatTensor | None = None
    loss_expression: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    cell_states: torch.FloatTensor | None = None
    expression: torch.FloatTensor | None = None


@dataclass
class ScMMGPTTextToCellOutput(ModelOutput):
    r"""
    loss: weighted sum of the two. loss_cell_embed: MSE of the reconstructed cell states to the true ones.
    loss_expression: masked MSE of the decoded log1p expression (None without decoder targets). cell_states
    (`(n, num_query_tokens, qformer_hidden)`) and expression (`(n, genes)`): what the output slots decode to.
    """

    loss: torch.FloatTensor | None = None
    loss_cell_embed: torch.FloatTensor | None = None
    loss_expression: torch.FloatTensor | None = None
    cell_states: torch.FloatTensor | None = None
    expression: torch.FloatTensor | None = None


__all__ = ["ScMMGPTCausalLMOutput", "ScMMGPTModelOutput", "ScMMGPTTextToCellOutput"]
