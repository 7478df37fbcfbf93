"""The expression decoder's count distributions (`modeling_expression_decoder`): NB / ZINB log-likelihoods against
scipy, seeded Gamma–Poisson sampling that converges to the predicted mean, the config field (old folders load as
"mse"), a saved "nb" model, the stage-2 loss on counts, the decoder warm-up by likelihood, `generate_cells` /
`scmmgpt generate` with each output kind, and the cell-state spread generation draws states from."""

import copy
import json

import anndata
import numpy as np
import pytest
import torch
from scipy import stats

from modeling_scmmgpt import (ScMMGPTCellTokenizer, ScMMGPTConfig, ScMMGPTForConditionalGeneration, ScMMGPTJobs,
                              ScMMGPTProcessor)
from modeling_scmmgpt.cli import main
from modeling_scmmgpt.modeling_expression_decoder import (LOG_THETA_RANGE, CellStateSpread, CountDistribution,
                                                          expression_loss, nb_log_prob, zinb_log_prob)
from modeling_scmmgpt.pipeline_scmmgpt import save_pipelines

from .conftest import TINY_LABEL_TEXTS
from .test_multimodal import tiny_config

TEXTS = ["cell type: CD14-positive monocyte.", "cell type: B cell."]


@pytest.fixture(scope="module")
def processor(pbmc, minilm_tokenizer):
    cell_tokenizer = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=64)
    return ScMMGPTProcessor(cell_tokenizer, copy.deepcopy(minilm_tokenizer), num_query_tokens=4)


def count_model(processor, distribution="nb", seed=0):
    torch.manual_seed(seed)
    config = tiny_config(len(processor.feature_extractor), len(processor.tokenizer),
                         expression_distribution=distribution)
    model = ScMMGPTForConditionalGeneration(config)
    model.set_cell_token_ids(processor)
    return model.eval()


@pytest.fixture(scope="module")
def nb_model_dir(processor, tmp_path_factory):
    folder = tmp_path_factory.mktemp("nb") / "model"
    model = count_model(processor, "nb")
    model.config.library_size_quantiles = np.quantile(np.geomspace(1000, 8000, 50), np.linspace(0, 1, 101)).tolist()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_pipelines(folder)
    (folder / "label_texts.json").write_text(json.dumps(TINY_LABEL_TEXTS))
    return folder


# ---------------------------------------------------------------------------------------------------- likelihoods
def test_nb_and_zinb_log_likelihoods_match_scipy():
    rng = np.random.default_rng(0)
    n = 4000
    mu = np.exp(rng.uniform(np.log(1e-3), np.log(1e3), n))
    theta = np.exp(rng.uniform(np.log(0.05), np.log(1e3), n))
    counts = np.where(rng.random(n) < 0.3, 0, rng.negative_binomial(theta, theta / (theta + mu)))
    pi = rng.uniform(0.01, 0.9, n)
    t = lambda a: torch.tensor(a, dtype=torch.float64)
    nb = nb_log_prob(t(counts), t(np.log(mu)), t(np.log(theta))).numpy()
    expected = stats.nbinom.logpmf(counts, theta, theta / (theta + mu))
    np.testing.assert_allclose(nb, expected, rtol=1e-9, atol=1e-9)
    zinb = zinb_log_prob(t(counts), t(np.log(mu)), t(np.log(theta)), t(np.log(pi / (1 - pi)))).numpy()
    expected = np.log(pi * (counts == 0) + (1 - pi) * stats.nbinom.pmf(counts, theta, theta / (theta + mu)))
    np.testing.assert_allclose(zinb, expected, rtol=1e-8, atol=1e-9)
    # float32, as the decoder trains: close to scipy over the same range
    nb32 = nb_log_prob(t(counts).float(), t(np.log(mu)).float(), t(np.log(theta)).float()).numpy()
    np.testing.assert_allclose(nb32, stats.nbinom.logpmf(counts, theta, theta / (theta + mu)), rtol=1e-3, atol=1e-2)


def test_count_distribution_log_prob_uses_size_factors_and_the_loss_weights_genes():
    dist = CountDistribution(log_rate=torch.log(torch.tensor([[2.0, 0.5]])), log_theta=torch.log(torch.tensor([[3.0, 1.0]])))
    counts = torch.tensor([[4.0, 0.0]])
    got = dist.log_prob(counts, torch.tensor([1.5])).double().numpy()
    mu, theta = np.array([3.0, 0.75]), np.array([3.0, 1.0])  # μ = size factor × rate
    np.testing.assert_allclose(got[0], stats.nbinom.logpmf([4, 0], theta, theta / (theta + mu)), rtol=1e-5)
    # the decoder's output: log θ passes a soft floor (LOG_THETA_RANGE[0] + softplus(raw - floor)), ~identity here
    output = torch.stack([dist.log_rate, dist.log_theta], -1)
    low = LOG_THETA_RANGE[0]
    theta = np.exp(low + np.logaddexp(0.0, np.log(theta) - low))
    assert theta == pytest.approx([3.0, 1.0], rel=0.01)
    expected = stats.nbinom.logpmf([4, 0], theta, theta / (theta + mu))
    weights = torch.tensor([[1.0, 3.0]])
    loss = expression_loss(output, "nb", weights=weights, counts=counts, size_factors=torch.tensor([1.5]))
    assert loss.item() == pytest.approx(-(expected * [1, 3]).sum() / 4, rel=1e-5)
    with pytest.raises(ValueError, match="trained on counts"):
        expression_loss(output, "nb", torch.zeros(1, 2), weights)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_sampling_is_seeded_and_converges_to_the_predicted_mean(zero_inflated):
    rate = torch.tensor([[0.02, 1.0, 8.0, 40.0]])
    theta = torch.tensor([[0.5, 2.0, 10.0, 100.0]])
    logits = torch.tensor([[-1.0, 0.0, 1.0, -3.0]]) if zero_inflated else None
    n = 40_000
    dist = CountDistribution(rate.log().expand(n, -1), theta.log().expand(n, -1),
                             None if logits is None else logits.expand(n, -1))
    size_factors = np.full(n, 0.5)
    draws = dist.sample(size_factors, np.random.default_rng(1))
    assert draws.dtype.kind == "i" and draws.shape == (n, 4) and (draws >= 0).all()
    np.testing.assert_array_equal(draws[:50], dist.sample(size_factors, np.random.default_rng(1))[:50])
    assert not np.array_equal(draws[:50], dist.sample(size_factors, np.random.default_rng(2))[:50])
    keep = 1.0 if logits is None else torch.sigmoid(-logits)[0].numpy()
    mu = 0.5 * rate[0].numpy()
    mean = mu * keep
    # law of large numbers: within 4 standard errors of the mean
    variance = keep * (mu + mu**2 / theta[0].numpy()) + keep * (1 - keep) * mu**2
    assert np.all(np.abs(draws.mean(0) - mean) < 4 * np.sqrt(variance / n))
    np.testing.assert_allclose(draws.var(0), variance, rtol=0.1)
    np.testing.assert_allclose(dist.mean_log1p()[0].numpy(), np.log1p(rate[0].numpy() * keep), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- config, model
def test_old_config_without_the_field_loads_as_mse(processor, tmp_path):
    config = tiny_config(len(processor.feature_extractor), len(processor.tokenizer))
    saved = config.to_dict()
    saved.pop("expression_distribution")
    saved.pop("library_size_quantiles")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    old = ScMMGPTConfig.from_pretrained(tmp_path)
    assert old.expression_distribution == "mse" and old.library_size_quantiles is None
    model = ScMMGPTForConditionalGeneration(old)
    assert model.expression_decoder.mlp[-1].out_features == 1
    states, genes = torch.randn(2, 4, 32), torch.randint(3, 700, (2, 5))
    assert model.decode_expression(states, genes).shape == (2, 5)
    with pytest.raises(ValueError, match="log1p values only"):
        model.decode_expression_distribution(states, genes)
    with pytest.raises(ValueError, match="expression_distribution must be"):
        tiny_config(10, 10, expression_distribution="poisson")


def test_nb_model_save_load_round_trip(processor, nb_model_dir):
    model = count_model(processor, "nb")
    loaded = ScMMGPTForConditionalGeneration.from_pretrained(nb_model_dir).eval()
    assert loaded.config.expression_distribution == "nb" and len(loaded.config.library_size_quantiles) == 101
    assert loaded.expression_decoder.mlp[-1].out_features == 2
    states, genes = torch.randn(3, 4, 32), torch.randint(3, 700, (3, 6))
    with torch.no_grad():
        a, b = model.decode_expression_distribution(states, genes), loaded.decode_expression_distribution(states, genes)
        torch.testing.assert_close(a.log_rate, b.log_rate)
        torch.testing.assert_close(a.log_theta, b.log_theta)
        torch.testing.assert_close(model.decode_expression(states, genes), a.mean_log1p())


@pytest.mark.parametrize("distribution", ["nb", "zinb"])
def test_stage2_forward_trains_a_count_decoder_on_counts(processor, pbmc, distribution):
    from scmmgpt_train.collators import Stage2Collator
    from scmmgpt_train.data import build_dataset

    model = count_model(processor, distribution).train()
    ds = build_dataset(pbmc[:4].copy(), tokenizer=processor.feature_extractor, label_column="bulk_labels")
    rows = [{**ds[i], "task": "text_to_cell"} for i in range(4)]
    batch = Stage2Collator(processor)(rows)
    out = model(**batch)
    cell_states = model.text_to_cell_projector(
        model.language_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             output_hidden_states=True).hidden_states[-1][
            model.get_placeholder_mask(batch["input_ids"]) & (batch["labels"] != -100)].view(4, 4, -1))
    decoded = model.expression_decoder(cell_states, batch["decoder_gene_ids"])
    dist = CountDistribution.from_decoder_output(decoded)
    weights = batch["decoder_mask"]
    nll = -(dist.log_prob(batch["decoder_counts"], batch["decoder_size_factors"]) * weights).sum() / weights.sum()
    torch.testing.assert_close(out.loss_expression, nll, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.expression, dist.mean_log1p(), rtol=1e-4, atol=1e-4)
    out.loss.backward()
    assert model.expression_decoder.mlp[-1].weight.grad.abs().sum() > 0


def test_decoder_warm_up_fits_an_nb_decoder_by_likelihood(processor, pbmc):
    from scmmgpt_train.data import build_dataset
    from scmmgpt_train.stage2 import library_size_quantiles, use_expression_distribution, warm_up_expression_decoder

    model = count_model(processor, "mse")
    use_expression_distribution(model, "nb", seed=0)
    assert model.config.expression_distribution == "nb" and model.expression_decoder.mlp[-1].out_features == 2
    ds = build_dataset(pbmc[:120].copy(), tokenizer=processor.feature_extractor, label_column="bulk_labels")
    rows = [ds[i] for i in range(len(ds))]
    losses = warm_up_expression_decoder(model, rows, processor.feature_extractor, steps=60, seed=0)
    assert np.isfinite(losses).all() and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    quantiles = library_size_quantiles(rows)
    assert len(quantiles) == 101 and quantiles == sorted(quantiles)
    assert quantiles[50] == pytest.approx(np.median(pbmc.obs["n_counts"][:120]), rel=0.01)


# ---------------------------------------------------------------------------------------------------- generation
def test_generate_cells_output_kinds(nb_model_dir):
    jobs = ScMMGPTJobs.from_pretrained(nb_model_dir, verbose=False)
    n_genes = len(jobs.cell_tokenizer.gene_names)
    counts = jobs.generate_cells(TEXTS, n_per_text=3, seed=1, output="counts")
    assert counts.output == "counts" and counts.expression.shape == (6, n_genes)
    assert counts.expression.dtype == np.int32 and (counts.expression >= 0).all() and counts.expression.any()
    assert counts.library_sizes.shape == (6,) and (counts.library_sizes >= 1000).all()
    assert (counts.library_sizes <= 8000).all()  # drawn from the saved quantiles
    again = jobs.generate_cells(TEXTS, n_per_text=3, seed=1, output="counts")
    np.testing.assert_array_equal(counts.expression, again.expression)
    np.testing.assert_array_equal(counts.library_sizes, again.library_sizes)
    other = jobs.generate_cells(TEXTS, n_per_text=3, seed=2, output="counts")
    assert not np.array_equal(counts.expression, other.expression)
    # log1p: the same draws, normalised by their library (and the jobs' default for a count decoder)
    log1p = jobs.generate_cells(TEXTS, n_per_text=3, seed=1)
    assert log1p.output == "log1p" and log1p.expression.dtype == np.float32
    np.testing.assert_allclose(log1p.expression, np.log1p(counts.expression / counts.library_sizes[:, None] * 1e4),
                               rtol=1e-5)
    np.testing.assert_allclose(counts.log1p(), log1p.expression, rtol=1e-5)
    # mean: deterministic for the first draw of each text, the decoder's log1p mean
    mean = jobs.generate_cells(TEXTS, n_per_text=2, seed=1, output="mean")
    assert mean.output == "mean" and mean.library_sizes is None and mean.expression.dtype == np.float32
    np.testing.assert_array_equal(mean.expression[[0, 2]], jobs.generate_cells(TEXTS, seed=5, output="mean").expression)
    assert not np.array_equal(mean.expression[0], mean.expression[1])  # noise_scale 0.1 on later draws
    fixed = jobs.generate_cells(TEXTS, n_per_text=2, seed=1, output="counts", library_size=500)
    assert (fixed.library_sizes == 500).all()
    adata = counts.to_anndata()
    assert adata.X.dtype == np.int32 and adata.uns["scmmgpt"]["output"] == "counts"
    np.testing.assert_allclose(adata.layers["log1p"], log1p.expression, rtol=1e-5)
    with pytest.raises(ValueError, match="output must be one of"):
        jobs.generate_cells(TEXTS, output="raw")
    with pytest.raises(ValueError, match="library_size must be"):
        jobs.generate_cells(TEXTS, output="counts", library_size=[100.0])


def test_an_mse_model_generates_means_only(tiny_model_dir):
    jobs = ScMMGPTJobs.from_pretrained(tiny_model_dir, verbose=False)
    cells = jobs.generate_cells(TEXTS, n_per_text=2, seed=0)
    assert cells.output == "mean" and cells.expression.dtype == np.float32
    with pytest.raises(ValueError, match="log1p values only"):
        jobs.generate_cells(TEXTS, output="counts")


def test_cli_generate_counts_is_reproducible_with_a_seed(nb_model_dir, tmp_path):
    paths = [tmp_path / "a.h5ad", tmp_path / "b.h5ad", tmp_path / "c.h5ad"]
    for path, seed in zip(paths, ("1", "1", "2")):
        assert main(["generate", str(nb_model_dir), *TEXTS, "-n", "3", "--values", "counts", "--seed", seed,
                     "-o", str(path)]) == 0
    a, b, c = (anndata.read_h5ad(p) for p in paths)
    assert a.X.dtype.kind == "i" and a.shape == (6, 765) and a.uns["scmmgpt"]["output"] == "counts"
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.layers["log1p"], b.layers["log1p"])
    assert a.obs.equals(b.obs) and not np.array_equal(a.X, c.X)
    # without --values a count model writes counts; --values mean the decoder's means
    assert main(["generate", str(nb_model_dir), TEXTS[0], "-n", "2", "-o", str(tmp_path / "d.h5ad")]) == 0
    assert anndata.read_h5ad(tmp_path / "d.h5ad").X.dtype.kind == "i"
    assert main(["generate", str(nb_model_dir), TEXTS[0], "--values", "mean", "-o", str(tmp_path / "e.h5ad")]) == 0
    assert anndata.read_h5ad(tmp_path / "e.h5ad").X.dtype == np.float32


@pytest.mark.parametrize("values", ["counts", "mean"])
def test_cli_generate_writes_batch_by_batch_the_cells_the_api_gives(nb_model_dir, tmp_path, values):
    path = tmp_path / "cells.h5ad"
    assert main(["generate", str(nb_model_dir), *TEXTS, "-n", "7", "--values", values, "--seed", "4",
                 "--batch-size", "3", "-o", str(path)]) == 0  # 14 cells in 5 batches, the last one short
    written = anndata.read_h5ad(path)
    jobs = ScMMGPTJobs.from_pretrained(nb_model_dir, verbose=False)
    expected = jobs.generate_cells(TEXTS, n_per_text=7, seed=4, batch_size=3, output=values).to_anndata()
    assert written.X.dtype == expected.X.dtype and written.shape == (14, 765)
    np.testing.assert_array_equal(written.X, expected.X)
    assert written.obs.equals(expected.obs) and list(written.var_names) == list(expected.var_names)
    assert written.uns["scmmgpt"]["output"] == values and set(written.layers) == set(expected.layers)
    for layer in expected.layers:
        np.testing.assert_array_equal(written.layers[layer], expected.layers[layer])
    batches = jobs.iter_generated_cells(TEXTS, n_per_text=7, seed=4, batch_size=3, output=values)
    assert [len(batch.texts) for batch in batches] == [3, 3, 3, 3, 2]
    with pytest.raises(ValueError, match="n_per_text must be a positive integer"):
        jobs.iter_generated_cells(TEXTS, n_per_text=0)  # checked when called, not at the first batch


def test_cli_warnings_are_one_line(nb_model_dir, tmp_path):
    import subprocess
    import sys

    long_prompt = "cell type: B cell. " + "A lymphocyte of B lineage. " * 200
    run = subprocess.run([sys.executable, "-m", "modeling_scmmgpt.cli", "generate", str(nb_model_dir), long_prompt,
                          "-n", "1", "-o", str(tmp_path / "a.h5ad")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip() and not line.startswith("wrote ")]
    assert any("is truncated" in line for line in lines)
    ours = [line for line in lines if "truncated" in line]
    assert all(line.startswith("scmmgpt generate: warning: a prompt of ") for line in ours), lines
    assert not any(".py:" in line or line.startswith(" ") for line in ours)  # no file:line, no source line


# ---------------------------------------------------------------------------------------------------- state spread
def two_spread_groups(generator, n=200, slots=4, width=32):
    """Cells of two texts: A's states vary along one direction only, B's along another, 3x wider."""
    directions = torch.linalg.qr(torch.randn(slots * width, 2, generator=generator))[0].T
    centres = torch.randn(2, slots * width, generator=generator) * 3
    scale = torch.tensor([[1.0], [3.0]])
    states = torch.cat([centres[g] + torch.randn(n, 1, generator=generator) * scale[g] * directions[g]
                        for g in (0, 1)]).view(2 * n, slots, width)
    groups = [torch.arange(n), torch.arange(n, 2 * n)]
    return states, groups, centres, directions, scale.squeeze(1)


def test_cell_state_spread_draws_each_texts_own_spread_around_the_state_asked_for():
    generator = torch.Generator().manual_seed(0)
    spread = CellStateSpread(tiny_config(10, 10))
    states, groups, centres, directions, scale = two_spread_groups(generator)
    asked = centres.view(2, 4, 32) + 0.1  # near each text's mean (a predicted state is never exactly on it)
    assert not spread.fitted and torch.equal(spread.sample(asked, generator), asked)  # unfitted: one state per text
    spread.fit(states, groups, torch.Generator().manual_seed(0))
    assert spread.fitted and int((spread.anchor_of >= 0).sum()) == 400  # both texts' cells fit in the bank
    drawn = spread.sample(asked.repeat_interleave(500, 0), torch.Generator().manual_seed(1))
    offsets = (drawn - asked.repeat_interleave(500, 0)).flatten(1).view(2, 500, -1)
    flat = states.flatten(1)
    for g in (0, 1):
        own = (flat[groups[g]] - flat[groups[g]].mean(0)) @ directions[g]  # the text's cells: std 1.08 and 3.32
        along = offsets[g] @ directions[g]  # each text's draws vary along its own direction, at its own scale ...
        assert along.std().item() == pytest.approx(own.std().item(), rel=0.1)
        assert abs(along.mean().item()) < 0.2 * scale[g].item()  # ... centred on the state asked for
        across = offsets[g] @ directions[1 - g]
        assert across.std().item() < 0.05  # ... and not along the other's
    again = spread.sample(asked.repeat_interleave(500, 0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(again, drawn)
    half = spread.sample(asked.repeat_interleave(500, 0), torch.Generator().manual_seed(1), scale=0.5)
    torch.testing.assert_close(half - asked.repeat_interleave(500, 0), (drawn - asked.repeat_interleave(500, 0)) / 2)
    assert torch.equal(spread.sample(asked, generator, scale=0.0), asked)


def test_the_state_spread_is_saved_and_a_folder_without_it_loads_unfitted(processor, tmp_path):
    from safetensors.torch import load_file, save_file

    model = count_model(processor, "nb")
    states, groups, *_ = two_spread_groups(torch.Generator().manual_seed(0))
    model.cell_state_spread.fit(states, groups, torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "new")
    loaded = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path / "new")
    for name, buffer in model.cell_state_spread.state_dict().items():
        torch.testing.assert_close(loaded.cell_state_spread.state_dict()[name], buffer)
    weights = load_file(tmp_path / "new" / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("cell_state_spread.")},
              tmp_path / "new" / "model.safetensors", metadata={"format": "pt"})
    old = ScMMGPTForConditionalGeneration.from_pretrained(tmp_path / "new")
    assert not old.cell_state_spread.fitted and not old.cell_state_spread.basis.any()


def test_generated_cells_of_one_text_vary_together_with_the_state_spread(processor, tmp_path):
    model = count_model(processor, "nb")
    model.cell_state_spread.fit(*two_spread_groups(torch.Generator().manual_seed(0))[:2],
                                torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    jobs = ScMMGPTJobs.from_pretrained(tmp_path, verbose=False)
    spread = jobs.generate_cells(TEXTS, n_per_text=4, seed=3, output="mean", state_spread=1.0, noise_scale=0.0)
    assert not np.allclose(spread.expression[0], spread.expression[1])  # each cell its own state
    fixed = jobs.generate_cells(TEXTS, n_per_text=4, seed=3, output="mean", noise_scale=0.0)  # mean: no spread
    np.testing.assert_array_equal(fixed.expression[0], fixed.expression[1])
    again = jobs.generate_cells(TEXTS, n_per_text=4, seed=3, output="mean", state_spread=1.0, noise_scale=0.0)
    np.testing.assert_array_equal(spread.expression, again.expression)
    with pytest.raises(ValueError, match="state_spread must be a non-negative number"):
        jobs.generate_cells(TEXTS, state_spread=-1.0)
