"""`ScMMGPTProcessor`: the cell tokenizer and a text tokenizer as one Hub-loadable object.

A prompt may contain the placeholder `<cell>`; the processor expands it to `<boc><cell_0>…<cell_{n-1}><eoc>`, one soft
token per Q-Former query, which the model fills with projected cell features (or, in a target, reads back to generate a
cell). The special tokens are added to the text tokenizer on construction.
"""

import copy
import re

import torch

from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

CELL_PLACEHOLDER = "<cell>"
BOC_TOKEN = "<boc>"
EOC_TOKEN = "<eoc>"
# The prompts the model is trained with (collators) and queried with (jobs); one place so that both agree.
DESCRIBE_PROMPT = "<cell> Describe this cell:"
# annotation continues the description prompt up to the name, as descriptions start "cell type: <name>. ..."
ANNOTATE_PROMPT = DESCRIBE_PROMPT + " cell type:"
GENERATE_PROMPT = "Generate a cell. {text} Cell:"


# a gene symbol as texts write it: letters, digits, '-' and '.' inside (HLA-DRA, RP11-34P13.7), not at the ends
_SYMBOL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.\-]*[A-Za-z0-9])?")


def qformer_text_inputs(tokenizer, texts: str | list[str], max_length: int, gene_vocab: dict | None = None,
                        return_tensors: str | None = "pt") -> dict:
    """The Q-Former's text arguments for `texts`: `qformer_input_ids`, `qformer_attention_mask` and, with
    `gene_vocab` (the cell tokenizer's symbol → id), `qformer_gene_ids` (batch, tokens): the id of the gene symbol
    each token belongs to, 0 for tokens naming no gene. Symbols match case-sensitively, as whole words ("CD14-positive"
    names CD14 unless it is a symbol itself)."""
    if gene_vocab is not None and return_tensors != "pt":
        raise ValueError(f"gene ids come as torch tensors: return_tensors='pt', got {return_tensors!r}")
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors=return_tensors,
                        return_offsets_mapping=gene_vocab is not None)
    if gene_vocab is None:
        return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}
    gene_ids = torch.zeros_like(encoded["input_ids"])
    for i, text in enumerate([texts] if isinstance(texts, str) else texts):
        spans = list(_mentions(text, gene_vocab))
        for t, (start, end) in enumerate(encoded["offset_mapping"][i].tolist()):
            gene_ids[i, t] = next((g for a, b, g in spans if end > start and a <= start and end <= b), 0)
    return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"],
            "qformer_gene_ids": gene_ids}


def _mentions(text: str, gene_vocab: dict):
    """(start, end, gene id) of each gene symbol in `text`; a hyphenated word that is no symbol ("CD14-positive")
    is read part by part."""
    for word in _SYMBOL.finditer(text):
        if word.group() in gene_vocab:
            yield word.start(), word.end(), gene_vocab[word.group()]
            continue
        for part in re.finditer(r"[A-Za-z0-9.]+", word.group()):
            if part.group() in gene_vocab:
                yield word.start() + part.start(), word.start() + part.end(), gene_vocab[part.group()]


def cell_slot_tokens(num_query_tokens: int) -> list[str]:
    """The text tokens of one cell: `<boc>`, `<cell_0>` … `<cell_{n-1}>`, `<eoc>`."""
    return [BOC_TOKEN] + [f"<cell_{i}>" for i in range(num_query_tokens)] + [EOC_TOKEN]


class ScMMGPTProcessor(ProcessorMixin):
    r"""
    Processor of scMMGPT: `feature_extractor` is a `ScMMGPTCellTokenizer`, `tokenizer` the LLM's text tokenizer and
    `qformer_tokenizer` the Q-Former's (BERT) tokenizer, for the stage-1 text side (defaults to `tokenizer`).

    `processor(cells=..., text=..., return_tensors="pt")` returns the text side (`input_ids`, `attention_mask`, with
    `<cell>` expanded) and the cell side (`gene_ids`, `expression_values`, `cell_attention_mask`).

    Args:
        feature_extractor: the cell tokenizer.
        tokenizer: the text tokenizer of the language model.
        qformer_tokenizer: the Q-Former's tokenizer (cell–text retrieval, stage 1).
        num_query_tokens: soft tokens per cell (the model's `num_query_tokens`).
    """

    def __init__(self, feature_extractor=None, tokenizer=None, qformer_tokenizer=None, num_query_tokens: int = 32,
                 chat_template=None, **kwargs):
        self.num_query_tokens = int(num_query_tokens)
        # a copy, so that the cell tokens added to the LLM's tokenizer stay out of the Q-Former's vocabulary
        qformer_tokenizer = copy.deepcopy(tokenizer) if qformer_tokenizer is None else qformer_tokenizer
        super().__init__(feature_extractor, tokenizer, qformer_tokenizer, chat_template=chat_template)
        self._add_cell_tokens()

    def qformer_text(self, text: str | list[str], return_tensors: str | None = "pt", max_length: int = 128,
                     gene_ids: bool = False):
        """Tokenise text for the Q-Former (label texts, stage-1 captions): `qformer_input_ids`,
        `qformer_attention_mask`, the stage-1 model's text arguments; with `gene_ids`, `qformer_gene_ids` too (the
        cell vocabulary's gene each token names, for a model with `text_gene_grounding`)."""
        vocab = self.feature_extractor.vocab if gene_ids else None
        return qformer_text_inputs(self.qformer_tokenizer, text, max_length, vocab, return_tensors)

    def _add_cell_tokens(self):
        tokens = cell_slot_tokens(self.num_query_tokens)
        missing = [t for t in tokens if t not in self.tokenizer.get_vocab()]
        if missing:
            self.tokenizer.add_tokens(missing, special_tokens=True)
        if self.tokenizer.pad_token is None:  # causal LM tokenizers often have none; padding needs one
            self.tokenizer.pad_token = self.tokenizer.eos_token or EOC_TOKEN

    @property
    def cell_slot_text(self) -> str:
        """What one `<cell>` placeholder expands to."""
        return "".join(cell_slot_tokens(self.num_query_tokens))

    @property
    def boc_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(BOC_TOKEN)

    @property
    def eoc_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(EOC_TOKEN)

    @property
    def cell_token_ids(self) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids([f"<cell_{i}>" for i in range(self.num_query_tokens)])

    def expand_cell_placeholders(self, text: str | list[str]) -> str | list[str]:
        """Replace every `<cell>` with the cell's soft-token slots."""
        if isinstance(text, str):
            return text.replace(CELL_PLACEHOLDER, self.cell_slot_text)
        return [t.replace(CELL_PLACEHOLDER, self.cell_slot_text) for t in text]

    def __call__(self, cells=None, text=None, gene_names=None, return_tensors=None, cell_kwargs=None, **text_kwargs):
        r"""
        Args:
            cells: AnnData / sparse / dense matrix (cells × genes), for the cell tokenizer.
            text: a prompt or a list of prompts, `<cell>` marking where each cell goes.
            gene_names: gene of each column when `cells` is a matrix.
            return_tensors: `"pt"` or `"np"`.
            cell_kwargs: extra arguments of the cell tokenizer (`max_genes`, `normalize`, `use_raw`, ...).
            text_kwargs: extra arguments of the text tokenizer (`padding`, `truncation`, `max_length`, ...).
        """
        if cells is None and text is None:
            raise ValueError("ScMMGPTProcessor needs `cells`, `text` or both")
        data = {}
        if text is not None:
            expanded = self.expand_cell_placeholders(text)
            text_kwargs.setdefault("padding", True)
            data.update(self.tokenizer(expanded, return_tensors=return_tensors, **text_kwargs))
            n_slots = sum(t.count(CELL_PLACEHOLDER) for t in ([text] if isinstance(text, str) else text))
            if cells is not None and n_slots and n_slots != cells.shape[0]:
                raise ValueError(f"the text has {n_slots} <cell> placeholders but {cells.shape[0]} cells were given")
        if cells is not None:
            encoded = self.feature_extractor(
                cells, gene_names=gene_names, return_tensors=return_tensors, **(cell_kwargs or {})
            )
            data["gene_ids"] = encoded["gene_ids"]
            data["expression_values"] = encoded["expression_values"]
            data["cell_attention_mask"] = encoded["attention_mask"]
        return BatchFeature(data=data, tensor_type=return_tensors)

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Saves the text tokenizer, `processor_config.json` (cell tokenizer settings inside) and `gene_vocab.json`."""
        self.feature_extractor.save_vocabulary(save_directory)
        return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)

    @property
    def model_input_names(self):
        return list(self.tokenizer.model_input_names) + ["gene_ids", "expression_values", "cell_attention_mask"]


__all__ = ["ScMMGPTProcessor", "cell_slot_tokens"]
