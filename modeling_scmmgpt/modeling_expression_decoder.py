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


def decoded_log1p(decoder_output: torch.Tensor, distribution: str) -> torch.Tensor:
    """(n, genes) log1p expression of a decoder output: the `"mse"` prediction, or the count distribution's mean."""
    if distribution == "mse":
        return decoder_output
    return CountDistribution.from_decoder_output(decoder_output).mean_log1p()


__all__ = ["EXPRESSION_DISTRIBUTIONS", "LOG_RATE_RANGE", "LOG_THETA_RANGE", "CountDistribution", "ExpressionDecoder",
           "decoded_log1p", "expression_loss", "nb_log_prob", "zinb_log_prob"]
