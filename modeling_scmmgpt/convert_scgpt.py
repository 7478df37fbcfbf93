"""Convert a real scGPT model folder into a `from_pretrained` folder of the scMMGPT cell encoder.

An scGPT folder (as published by bowang-lab, e.g. "whole-human") holds:
- `args.json`: the training arguments (`embsize`, `nheads`, `nlayers`, `d_hid`, `dropout`, `n_bins`, `input_style`,
  `input_emb_style`, `max_seq_len`, `pad_token`, `pad_value`, ...);
- `vocab.json`: gene → id, with `<pad>`, `<cls>`, `<eoc>` at arbitrary ids (at the end in the published models);
- `best_model.pt`: the `TransformerModel` state dict.

scGPT's transformer comes in two key layouts that hold the same numbers: flash-attention layers
(`transformer_encoder.layers.N.self_attn.Wqkv.*`, reshaped `(three, heads, head_dim)` after the projection) and
`nn.TransformerEncoderLayer` (`self_attn.in_proj_weight`, q, k, v stacked the same way). Both map onto our fused
`layers.N.self_attn.qkv_proj`. Only what produces the cell embedding is converted (gene encoder, value encoder,
transformer); the expression / MVC / classifier heads are reported as ignored.

Our tokenizer puts `<pad>`, `<cls>`, `<eoc>` at ids 0, 1, 2 and the genes after them in scGPT's id order, so the gene
embedding rows are permuted from scGPT's ids to ours.

Usage: `scmmgpt convert-scgpt SCGPT_DIR -o OUTPUT_DIR`.
"""

import argparse
import json
import os
import re
import warnings
from dataclasses import dataclass, field

import torch

from .configuration_scmmgpt import ScMMGPTCellConfig
from .feature_extraction_scmmgpt import SPECIAL_TOKENS, ScMMGPTCellTokenizer
from .modeling_cell_encoder import ScMMGPTCellModel

ARGS_FILE = "args.json"
SCGPT_VOCAB_FILE = "vocab.json"
WEIGHTS_FILE = "best_model.pt"

# wrappers a training script may leave on every key: DistributedDataParallel, torch.compile
KEY_PREFIXES = ("module.", "_orig_mod.")
LAYER_KEY = re.compile(r"^transformer_encoder\.layers\.(\d+)\.")
# keys that feed the cell embedding; an unconverted one of these means the conversion would be wrong, not partial
ENCODING_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.", "dsbn.")
# generative scGPT (FlashscGPTLayer) attends from "gen" genes to the input genes with this extra module; a cell's own
# genes never pass through it
GENERATION_ONLY = re.compile(r"^transformer_encoder\.layers\.\d+\.self_attn\.cross_attn\.")

# our name ← scGPT's name, per layer (attention is handled apart: it has two layouts)
LAYER_TABLE = {
    "self_attn.out_proj": "self_attn.out_proj",
    "linear1": "linear1",
    "linear2": "linear2",
    "norm1": "norm1",
    "norm2": "norm2",
}
QKV_LAYOUTS = {"flash-attention (Wqkv)": ("self_attn.Wqkv.weight", "self_attn.Wqkv.bias"),
               "nn.TransformerEncoderLayer (in_proj)": ("self_attn.in_proj_weight", "self_attn.in_proj_bias")}


@dataclass
class ConversionReport:
    """What a conversion did: the attention layout found, the scGPT keys used and those left out."""

    attention_layout: str = ""
    converted_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)

    def ignored_summary(self) -> str:
        """Ignored keys grouped by their top-level module, e.g. `decoder (6), mvc_decoder (4)`."""
        groups: dict[str, int] = {}
        for key in self.ignored_keys:
            groups[key.split(".", 1)[0]] = groups.get(key.split(".", 1)[0], 0) + 1
        return ", ".join(f"{name} ({n})" for name, n in groups.items()) or "nothing"


# ----------------------------------------------------------------------------------------------- reading the folder
def _read_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: an scGPT model folder holds {ARGS_FILE}, {SCGPT_VOCAB_FILE} "
                                f"and {WEIGHTS_FILE}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); expected scGPT's {what}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a {type(data).__name__}, expected a JSON object ({what})")
    return data


def load_scgpt_vocab(path: str) -> dict[str, int]:
    """scGPT's `vocab.json` (gene → id), with any missing special token appended after the last id, as scGPT's
    `embed_data` does. Ids must be exactly 0..len-1."""
    vocab = _read_json(path, "gene vocabulary (gene → id)")
    bad = [g for g, i in vocab.items() if not isinstance(i, int) or isinstance(i, bool)]
    if bad:
        raise ValueError(f"{path}: ids must be integers, got e.g. {bad[0]!r}: {vocab[bad[0]]!r}")
    vocab = dict(vocab)
    for token in SPECIAL_TOKENS:
        if token not in vocab:
            vocab[token] = len(vocab)
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{path}: gene ids must be 0..{len(vocab) - 1} with none repeated or skipped")
    return vocab


def load_scgpt_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The tensors of `best_model.pt`, read with `weights_only=True` (no arbitrary unpickling), keys unwrapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: an scGPT model folder holds {ARGS_FILE}, {SCGPT_VOCAB_FILE} "
                                f"and {WEIGHTS_FILE}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError, RuntimeError, EOFError, ... depending on the damage
        message = str(err)
        # torch wraps every weights-only failure in one long message; the reason follows "WeightsUnpickler error:"
        reason = " ".join(message.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].split())
        if "Unsupported global" in message:
            raise ValueError(
                f"{path} holds objects other than tensors and plain containers; it is refused because checkpoints "
                f"are read with torch.load(weights_only=True), never unpickled. Re-save it as a state dict "
                f"(torch.save(model.state_dict(), ...)). Detail: {reason.split('. Please use')[0]}"
            ) from err
        raise ValueError(
            f"{path} is not a readable PyTorch checkpoint (truncated, damaged or not written by torch.save): "
            f"{type(err).__name__}: {reason[:300]}"
        ) from err
    if isinstance(obj, dict):
        for wrapper in ("model_state_dict", "state_dict", "model"):  # full training checkpoints nest the weights
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not any(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path} holds a {type(obj).__name__} without tensors, not an scGPT state dict")
    state_dict = {}
    for key, value in obj.items():
        if not torch.is_tensor(value):
            continue
        for prefix in KEY_PREFIXES:
            key = key[len(prefix):] if key.startswith(prefix) else key
        # newer scGPT wraps flash-attn 2 behind a compatibility module: self_attn._impl.Wqkv
        state_dict[key.replace(".self_attn._impl.", ".self_attn.")] = value
    return state_dict


def load_scgpt_folder(scgpt_dir: str) -> tuple[dict, dict[str, int], dict[str, torch.Tensor]]:
    """(`args.json`, `vocab.json`, state dict) of an scGPT model folder."""
    if not os.path.isdir(scgpt_dir):
        raise FileNotFoundError(f"{scgpt_dir} is not a folder; expected an scGPT model folder")
    args = _read_json(os.path.join(scgpt_dir, ARGS_FILE), "training arguments")
    vocab = load_scgpt_vocab(os.path.join(scgpt_dir, SCGPT_VOCAB_FILE))
    state_dict = load_scgpt_state_dict(os.path.join(scgpt_dir, WEIGHTS_FILE))
    return args, vocab, state_dict


# ----------------------------------------------------------------------------------------------- config
def _arg(args: dict, *names, default=None):
    for name in names:
        if args.get(name) is not None:
            return args[name]
    return default


def _require(state_dict: dict, key: str, shape: tuple | None = None) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"the scGPT checkpoint has no `{key}`, which the cell encoder needs")
    tensor = state_dict[key]
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(f"`{key}` has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
    return tensor


def _check_matches(what: str, from_args, from_weights: int):
    if from_args is not None and int(from_args) != from_weights:
        raise ValueError(f"{ARGS_FILE} says {what} = {from_args} but the checkpoint's weights have {from_weights}")


def scgpt_cell_config(args: dict, vocab: dict[str, int], state_dict: dict, max_genes: int | None = None):
    """`ScMMGPTCellConfig` and tokenizer settings for a checkpoint. Shapes come from the weights and are checked
    against `args.json`; the number of heads, which weights cannot tell, comes from `args.json`."""
    if _arg(args, "pre_norm"):
        raise ValueError(f"{ARGS_FILE} has pre_norm = true; the scMMGPT cell encoder is post-norm (scGPT's default)")
    if _arg(args, "domain_spec_batchnorm", "DSBN") or any(k.startswith("dsbn.") for k in state_dict):
        raise ValueError("the checkpoint uses domain-specific batch norm (dsbn.*), which changes the cell embedding "
                         "per batch; the scMMGPT cell encoder has no such layer")
    emb_style = _arg(args, "input_emb_style", default="continuous")
    if emb_style not in ("continuous", "category"):
        raise ValueError(f"{ARGS_FILE} has input_emb_style = {emb_style!r}; only 'continuous' and 'category' convert")

    embedding = _require(state_dict, "encoder.embedding.weight")
    if embedding.dim() != 2:
        raise ValueError(f"`encoder.embedding.weight` has shape {tuple(embedding.shape)}, expected (tokens, embsize)")
    vocab_size, hidden = embedding.shape
    if vocab_size != len(vocab):
        raise ValueError(f"`encoder.embedding.weight` has {vocab_size} rows but {SCGPT_VOCAB_FILE} has {len(vocab)} "
                         "tokens (specials included); the vocabulary does not belong to this checkpoint")
    _check_matches("embsize", _arg(args, "embsize", "d_model"), hidden)
    heads = _arg(args, "nheads", "nhead")
    if heads is None:
        raise ValueError(f"{ARGS_FILE} has no `nheads` (number of attention heads), which the weights cannot tell")
    if hidden % int(heads):
        raise ValueError(f"embsize {hidden} is not divisible by nheads {heads}")
    layer_ids = sorted({int(m.group(1)) for k in state_dict if (m := LAYER_KEY.match(k))})
    n_layers = int(_arg(args, "nlayers", default=len(layer_ids)))
    if not n_layers:
        raise ValueError("the checkpoint has no `transformer_encoder.layers.N.*` weights")
    extra = [i for i in layer_ids if i >= n_layers]
    if extra:
        raise ValueError(f"the checkpoint has transformer_encoder.layers.{extra[0]} but {ARGS_FILE} says nlayers = "
                         f"{n_layers}")
    intermediate = _require(state_dict, "transformer_encoder.layers.0.linear1.weight").shape[0]
    _check_matches("d_hid", _arg(args, "d_hid", "dim_feedforward"), intermediate)

    n_bins = int(_arg(args, "n_bins", "n_input_bins", default=51))
    # scGPT's whole-human model bins each cell's values (input_style "binned") and feeds the bin numbers to the
    # continuous value MLP; the tokenizer's value mode follows input_style, the encoder's follows input_emb_style
    input_style = _arg(args, "input_style", default="binned")
    if emb_style == "category" or input_style == "binned":
        tokenizer_mode, normalize = "binned", False  # quantile bins: scGPT bins the matrix it is given
    else:
        tokenizer_mode, normalize = "continuous", True
        if input_style != "log1p":
            warnings.warn(f"{ARGS_FILE} has input_style = {input_style!r}; the tokenizer gives log1p-normalised "
                          "values, pass normalize=False with your own normalisation if that differs", stacklevel=2)
    config_bins = n_bins
    if emb_style == "category":  # the bin embedding carries extra rows (scGPT: pad and mask values after the bins)
        config_bins = _require(state_dict, "value_encoder.embedding.weight").shape[0]
        if config_bins < n_bins:
            raise ValueError(f"`value_encoder.embedding.weight` has {config_bins} rows, fewer than n_bins = {n_bins}")
    if max_genes is None:  # scGPT's max_seq_len counts the <cls> token
        max_genes = int(_arg(args, "max_seq_len", default=ScMMGPTCellConfig.max_genes + 1)) - 1
    pad_value = float(_arg(args, "pad_value", default=-2))
    dropout = float(_arg(args, "dropout", default=0.2))

    config = ScMMGPTCellConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=int(heads),
        intermediate_size=intermediate,
        hidden_act="relu",
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        layer_norm_eps=1e-5,
        input_value_mode="continuous" if emb_style == "continuous" else "binned",
        n_bins=config_bins,
        max_genes=max_genes,
        pad_token_id=0,
        cls_token_id=1,
        pad_value=pad_value,
    )
    tokenizer_kwargs = dict(max_genes=max_genes, normalize=normalize, input_value_mode=tokenizer_mode,
                            n_bins=n_bins, pad_value=pad_value,
                            # scGPT's `embed_data` gives <cls> the pad value; doing the same reproduces its embeddings
                            cls_value=pad_value)
    return config, tokenizer_kwargs


# ----------------------------------------------------------------------------------------------- weights
def convert_state_dict(
    state_dict: dict[str, torch.Tensor], config: ScMMGPTCellConfig, row_order: torch.Tensor
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Our state dict from scGPT's. `row_order[i]` is the scGPT id of our token `i`. Raises `ValueError` naming any
    missing or misshapen key, or any unconverted key that would change the cell embedding."""
    d, ff = config.hidden_size, config.intermediate_size
    report = ConversionReport()
    out: dict[str, torch.Tensor] = {}

    def take(ours: str, theirs: str, shape: tuple):
        out[ours] = _require(state_dict, theirs, shape).float()
        report.converted_keys.append(theirs)

    take("encoder.embedding.weight", "encoder.embedding.weight", (config.vocab_size, d))
    out["encoder.embedding.weight"] = out["encoder.embedding.weight"][row_order].contiguous()
    for p in ("weight", "bias"):
        take(f"encoder.enc_norm.{p}", f"encoder.enc_norm.{p}", (d,))
    if config.input_value_mode == "continuous":
        shapes = {"linear1": {"weight": (d, 1), "bias": (d,)}, "linear2": {"weight": (d, d), "bias": (d,)},
                  "norm": {"weight": (d,), "bias": (d,)}}
        for module, params in shapes.items():
            for p, shape in params.items():
                take(f"value_encoder.{module}.{p}", f"value_encoder.{module}.{p}", shape)
    else:
        take("value_encoder.embedding.weight", "value_encoder.embedding.weight", (config.n_bins, d))
        for p in ("weight", "bias"):
            take(f"value_encoder.enc_norm.{p}", f"value_encoder.enc_norm.{p}", (d,))

    layouts = set()
    linear_shapes = {"self_attn.out_proj": (d, d), "linear1": (ff, d), "linear2": (d, ff), "norm1": None,
                     "norm2": None}
    for i in range(config.num_hidden_layers):
        src, dst = f"transformer_encoder.layers.{i}.", f"layers.{i}."
        layout = next((name for name, (w, _) in QKV_LAYOUTS.items() if src + w in state_dict), None)
        if layout is None:
            raise ValueError(f"the scGPT checkpoint has neither `{src}self_attn.Wqkv.weight` nor "
                             f"`{src}self_attn.in_proj_weight`, which the cell encoder needs")
        layouts.add(layout)
        weight, bias = QKV_LAYOUTS[layout]
        # Wqkv and in_proj both stack [q; k; v], each split into heads contiguously: our qkv_proj takes them as they are
        take(dst + "self_attn.qkv_proj.weight", src + weight, (3 * d, d))
        take(dst + "self_attn.qkv_proj.bias", src + bias, (3 * d,))
        for theirs, ours in LAYER_TABLE.items():
            weight_shape = linear_shapes[theirs] or (d,)
            take(f"{dst}{ours}.weight", f"{src}{theirs}.weight", weight_shape)
            take(f"{dst}{ours}.bias", f"{src}{theirs}.bias", (weight_shape[0],))
    if len(layouts) > 1:
        raise ValueError(f"the checkpoint mixes attention key layouts across layers: {sorted(layouts)}")
    report.attention_layout = layouts.pop()

    used = set(report.converted_keys)
    for key in state_dict:
        if key in used:
            continue
        if key.startswith(ENCODING_PREFIXES) and not GENERATION_ONLY.match(key):
            raise ValueError(f"the scGPT checkpoint has `{key}`, which would change the cell embedding but has no "
                             "place in the scMMGPT cell encoder")
        report.ignored_keys.append(key)
    return out, report


def convert_scgpt(
    scgpt_dir: str, output_dir: str | None = None, max_genes: int | None = None
) -> tuple[ScMMGPTCellModel, ScMMGPTCellTokenizer, ConversionReport]:
    """Convert the scGPT folder `scgpt_dir`; with `output_dir`, save model (safetensors), config and tokenizer there
    for `AutoModel.from_pretrained` / `AutoFeatureExtractor.from_pretrained`."""
    args, vocab, state_dict = load_scgpt_folder(scgpt_dir)
    config, tokenizer_kwargs = scgpt_cell_config(args, vocab, state_dict, max_genes=max_genes)
    tokenizer = ScMMGPTCellTokenizer.from_scgpt_vocab(vocab, **tokenizer_kwargs)
    # scGPT id of each of our ids, through the tokens themselves
    row_order = torch.tensor([vocab[token] for token, _ in sorted(tokenizer.vocab.items(), key=lambda kv: kv[1])])
    weights, report = convert_state_dict(state_dict, config, row_order)
    model = ScMMGPTCellModel(config)
    model.load_state_dict(weights, strict=True)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        tokenizer.save_pretrained(output_dir)
    return model, tokenizer, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scmmgpt convert-scgpt",
        description=f"Convert an scGPT model folder ({ARGS_FILE}, {SCGPT_VOCAB_FILE}, {WEIGHTS_FILE}) into a "
        "from_pretrained folder of the scMMGPT cell encoder (safetensors weights, config, gene tokenizer).",
    )
    parser.add_argument("scgpt_dir", help="the scGPT model folder")
    parser.add_argument("-o", "--output", required=True, help="folder to write the converted model into")
    parser.add_argument("--max-genes", type=int, default=None,
                        help="most gene tokens per cell (default: the checkpoint's max_seq_len - 1)")
    args = parser.parse_args(argv)
    model, tokenizer, report = convert_scgpt(args.scgpt_dir, args.output, max_genes=args.max_genes)
    config = model.config
    print(
        f"converted {len(report.converted_keys)} tensors ({report.attention_layout} attention) into "
        f"{config.num_hidden_layers} layers x {config.hidden_size} wide, {config.num_attention_heads} heads, "
        f"{len(tokenizer)} tokens; {config.input_value_mode} value encoder, {tokenizer.input_value_mode} tokens"
    )
    print(f"ignored (heads not used for cell embeddings): {report.ignored_summary()}")
    print(f"saved to {args.output}")
    return 0


__all__ = ["ConversionReport", "convert_scgpt", "convert_state_dict", "load_scgpt_folder", "load_scgpt_state_dict",
           "load_scgpt_vocab", "scgpt_cell_config", "main"]
