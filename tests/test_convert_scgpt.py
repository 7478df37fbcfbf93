"""scGPT checkpoint conversion: a synthetic scGPT folder in scGPT's exact layout and file format (args.json, vocab.json,
best_model.pt), a reference forward written the scGPT way, and the converted encoder reproducing it on real PBMC cells."""

import json
import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import modeling_scmmgpt  # noqa: F401  (registers the Auto classes)
from modeling_scmmgpt.convert_scgpt import convert_scgpt

D_MODEL, N_HEADS, D_HID, N_LAYERS, N_BINS, MAX_SEQ_LEN = 32, 4, 48, 2, 51, 65
N_CELLS = 6


# ------------------------------------------------------------------------------------- scGPT, as scGPT writes it
class GeneEncoder(nn.Module):
    def __init__(self, ntoken, padding_idx):
        super().__init__()
        self.embedding = nn.Embedding(ntoken, D_MODEL, padding_idx=padding_idx)
        self.enc_norm = nn.LayerNorm(D_MODEL)

    def forward(self, x):
        return self.enc_norm(self.embedding(x))


class ContinuousValueEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(1, D_MODEL)
        self.activation = nn.ReLU()
        self.linear2 = nn.Linear(D_MODEL, D_MODEL)
        self.norm = nn.LayerNorm(D_MODEL)

    def forward(self, x):
        x = torch.clamp(x.unsqueeze(-1), max=512)
        return self.norm(self.linear2(self.activation(self.linear1(x))))


class CategoryValueEncoder(GeneEncoder):  # scGPT's is the same embedding + LayerNorm, on bin numbers
    def forward(self, x):
        return super().forward(x.long())


class ScGPTReference(nn.Module):
    """scGPT's `TransformerModel` encoding path (torch `nn.TransformerEncoder`, post-norm, batch_first) with the same
    module names, plus heads the converter must ignore."""

    def __init__(self, ntoken, pad_id, emb_style, pad_value):
        super().__init__()
        self.encoder = GeneEncoder(ntoken, pad_id)
        self.flag_encoder = nn.Embedding(2, D_MODEL)
        if emb_style == "continuous":
            self.value_encoder = ContinuousValueEncoder()
        else:  # scGPT's category tutorials: pad_value = n_bins, mask_value = n_bins + 1, n_bins + 2 rows
            self.value_encoder = CategoryValueEncoder(N_BINS + 2, padding_idx=int(pad_value))
        layer = nn.TransformerEncoderLayer(D_MODEL, N_HEADS, D_HID, dropout=0.2, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, N_LAYERS, enable_nested_tensor=False)
        self.decoder = nn.Module()
        self.decoder.fc = nn.Sequential(nn.Linear(D_MODEL, D_MODEL), nn.LeakyReLU(), nn.Linear(D_MODEL, 1))
        self.mvc_decoder = nn.Module()
        self.mvc_decoder.gene2query = nn.Linear(D_MODEL, D_MODEL)
        self.mvc_decoder.W = nn.Linear(D_MODEL, D_MODEL, bias=False)
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():  # far from the default init, so that a misplaced tensor shows
            for name, param in self.named_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3 + (1.0 if "norm" in name and
                                                                                    name.endswith("weight") else 0.0))
        self.eval()

    @torch.no_grad()
    def cell_embeddings(self, src, values, src_key_padding_mask):
        total_embs = self.encoder(src) + self.value_encoder(values)
        return self.transformer_encoder(total_embs, src_key_padding_mask=src_key_padding_mask)[:, 0, :]


def scgpt_vocab(genes, specials_at):
    """gene → id with shuffled gene ids and `<pad>`, `<cls>`, `<eoc>` at the end or in the middle."""
    rng = np.random.default_rng(0)
    genes = [genes[i] for i in rng.permutation(len(genes))]
    specials = ["<cls>", "<eoc>", "<pad>"]  # not our order
    tokens = genes + specials if specials_at == "end" else genes[:100] + specials + genes[100:]
    return {token: i for i, token in enumerate(tokens)}


def write_scgpt_folder(path, genes, layout="in_proj", input_style="log1p", emb_style="continuous", edit=None):
    """Write args.json, vocab.json and best_model.pt the way scGPT does; returns (reference model, vocab)."""
    path.mkdir(parents=True, exist_ok=True)
    vocab = scgpt_vocab(genes, "end" if layout == "in_proj" else "middle")
    pad_value = N_BINS if emb_style == "category" else -2
    reference = ScGPTReference(len(vocab), vocab["<pad>"], emb_style, pad_value)
    args = {
        "data_source": "synthetic", "pad_token": "<pad>", "input_style": input_style, "input_emb_style": emb_style,
        "n_bins": N_BINS, "max_seq_len": MAX_SEQ_LEN, "mask_ratio": [0.25, 0.5, 0.75], "fast_transformer": layout == "Wqkv",
        "nlayers": N_LAYERS, "nheads": N_HEADS, "embsize": D_MODEL, "d_hid": D_HID, "dropout": 0.2, "n_layers_cls": 3,
        "mask_value": -1, "pad_value": pad_value, "MVC": True, "USE_GENERATIVE_TRAINING": layout == "Wqkv",
    }
    state = OrderedDict((k, v.clone()) for k, v in reference.state_dict().items())
    if layout == "Wqkv":  # flash-attention layers: same numbers under Wqkv, plus the generative cross-attention
        state = OrderedDict(
            (k.replace("self_attn.in_proj_weight", "self_attn.Wqkv.weight").replace(
                "self_attn.in_proj_bias", "self_attn.Wqkv.bias"), v) for k, v in state.items()
        )
        for i in range(N_LAYERS):
            prefix = f"transformer_encoder.layers.{i}.self_attn.cross_attn."
            state[prefix + "out_proj.weight"] = torch.randn(D_MODEL, D_MODEL)
            state[prefix + "out_proj.bias"] = torch.randn(D_MODEL)
    if edit is not None:
        edit(args, state)
    (path / "args.json").write_text(json.dumps(args, indent=4))
    (path / "vocab.json").write_text(json.dumps(vocab, indent=4))
    torch.save(state, path / "best_model.pt")
    return reference, vocab


def reference_cell_embeddings(reference, vocab, tokenizer, batch):
    """scGPT's embeddings of our tokens: our ids mapped back to scGPT's through the tokens themselves."""
    ours_to_scgpt = torch.empty(len(tokenizer), dtype=torch.long)
    for token, our_id in tokenizer.vocab.items():
        ours_to_scgpt[our_id] = vocab[token]
    src = ours_to_scgpt[batch["gene_ids"]]
    return reference.cell_embeddings(src, batch["expression_values"], batch["attention_mask"] == 0)


@pytest.fixture(scope="module")
def pbmc_genes(pbmc):
    return list(pbmc.raw.var_names) + ["FAKE1", "FAKE2", "FAKE3", "FAKE4"]


# ------------------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize(
    "layout,input_style,emb_style",
    [("in_proj", "log1p", "continuous"), ("Wqkv", "binned", "continuous"), ("Wqkv", "binned", "category")],
)
def test_converted_encoder_reproduces_scgpt(tmp_path, pbmc, pbmc_genes, layout, input_style, emb_style):
    reference, vocab = write_scgpt_folder(tmp_path / "scgpt", pbmc_genes, layout, input_style, emb_style)
    model, tokenizer, report = convert_scgpt(str(tmp_path / "scgpt"))

    assert len(tokenizer) == len(vocab) and [tokenizer.vocab[t] for t in ("<pad>", "<cls>", "<eoc>")] == [0, 1, 2]
    assert (model.config.pad_token_id, model.config.cls_token_id, model.config.max_genes) == (0, 1, MAX_SEQ_LEN - 1)
    assert tokenizer.input_value_mode == ("continuous" if input_style == "log1p" else "binned")
    assert model.config.input_value_mode == ("continuous" if emb_style == "continuous" else "binned")
    assert report.attention_layout.startswith("flash" if layout == "Wqkv" else "nn.Transformer")
    ignored_modules = {k.split(".")[0] for k in report.ignored_keys}
    assert ignored_modules == {"decoder", "mvc_decoder", "flag_encoder"} | ({"transformer_encoder"} if layout == "Wqkv" else set())

    batch = tokenizer(pbmc[:N_CELLS], use_raw=True, normalize=False, return_tensors="pt")
    assert batch["attention_mask"].sum(1).min() > 10 and batch["gene_ids"].shape[1] == MAX_SEQ_LEN
    expected = reference_cell_embeddings(reference, vocab, tokenizer, batch)
    with torch.no_grad():
        got = model(**batch).cell_embeds
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert expected.std(0).mean() > 0.05  # the cells differ: the check is not vacuous


def test_cli_folder_loads_with_auto_classes(tmp_path, pbmc, pbmc_genes, capsys):
    from transformers import AutoFeatureExtractor, AutoModel

    from modeling_scmmgpt.cli import main

    reference, vocab = write_scgpt_folder(tmp_path / "scgpt", pbmc_genes, "Wqkv", "binned", "continuous")
    assert main(["convert-scgpt", str(tmp_path / "scgpt"), "-o", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "decoder" in printed and "saved to" in printed
    assert (tmp_path / "out" / "model.safetensors").exists() and not list((tmp_path / "out").glob("*.bin"))

    model = AutoModel.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoFeatureExtractor.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "ScMMGPTCellModel" and tokenizer.input_value_mode == "binned"
    assert tokenizer.cls_value == tokenizer.pad_value == model.config.pad_value  # as scGPT's embed_data
    batch = tokenizer(pbmc[:N_CELLS], use_raw=True, normalize=False, return_tensors="pt")
    with torch.no_grad():
        got = model(**batch).cell_embeds
    torch.testing.assert_close(got, reference_cell_embeddings(reference, vocab, tokenizer, batch), atol=1e-5, rtol=1e-5)

    with pytest.raises(SystemExit) as exit_info:
        main(["convert-scgpt", "--help"])
    assert exit_info.value.code == 0 and "-o OUTPUT" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- bad checkpoints
def test_missing_or_misshapen_key_is_named(tmp_path, pbmc_genes):
    missing = "transformer_encoder.layers.1.linear2.weight"
    write_scgpt_folder(tmp_path / "a", pbmc_genes, edit=lambda args, state: state.pop(missing))
    with pytest.raises(ValueError, match=re.escape(missing)):
        convert_scgpt(str(tmp_path / "a"))

    def misshape(args, state):
        state["value_encoder.linear2.weight"] = torch.zeros(D_MODEL, D_MODEL + 1)

    write_scgpt_folder(tmp_path / "b", pbmc_genes, edit=misshape)
    with pytest.raises(ValueError, match=r"value_encoder\.linear2\.weight.*\(32, 33\)"):
        convert_scgpt(str(tmp_path / "b"))

    write_scgpt_folder(tmp_path / "c", pbmc_genes, edit=lambda args, state: args.pop("nheads"))
    with pytest.raises(ValueError, match="nheads"):
        convert_scgpt(str(tmp_path / "c"))

    def final_norm(args, state):  # would change the embedding: refused rather than dropped
        state["transformer_encoder.norm.weight"] = torch.ones(D_MODEL)

    write_scgpt_folder(tmp_path / "d", pbmc_genes, edit=final_norm)
    with pytest.raises(ValueError, match=r"transformer_encoder\.norm\.weight"):
        convert_scgpt(str(tmp_path / "d"))


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, pbmc_genes):
    folder = tmp_path / "scgpt"
    write_scgpt_folder(folder, pbmc_genes)
    weights = folder / "best_model.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"best_model\.pt is not a readable PyTorch checkpoint"):
        convert_scgpt(str(folder))
    weights.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(ValueError, match=r"best_model\.pt is not a readable PyTorch checkpoint"):
        convert_scgpt(str(folder))


UNPICKLED = []


def _record_unpickling():
    UNPICKLED.append(True)
    return "payload"


class NotATensor:
    def __reduce__(self):  # runs `_record_unpickling` if anything unpickles this object
        return (_record_unpickling, ())


def test_pickle_with_objects_is_refused(tmp_path, pbmc_genes):
    folder = tmp_path / "scgpt"
    write_scgpt_folder(folder, pbmc_genes)
    state = torch.load(folder / "best_model.pt", weights_only=True)
    state["payload"] = NotATensor()
    torch.save(state, folder / "best_model.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert_scgpt(str(folder))
    assert UNPICKLED == []

