"""The cell encoder: shapes, masking, gradient checkpointing, on tokens of the real PBMC file."""

import numpy as np
import pytest
import torch

from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTCellModel, ScMMGPTCellTokenizer


@pytest.fixture(scope="module")
def pbmc_batch(pbmc):
    tok = ScMMGPTCellTokenizer(gene_names=list(pbmc.raw.var_names), max_genes=64, normalize=False)
    return tok(pbmc[:8], use_raw=True, return_tensors="pt"), len(tok)


@pytest.mark.parametrize("mode", ["continuous", "binned"])
def test_forward_shapes(pbmc_batch, mode):
    batch, vocab = pbmc_batch
    torch.manual_seed(0)
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=vocab, input_value_mode=mode)).eval()
    out = model(**batch, output_hidden_states=True)
    assert out.cell_embeds.shape == (8, 32)
    assert out.last_hidden_state.shape == (8, batch["gene_ids"].shape[1], 32)
    assert len(out.hidden_states) == 3 and torch.isfinite(out.last_hidden_state).all()
    torch.testing.assert_close(out.cell_embeds, out.last_hidden_state[:, 0])


def test_padding_does_not_change_a_cells_embedding(pbmc_batch):
    batch, vocab = pbmc_batch
    torch.manual_seed(0)
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=vocab)).eval()
    full = model(**batch).cell_embeds
    extra = 50  # pad every cell further with junk genes/values that the mask hides
    padded = {
        "gene_ids": torch.cat([batch["gene_ids"], torch.randint(3, vocab, (8, extra))], 1),
        "expression_values": torch.cat([batch["expression_values"], torch.rand(8, extra) * 9], 1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.zeros(8, extra, dtype=torch.long)], 1),
    }
    torch.testing.assert_close(model(**padded).cell_embeds, full, atol=1e-5, rtol=1e-5)
    # each cell alone, trimmed to its own length, gives the same embedding as in the padded batch
    for i in range(8):
        n = int(batch["attention_mask"][i].sum())
        alone = model(**{k: v[i : i + 1, :n] for k, v in batch.items()}).cell_embeds
        torch.testing.assert_close(alone[0], full[i], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_same_gradients(pbmc_batch):
    batch, vocab = pbmc_batch
    torch.manual_seed(0)
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=vocab))
    probe = torch.randn(32)

    def grads():
        model.zero_grad()
        (model(**batch).last_hidden_state @ probe).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.activation_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.layers)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    assert plain["encoder.embedding.weight"].abs().sum() > 0


def test_mismatched_inputs_raise():
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny())
    with pytest.raises(ValueError, match="batch, genes"):
        model(gene_ids=torch.zeros(2, 5, dtype=torch.long), expression_values=torch.zeros(2, 4))


def test_save_load_round_trip(tmp_path, pbmc_batch):
    batch, vocab = pbmc_batch
    model = ScMMGPTCellModel(ScMMGPTCellConfig.tiny(vocab_size=vocab)).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, ScMMGPTCellModel)
    torch.testing.assert_close(loaded(**batch).cell_embeds, model(**batch).cell_embeds)
    np.testing.assert_array_equal(
        loaded.encoder.embedding.weight.detach().numpy(), model.encoder.embedding.weight.detach().numpy()
    )
