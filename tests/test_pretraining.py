"""Stage 0: the masked-value head model, and single-modal pre-training of the cell encoder and of a small LLM."""

import time
import warnings

import pytest
import torch

from modeling_scmmgpt import (
    ScMMGPTCellConfig,
    ScMMGPTCellForMaskedValuePrediction,
    ScMMGPTCellModel,
    ScMMGPTConfig,
    ScMMGPTModel,
)
from modeling_scmmgpt.modeling_cell_pretraining import random_mask_positions
from scmmgpt_train.pretrain import (
    MaskedValueCollator,
    masked_value_mse,
    pbmc_cells,
    perplexity,
    pretrain_cell_encoder,
    pretrain_small_llm,
)

MAX_GENES = 128  # shorter cells than the tiny default (256): the stage-0 run below stays a few seconds per 10 steps


@pytest.fixture(scope="module")
def pbmc_split():
    return pbmc_cells(max_genes=MAX_GENES, seed=0)


@pytest.fixture(scope="module")
def batch(pbmc_split):
    split, tokenizer = pbmc_split
    rows = [split["train"][i] for i in range(6)]
    out = MaskedValueCollator(tokenizer)(rows)
    out["attention_mask"][5, 40:] = 0  # a shorter cell, so padding is present
    out["gene_ids"][5, 40:] = tokenizer.pad_token_id
    out["expression_values"][5, 40:] = tokenizer.pad_value
    return out, len(tokenizer)


def tiny_model(vocab_size, seed=0):
    torch.manual_seed(seed)
    return ScMMGPTCellForMaskedValuePrediction(ScMMGPTCellConfig.tiny(vocab_size=vocab_size, max_genes=MAX_GENES))


def test_forward_shapes_and_finite_losses(batch):
    inputs, vocab = batch
    model = tiny_model(vocab).train()
    out = model(**inputs, mask_seed=1)
    n, length = inputs["gene_ids"].shape
    assert out.predictions.shape == out.cell_value_predictions.shape == out.masked_positions.shape == (n, length)
    assert out.cell_embeds.shape == (n, 32)
    for loss in (out.loss, out.loss_masked_value, out.loss_cell_value):
        assert loss.dim() == 0 and torch.isfinite(loss)
    torch.testing.assert_close(out.loss, out.loss_masked_value + out.loss_cell_value)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masking_excludes_cls_and_padding(batch):
    inputs, vocab = batch
    config = ScMMGPTCellConfig.tiny(vocab_size=vocab)
    generator = torch.Generator().manual_seed(0)
    masked = random_mask_positions(inputs["gene_ids"], inputs["attention_mask"], config, 0.4, generator)
    assert not masked[:, 0].any(), "<cls> was masked"
    assert not masked[inputs["attention_mask"] == 0].any(), "padding was masked"
    eligible = (inputs["attention_mask"].sum(1) - 1).tolist()  # real genes per cell, <cls> excluded
    assert masked.sum(1).tolist() == [int(n * 0.4) for n in eligible]  # scGPT's count: int(n · mask_ratio)
    # a given mask is cut back to maskable tokens, and the model hides exactly those values
    model = tiny_model(vocab).eval()
    everything = torch.ones_like(inputs["gene_ids"], dtype=torch.bool)
    out = model(**inputs, masked_positions=everything)
    assert not out.masked_positions[:, 0].any() and not out.masked_positions[inputs["attention_mask"] == 0].any()
    # outside training with no mask given, the drawn mask is the same every call (deterministic evaluation)
    torch.testing.assert_close(model(**inputs).masked_positions, model(**inputs).masked_positions)


def test_binned_input_is_refused():
    with pytest.raises(ValueError, match="continuous"):
        ScMMGPTCellForMaskedValuePrediction(ScMMGPTCellConfig.tiny(input_value_mode="binned"))


def test_save_loads_into_cell_model_and_stage1(batch, tmp_path):
    inputs, vocab = batch
    model = tiny_model(vocab, seed=3)
    model.save_pretrained(tmp_path)
    encoder = ScMMGPTCellModel.from_pretrained(tmp_path)
    expected = model.cell_model.state_dict()
    assert encoder.state_dict().keys() == expected.keys()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, expected[key], msg=key)
    stage1 = ScMMGPTModel(ScMMGPTConfig.tiny(cell_config=encoder.config))
    stage1.cell_model.load_state_dict(encoder.state_dict())
    cells = {k: inputs[k] for k in ("gene_ids", "expression_values", "attention_mask")}
    torch.testing.assert_close(stage1.cell_model.eval()(**cells).cell_embeds, model.cell_model.eval()(**cells).cell_embeds)


def test_stage0_beats_random_encoder_on_held_out_cells(pbmc_split, tmp_path):
    split, tokenizer = pbmc_split
    config = ScMMGPTCellConfig.tiny(vocab_size=len(tokenizer), max_genes=MAX_GENES)
    start = time.perf_counter()
    model, metrics = pretrain_cell_encoder(
        split["train"], split["test"], tokenizer, config=config, output_dir=str(tmp_path), max_steps=80,
        max_seconds=None, per_device_train_batch_size=16, logging_steps=20, progress=False,
    )
    wall = time.perf_counter() - start
    print(f"\nstage 0 ({metrics['train_steps']} steps, {wall:.1f}s): masked-value MSE on {len(split['test'])} held-out "
          f"cells: trained {metrics['masked_value_mse']:.4f}, random init {metrics['masked_value_mse_random_init']:.4f}, "
          f"per-gene mean baseline {metrics['masked_value_mse_gene_mean']:.4f}")
    assert metrics["masked_value_mse"] < 0.5 * metrics["masked_value_mse_random_init"]
    assert metrics["last_loss"] < metrics["first_loss"]
    # the figure is reproducible from the saved folder, under the same fixed mask
    reloaded = ScMMGPTCellForMaskedValuePrediction.from_pretrained(tmp_path)
    assert reloaded.mask_ratio == pytest.approx(0.4)
    assert masked_value_mse(reloaded, split["test"], tokenizer) == pytest.approx(metrics["masked_value_mse"], rel=1e-5)
    assert (tmp_path / "trainer_state.json").exists() and (tmp_path / "gene_vocab.json").exists()


def test_gene_mean_baseline_is_the_same_from_streamed_training_cells(pbmc_split):
    from scmmgpt_train.pretrain import gene_mean_mse

    split, tokenizer = pbmc_split
    train, test = split["train"], split["test"]
    in_memory = gene_mean_mse(train, test, tokenizer)
    assert gene_mean_mse(train.to_iterable_dataset(), test, tokenizer) == pytest.approx(in_memory, rel=1e-12)
    # the means of only the first 30 training cells: a worse estimate of each gene's mean
    assert gene_mean_mse(train, test, tokenizer, max_train_cells=30) > in_memory


def test_small_llm_pretraining_lowers_held_out_perplexity(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    model, tokenizer, metrics = pretrain_small_llm(
        output_dir=str(tmp_path), vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        block_size=64, max_steps=60, max_seconds=None, per_device_train_batch_size=8, logging_steps=20, progress=False,
    )
    wall = time.perf_counter() - start
    print(f"\nsmall LLM ({metrics['n_parameters']} parameters, {metrics['train_steps']} steps, {wall:.1f}s): perplexity "
          f"on {metrics['n_eval_texts']} held-out ontology definitions {metrics['perplexity_before']:.1f} → "
          f"{metrics['perplexity_after']:.1f}")
    assert metrics["perplexity_before"] > metrics["perplexity_after"]
    assert metrics["last_loss"] < metrics["first_loss"]
    # the tokenizer has the special tokens the later stages rely on, and the folder loads through the Auto classes
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token} == {
        "<s>", "</s>", "<pad>", "<unk>"}
    text = "cell type: B cell. A lymphocyte of B lineage."
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    texts = [text, "cell type: T cell. A type of lymphocyte whose defining characteristic is the expression of a T cell "
             "receptor complex."]
    assert perplexity(loaded, loaded_tokenizer, texts) == pytest.approx(perplexity(model, tokenizer, texts), rel=1e-4)


@pytest.mark.slow
def test_default_budget_runs(tmp_path):
    """The defaults that `make train-tiny` / `make demo` use: stage 0 on the PBMC cells, then the small LLM."""
    model, metrics = pretrain_cell_encoder(output_dir=str(tmp_path / "cell"), progress=False)
    print(f"\nstage 0 defaults: {metrics}")
    assert metrics["masked_value_mse"] < metrics["masked_value_mse_random_init"]
    _, _, llm_metrics = pretrain_small_llm(output_dir=str(tmp_path / "llm"), progress=False)
    print(f"small LLM defaults: {llm_metrics}")
    assert llm_metrics["perplexity_after"] < llm_metrics["perplexity_before"]


def test_runs_without_progress_print_no_log_dicts(tmp_path, capsys):
    """`progress=False` outside the pipeline: no progress bars and no per-log dicts on stdout (`PrinterCallback`), while
    the logs still reach the trainer state."""
    from scmmgpt_train.pretrain import pretrain_small_llm

    texts = [f"cell type: T cell {i}. A lymphocyte that matures in the thymus." for i in range(40)]
    kwargs = dict(texts=texts, vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                  block_size=32, max_steps=4, logging_steps=1, save=False)
    _, _, metrics = pretrain_small_llm(output_dir=str(tmp_path / "quiet"), progress=False, **kwargs)
    assert "'loss':" not in capsys.readouterr().out and metrics["first_loss"] is not None


def test_time_limit_stops_training_with_a_warning_when_steps_are_left():
    from transformers import TrainerControl, TrainerState

    from scmmgpt_train.trainers import TimeLimitCallback

    guard = TimeLimitCallback(0.0)
    guard.on_train_begin(None, TrainerState(), TrainerControl())
    with pytest.warns(UserWarning, match="after 3 of 10 steps"):
        control = guard.on_step_end(None, TrainerState(global_step=3, max_steps=10), TrainerControl())
    assert control.should_training_stop
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the last step: stopping there loses nothing, no warning
        assert guard.on_step_end(None, TrainerState(global_step=10, max_steps=10), TrainerControl()).should_training_stop


class _PartsModel(torch.nn.Module):
    """A one-weight model whose output carries two loss parts; `loss_rare` is None on every other batch."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))

    def forward(self, x, step):
        from transformers.utils import ModelOutput

        common = (self.weight * x).mean()
        rare = common * 0 + 10.0 * step[0] if int(step[0]) % 2 == 0 else None
        return ModelOutput(loss=common, loss_common=common, loss_rare=rare)


def test_loss_parts_trainer_logs_each_parts_mean_over_the_logged_steps(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments

    from scmmgpt_train.trainers import LossPartsTrainer

    rows = Dataset.from_dict({"x": [[1.0]] * 4, "step": [[float(i)] for i in range(4)]})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=1, learning_rate=0.0,
                             logging_steps=2, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
                             train_sampling_strategy="sequential")
    trainer = LossPartsTrainer(model=_PartsModel(), args=args, train_dataset=rows,
                               loss_parts=("loss_common", "loss_rare"))
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["loss_common"] for entry in logs] == [1.0, 1.0]
    assert [entry["loss_rare"] for entry in logs] == [0.0, 20.0]  # one batch per window had it: no zeros averaged in
