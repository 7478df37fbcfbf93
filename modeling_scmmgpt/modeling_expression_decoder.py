"""The expression decoder of scMMGPT's text → cell path, and the count distributions it can predict.

`config.expression_distribution` says what the decoder predicts for each requested gene of a cell state:

- `"mse"` (the paper's): the log1p-normalised expression, trained by MSE (a point, the same for every draw);
- `"nb"`: a negative binomial of the gene's counts, scVI's parameterisation: mean μ = s · exp(log_rate), where s is
  the cell's size factor (library size / target_sum, so exp(log_rate) is the expected reads per target_sum, CP10k),
  and inverse dispersion θ (variance μ + μ²/θ), both read from the cell state, trained by the likelihood of counts;
- `"zinb"`: that negative binomial plus a zero-inflation logit per gene (extra zeros with probability sigmoid(logit)).

The log-mean parameterisation (rather than scVI's softmax over all genes) lets the loss score a subset of the genes, as
the stage-2 collator hands them (the expressed ones and a weighted sample of the others). Every distribution also
decodes to a log1p value: the `"mse"` prediction, or log1p(expected CP10k) of the count distribution (its `"mean"`).
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .modeling_cell_encoder import masked_mse

# distribution → values the decoder predicts per gene (log1p value | log rate, log θ | log rate, log θ, zero logit)
EXPRESSION_DISTRIBUTIONS = {"mse": 1, "nb": 2, "zinb": 3}
# bounds of the predicted log rate and log θ: exp() stays finite and lgamma(x + θ) - lgamma(θ) keeps its precision in
# float32 (θ ≤ e^10 ≈ 22 000 is already a Poisson for any count a cell holds). θ's floor is soft (softplus), never
# a flat clamp: with rates far below the counts (a fresh decoder), the likelihood first lowers θ, and a θ held at a
# hard floor has no gradient left, nor has the rate (d log NB / d log μ = (x - μ) θ / (θ + μ)): training then stalls
LOG_RATE_RANGE = (-30.0, 15.0)
LOG_THETA_RANGE = (-5.0, 10.0)


def nb_log_prob(counts: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor) -> torch.Tensor:
    """log NB(counts; mean μ, inverse dispersion θ), elementwise, computed in log space:
    θ log(θ / (θ + μ)) + x log(μ / (θ + μ)) + lgamma(x + θ) - lgamma(θ) - lgamma(x + 1)."""
    theta = log_theta.exp()
    log_theta_mu = torch.logaddexp(log_theta, log_mu)
    return (theta * (log_theta - log_theta_mu) + counts * (log_mu - log_theta_mu)
            + torch.lgamma(counts + theta) - torch.lgamma(theta) - torch.lgamma(counts + 1))


def zinb_log_prob(counts: torch.Tensor, log_mu: torch.Tensor, log_theta: torch.Tensor,
                  zero_logits: torch.Tensor) -> torch.Tensor:
    """log ZINB(counts): extra zeros with probability π = sigmoid(zero_logits), else NB(μ, θ); elementwise. log π and
    log(1 - π) are -softplus(∓logit), never log of a rounded probability."""
    nb = nb_log_prob(counts, log_mu, log_theta)
    log_not_zero = -F.softplus(zero_logits)  # log(1 - π)
    # where counts == 0, nb is log NB(0): a zero is an extra zero or the NB's own
    zero = torch.logaddexp(-F.softplus(-zero_logits), log_not_zero + nb)
    return torch.where(counts > 0, log_not_zero + nb, zero)


@dataclass
class CountDistribution:
    r"""
    Per-gene count distributions of cells, (n, genes) each: `log_rate` the log of the expected reads per target_sum
    (μ = size factor · exp(log_rate)), `log_theta` the log inverse dispersion, `zero_logits` the zero-inflation logits
    (None: a plain negative binomial).
    """

    log_rate: torch.Tensor
    log_theta: torch.Tensor
    zero_logits: torch.Tensor | None = None

    @classmethod
    def from_decoder_output(cls, output: torch.Tensor) -> "CountDistribution":
        """The decoder's (n, genes, 2 | 3) output → its distribution (bounded, in float32 at least)."""
        output = output if output.dtype == torch.float64 else output.float()
        low, high = LOG_THETA_RANGE
        log_theta = (low + F.softplus(output[..., 1] - low)).clamp(max=high)
        return cls(log_rate=output[..., 0].clamp(*LOG_RATE_RANGE), log_theta=log_theta,
                   zero_logits=output[..., 2] if output.shape[-1] > 2 else None)

    def log_prob(self, counts: torch.Tensor, size_factors: torch.Tensor) -> torch.Tensor:
        """(n, genes) log-likelihood of `counts` (n, genes) in cells of `size_factors` (n,) (library / target_sum)."""
        counts = counts.to(self.log_rate.dtype)
        log_mu = self.log_rate + size_factors.to(self.log_rate.dtype).clamp(min=1e-8).log()[:, None]
        if self.zero_logits is None:
            return nb_log_prob(counts, log_mu, self.log_theta)
        return zinb_log_prob(counts, log_mu, self.log_theta, self.zero_logits)

    def mean_log1p(self) -> torch.Tensor:
        """(n, genes) log1p of the expected reads per target_sum (the distribution's mean, zero inflation included):
        the `"mean"` decoding, comparable with log1p-normalised cells."""
        rate = self.log_rate.exp()
        if self.zero_logits is not None:
            rate = rate * torch.sigmoid(-self.zero_logits)
        return torch.log1p(rate)

    def sample(self, size_factors, rng: np.random.Generator) -> np.ndarray:
        """Counts drawn for cells of `size_factors` (n,), (n, genes) int64: Gamma(θ, μ/θ) rates, then Poisson (the
        negative binomial as a Gamma–Poisson mixture), then ZINB's extra zeros; all from `rng`, so a seeded generator
        gives the same cells."""
        log_rate = self.log_rate.detach().double().cpu().numpy()
        theta = np.exp(self.log_theta.detach().double().cpu().numpy())
        mu = np.asarray(size_factors, dtype=np.float64)[:, None] * np.exp(log_rate)
        counts = rng.poisson(rng.gamma(theta, mu / theta))
        if self.zero_logits is not None:
            extra_zero = rng.random(counts.shape) < torch.sigmoid(self.zero_logits.detach()).double().cpu().numpy()
            counts[extra_zero] = 0
        return counts


def expression_loss(decoder_output: torch.Tensor, distribution: str, targets=None, weights=None, counts=None,
                    size_factors=None) -> torch.Tensor:
    """The decoder's loss over the weighted genes of each cell: MSE to the log1p `targets` (n, genes) for `"mse"`,
    the negative log-likelihood of `counts` (n, genes) at `size_factors` (n,) for `"nb"` / `"zinb"`; both averaged
    with the gene `weights` (n, genes; None: all 1)."""
    if distribution == "mse":
        return masked_mse(decoder_output, targets, weights)
    if counts is None or size_factors is None:
        raise ValueError(f"a {distribution!r} expression decoder is trained on counts: give the target cells' counts "
                         "and size factors (decoder_counts, decoder_size_factors)")
    nll = -CountDistribution.from_decoder_output(decoder_output).log_prob(counts, size_factors)
    if weights is None:
        return nll.mean()
    weights = weights.to(nll.dtype)
    return (nll * weights).sum() / weights.sum().clamp(min=1.0)


class ExpressionDecoder(nn.Module):
    """Decodes a cell state into each requested gene's expression: gene embeddings are the queries of a
    cross-attention over the cell state's slots, then an MLP on [context, gene embedding, their product] gives each
    gene's prediction (the product lets the cell state scale each gene directly, rather than through the MLP alone,
    which left predictions near the per-gene mean). What it predicts is `config.expression_distribution`'s (see the
    module docstring)."""

    def __init__(self, config):
        super().__init__()
        width, state_width = config.expression_decoder_hidden_size, config.qformer_config.hidden_size
        self.distribution = config.expression_distribution
        self.gene_embedding = nn.Embedding(config.cell_config.vocab_size, width)
        heads = 4 if width % 4 == 0 else 1
        self.cross_attention = nn.MultiheadAttention(width, heads, kdim=state_width, vdim=state_width, batch_first=True)
        outputs = EXPRESSION_DISTRIBUTIONS[self.distribution]
        self.mlp = nn.Sequential(nn.Linear(3 * width, width), nn.GELU(), nn.Linear(width, outputs))

    def forward(self, cell_states: torch.Tensor, gene_ids: torch.LongTensor) -> torch.Tensor:
        """cell_states (n, slots, state_width), gene_ids (n, genes) → `"mse"`: predicted log1p expression (n, genes);
        `"nb"` / `"zinb"`: the distribution's parameters (n, genes, 2 | 3) (`CountDistribution.from_decoder_output`)."""
        genes = self.gene_embedding(gene_ids)
        context, _ = self.cross_attention(genes, cell_states, cell_states, need_weights=False)
        out = self.mlp(torch.cat([context, genes, context * genes], dim=-1))
        return out.squeeze(-1) if self.distribution == "mse" else out


class CellStateSpread(nn.Module):
    """How real cells scatter around the mean state of the text they share, so that generation can draw cell states
    rather than decode one point per text.

    The text → cell projector predicts a text's *mean* state, and a count decoder on that one state draws genes
    independently: cells with the right per-gene spread but none of the gene–gene structure of real cells (which
    vary together: cell cycle, activation, size). `fit` stores, for up to `config.cell_state_spread_anchors` texts of
    the training cells, their mean state (an *anchor*) and a stratified bank of up to
    `config.cell_state_spread_cells` training cells' residuals from their text's mean, in the
    `config.cell_state_spread_rank` leading principal directions of all residuals (so the bank stays small at the
    paper's 32 × 768-wide states). `sample` adds to each predicted state a residual drawn from the bank rows of its
    nearest anchor: a seen text gets its own cells' spread, a new text that of the closest seen one. Unfitted (all
    anchors unused: a folder saved before this module, or a model that never ran stage 2) it adds nothing.
    """

    def __init__(self, config):
        super().__init__()
        width = config.num_query_tokens * config.qformer_config.hidden_size
        self.register_buffer("anchors", torch.zeros(config.cell_state_spread_anchors, width))
        self.register_buffer("basis", torch.zeros(config.cell_state_spread_rank, width))
        self.register_buffer("residuals", torch.zeros(config.cell_state_spread_cells, config.cell_state_spread_rank))
        self.register_buffer("anchor_of", torch.full((config.cell_state_spread_cells,), -1, dtype=torch.long))

    def reset(self):
        self.anchors.zero_()
        self.basis.zero_()
        self.residuals.zero_()
        self.anchor_of.fill_(-1)

    @property
    def fitted(self) -> bool:
        return bool((self.anchor_of >= 0).any())

    @torch.no_grad()
    def fit(self, cell_states: torch.Tensor, groups: list[torch.Tensor], generator: torch.Generator):
        """cell_states (cells, slots, width) of training cells; groups: the row indices of each text. The largest
        groups get anchors; each anchor keeps at most an equal share of the bank (rare types as well as common)."""
        self.reset()
        flat = cell_states.flatten(1).float().cpu()
        groups = sorted(groups, key=len, reverse=True)[: len(self.anchors)]
        residuals = torch.cat([flat[g] - flat[g].mean(0) for g in groups])
        rank = min(len(self.basis), *residuals.shape)
        _, _, directions = torch.linalg.svd(residuals, full_matrices=False)  # centred already: each group's is
        self.basis[:rank] = directions[:rank].to(self.basis)
        share, row, start = max(1, len(self.anchor_of) // len(groups)), 0, 0
        for anchor, g in enumerate(groups):
            self.anchors[anchor] = flat[g].mean(0).to(self.anchors)
            kept = torch.randperm(len(g), generator=generator)[: min(share, len(g), len(self.anchor_of) - row)]
            own = residuals[start : start + len(g)][kept]
            self.residuals[row : row + len(kept), :rank] = (own @ directions[:rank].T).to(self.residuals)
            self.anchor_of[row : row + len(kept)] = anchor
            row, start = row + len(kept), start + len(g)

    def sample(self, mean_states: torch.Tensor, generator: torch.Generator, scale: float = 1.0) -> torch.Tensor:
        """mean_states (n, slots, width) plus `scale` × a residual of the nearest anchor's bank, drawn with
        `generator` (a CPU generator); unchanged when unfitted or `scale` is 0."""
        if not self.fitted or scale == 0:
            return mean_states
        flat, anchor_of = mean_states.flatten(1).float(), self.anchor_of.cpu()
        used = anchor_of[anchor_of >= 0].unique()
        nearest = used[torch.cdist(flat, self.anchors[used.to(self.anchors.device)].float().to(flat.device))
                       .argmin(1).cpu()]
        rows = torch.empty(len(flat), dtype=torch.long)
        for anchor in nearest.unique():
            bank = (anchor_of == anchor).nonzero().squeeze(1)
            drawn = nearest == anchor
            rows[drawn] = bank[torch.randint(len(bank), (int(drawn.sum()),), generator=generator)]
        residual = self.residuals[rows.to(self.residuals.device)] @ self.basis
        return mean_states + scale * residual.view_as(mean_states).to(mean_states)


def decoded_log1p(decoder_output: torch.Tensor, distribution: str) -> torch.Tensor:
    """(n, genes) log1p expression of a decoder output: the `"mse"` prediction, or the count distribution's mean."""
    if distribution == "mse":
        return decoder_output
    return CountDistribution.from_decoder_output(decoder_output).mean_log1p()


__all__ = ["EXPRESSION_DISTRIBUTIONS", "LOG_RATE_RANGE", "LOG_THETA_RANGE", "CellStateSpread", "CountDistribution",
           "ExpressionDecoder", "decoded_log1p", "expression_loss", "nb_log_prob", "zinb_log_prob"]
