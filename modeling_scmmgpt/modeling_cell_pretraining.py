"""Stage 0: pre-training the cell encoder with scGPT's objectives, for when no scGPT checkpoint is given.

`ScMMGPTCellForMaskedValuePrediction` wraps a `ScMMGPTCellModel` (as `cell_model`, the base model prefix) with scGPT's
two expression heads, named as in scGPT's checkpoints (`decoder`, `mvc_decoder`):

- GEP, masked expression value prediction: a share (`mask_ratio`) of each cell's gene tokens get their value replaced
  by `mask_value`; an MLP on each gene state predicts the true value; MSE on the masked tokens.
- GEPC, expression prediction from the cell embedding (scGPT's "MVC", inner-product style): each gene's embedding is
  turned into a query and dotted with the `<cls>` cell embedding; MSE on the masked tokens, as scGPT computes it, so
  the cell embedding must carry the values it was not shown rather than echo the ones it was.

A saved head model loads straight into `ScMMGPTCellModel.from_pretrained` (the heads are dropped), and from there into
stage 1 with `ScMMGPTModel.cell_model.load_state_dict(...)`.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from .configuration_scmmgpt import ScMMGPTCellConfig
from .modeling_cell_encoder import ScMMGPTCellModel, ScMMGPTCellPreTrainedModel, masked_mse

DEFAULT_MASK_RATIO = ScMMGPTCellConfig.mask_ratio  # scGPT's pre-training default, declared on the config
EVAL_MASK_SEED = 0  # masks drawn outside training are seeded, so evaluation losses compare across checkpoints


@dataclass
class ScMMGPTCellMaskedValueOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`): `loss_masked_value + loss_cell_value`.
    loss_masked_value (`torch.FloatTensor` of shape `()`): GEP, MSE of the gene-state predictions on masked tokens.
    loss_cell_value (`torch.FloatTensor` of shape `()`): GEPC, MSE of the cell-embedding predictions on masked tokens.
    predictions (`torch.FloatTensor` of shape `(batch, genes + 1)`): each token's value predicted from its gene state.
    cell_value_predictions (`torch.FloatTensor` of shape `(batch, genes + 1)`): each token's value predicted from the
        cell embedding and the gene's embedding.
    masked_positions (`torch.BoolTensor` of shape `(batch, genes + 1)`): the tokens whose value was hidden.
    cell_embeds (`torch.FloatTensor` of shape `(batch, hidden_size)`): the `<cls>` output.
    """

    loss: torch.FloatTensor | None = None
    loss_masked_value: torch.FloatTensor | None = None
    loss_cell_value: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    cell_value_predictions: torch.FloatTensor | None = None
    masked_positions: torch.BoolTensor | None = None
    cell_embeds: torch.FloatTensor | None = None


def maskable_positions(gene_ids: torch.LongTensor, attention_mask: torch.Tensor | None, config: ScMMGPTCellConfig):
    """Gene tokens whose value may be masked: real (attended) tokens other than `<cls>` and `<pad>`; (batch, L) bool."""
    keep = (gene_ids != config.cls_token_id) & (gene_ids != config.pad_token_id)
    return keep if attention_mask is None else keep & attention_mask.bool()


def random_mask_positions(
    gene_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None,
    config: ScMMGPTCellConfig,
    mask_ratio: float = DEFAULT_MASK_RATIO,
    generator: torch.Generator | None = None,
) -> torch.BoolTensor:
    """Draw scGPT's mask: in each cell, `int(mask_ratio · n)` of its `n` maskable gene tokens, uniformly.

    Exactly that many per cell (as scGPT's `random_mask_value`), never `<cls>` or padding. `generator` seeds the draw
    (the global RNG when None); it must live on `gene_ids`' device.

    Returns a (batch, L) bool tensor, True where the value is hidden.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    eligible = maskable_positions(gene_ids, attention_mask, config)
    n_mask = (eligible.sum(1) * mask_ratio).long()  # floor, as scGPT's int(len(non_padding) * mask_ratio)
    # random scores, ineligible tokens pushed past every eligible one; the n_mask lowest scores of a row are masked
    scores = torch.rand(gene_ids.shape, generator=generator, device=gene_ids.device)
    scores = scores.masked_fill(~eligible, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    return rank < n_mask[:, None]


class ExprDecoder(nn.Module):
    """GEP head: MLP on each gene state → its expression value (scGPT's `ExprDecoder`, `fc.0/2/4`)."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        width = config.hidden_size
        self.fc = nn.Sequential(
            nn.Linear(width, width), nn.LeakyReLU(), nn.Linear(width, width), nn.LeakyReLU(), nn.Linear(width, 1)
        )

    def forward(self, gene_states: torch.Tensor) -> torch.Tensor:
        """gene_states (batch, L, hidden_size) → values (batch, L)."""
        return self.fc(gene_states).squeeze(-1)


class MVCDecoder(nn.Module):
    """GEPC head: value of gene g = <W · sigmoid(gene2query(gene_embedding_g)), cell_embeds> (scGPT's inner-product
    `MVCDecoder`). The cell embedding alone must hold the cell's expression, which is what stage 2 decodes from."""

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__()
        self.gene2query = nn.Linear(config.hidden_size, config.hidden_size)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, cell_embeds: torch.Tensor, gene_embeds: torch.Tensor) -> torch.Tensor:
        """cell_embeds (batch, hidden_size), gene_embeds (batch, L, hidden_size) → values (batch, L)."""
        query = self.W(self.query_activation(self.gene2query(gene_embeds)))
        return torch.bmm(query, cell_embeds.unsqueeze(-1)).squeeze(-1)


class ScMMGPTCellForMaskedValuePrediction(ScMMGPTCellPreTrainedModel):
    r"""
    The cell encoder with scGPT's pre-training heads (stage 0): masked value prediction (GEP) and value prediction from
    the cell embedding (GEPC). Continuous value input only: the binned encoder has no embedding for a masked value.

    The mask ratio and mask value are read from the config (`mask_ratio`, `mask_value`; scGPT's 0.4 and -1 by default)
    so that they travel with a saved checkpoint.

    Inputs (from `ScMMGPTCellTokenizer`; position 0 is `<cls>`):
        gene_ids (`torch.LongTensor` of shape `(batch, L)`), expression_values (`torch.FloatTensor` of shape
        `(batch, L)`, the true values), attention_mask (`(batch, L)`, 1 for real tokens).
        masked_positions (`torch.BoolTensor` of shape `(batch, L)`, optional): tokens whose value to hide. When None, a
        mask is drawn: in training from the global RNG (seeded by `Trainer`'s `seed`) or from `mask_seed` when given;
        outside training from `mask_seed` or a fixed seed, so evaluation is deterministic.
    """

    def __init__(self, config: ScMMGPTCellConfig):
        super().__init__(config)
        if config.input_value_mode != "continuous":
            raise ValueError(
                "ScMMGPTCellForMaskedValuePrediction needs input_value_mode='continuous': the binned value encoder has "
                "no embedding for a masked value"
            )
        self.cell_model = ScMMGPTCellModel(config)
        self.decoder = ExprDecoder(config)
        self.mvc_decoder = MVCDecoder(config)
        self.post_init()

    @property
    def mask_ratio(self) -> float:
        return float(self.config.mask_ratio)

    @property
    def mask_value(self) -> float:
        return float(self.config.mask_value)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.cell_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.cell_model.set_input_embeddings(value)

    def draw_mask(self, gene_ids, attention_mask=None, mask_seed: int | None = None) -> torch.BoolTensor:
        """The mask `forward` draws when none is given; (batch, L) bool."""
        if mask_seed is None and not self.training:
            mask_seed = EVAL_MASK_SEED
        generator = None
        if mask_seed is not None:
            generator = torch.Generator(device=gene_ids.device).manual_seed(int(mask_seed))
        return random_mask_positions(gene_ids, attention_mask, self.config, self.mask_ratio, generator)

    # no **kwargs: Trainer then scales the loss for gradient accumulation itself
    def forward(
        self,
        gene_ids: torch.LongTensor,
        expression_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        masked_positions: torch.BoolTensor | None = None,
        mask_seed: int | None = None,
        return_dict: bool | None = None,
    ) -> ScMMGPTCellMaskedValueOutput:
        if masked_positions is None:
            masked_positions = self.draw_mask(gene_ids, attention_mask, mask_seed)
        else:
            if masked_positions.shape != gene_ids.shape:
                raise ValueError(
                    f"masked_positions must be (batch, genes) like gene_ids {tuple(gene_ids.shape)}, got "
                    f"{tuple(masked_positions.shape)}"
                )
            # a mask on <cls> or padding would train the heads on values that are not expression
            masked_positions = masked_positions.bool() & maskable_positions(gene_ids, attention_mask, self.config)
        inputs = expression_values.masked_fill(masked_positions, self.mask_value)
        cells = self.cell_model(gene_ids, inputs, attention_mask)
        predictions = self.decoder(cells.last_hidden_state)
        # the gene embedding alone (no value) is the query, as scGPT's `cur_gene_token_embs`
        cell_value_predictions = self.mvc_decoder(cells.cell_embeds, self.cell_model.encoder(gene_ids))
        loss_masked_value = masked_mse(predictions, expression_values, masked_positions)
        loss_cell_value = masked_mse(cell_value_predictions, expression_values, masked_positions)
        return ScMMGPTCellMaskedValueOutput(
            loss=loss_masked_value + loss_cell_value,
            loss_masked_value=loss_masked_value,
            loss_cell_value=loss_cell_value,
            predictions=predictions,
            cell_value_predictions=cell_value_predictions,
            masked_positions=masked_positions,
            cell_embeds=cells.cell_embeds,
        )


__all__ = [
    "ScMMGPTCellForMaskedValuePrediction",
    "ScMMGPTCellMaskedValueOutput",
    "maskable_positions",
    "random_mask_positions",
]
