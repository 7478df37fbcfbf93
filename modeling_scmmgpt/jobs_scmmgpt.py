"""The jobs of scMMGPT as model methods: `embed`, `annotate`, `describe`, `generate_cells`.

They take cells as an AnnData, a scipy.sparse matrix or a numpy array (with `gene_names`), batch them, and need the
model's `ScMMGPTProcessor`: pass `processor=`, attach one with `model.processor = processor`, or load the model from a
folder that holds one.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .processing_scmmgpt import ANNOTATE_PROMPT, DESCRIBE_PROMPT, GENERATE_PROMPT

LIKELIHOOD_SEQUENCES_PER_FORWARD = 256  # (cells × labels) sequences scored per LLM forward


@dataclass
class CellAnnotation:
    """`predictions[i]` is the label of cell i; `scores` (cells × labels) the method's score of each label."""

    predictions: list[str]
    scores: np.ndarray
    labels: list[str]


@dataclass
class GeneratedCells:
    """Pseudo-cells: `expression` (cells × genes) log1p-normalised expression, one row per (text, draw)."""

    expression: np.ndarray
    gene_names: list[str]
    texts: list[str]

    def to_anndata(self):
        import anndata  # optional dependency, needed only here

        import pandas as pd

        obs = pd.DataFrame({"prompt": self.texts}, index=[f"pseudo_{i}" for i in range(len(self.texts))])
        return anndata.AnnData(X=self.expression.astype(np.float32), obs=obs, var=pd.DataFrame(index=self.gene_names))


# ---------------------------------------------------------------------------------------------------- model kinds
@dataclass(frozen=True)
class ModelKind:
    """One kind of saved scMMGPT folder: which class loads it (`auto_class` over `config_class`, defined in `module`)
    and which jobs it can do."""

    name: str
    architecture: str
    config_class: str
    auto_class: str
    module: str
    jobs: tuple[str, ...]
    annotation_methods: tuple[str, ...] = ()


_KINDS = (
    ModelKind("stage2", "ScMMGPTForConditionalGeneration", "ScMMGPTConfig", "AutoModelForCausalLM", "modeling_scmmgpt",
              ("annotate", "describe", "embed", "generate_cells"), ("retrieval", "likelihood", "generate")),
    ModelKind("stage1", "ScMMGPTModel", "ScMMGPTConfig", "AutoModel", "modeling_scmmgpt", ("annotate", "embed"),
              ("retrieval",)),
    ModelKind("classifier", "ScMMGPTCellForClassification", "ScMMGPTCellConfig", "AutoModelForSequenceClassification",
              "modeling_cell_classification", ("annotate", "embed"), ("classifier",)),
    ModelKind("encoder", "ScMMGPTCellForMaskedValuePrediction", "ScMMGPTCellConfig", "AutoModelForMaskedLM",
              "modeling_cell_pretraining", ("embed",)),
    ModelKind("encoder", "ScMMGPTCellModel", "ScMMGPTCellConfig", "AutoModel", "modeling_cell_encoder", ("embed",)),
)
# architecture (as `config.json` names it) → its kind: the one place that decides what a folder is and can do
MODEL_KINDS = {kind.architecture: kind for kind in _KINDS}
JOB_NAMES = {"annotate": "cell type annotation", "describe": "cell descriptions", "embed": "cell embeddings",
             "generate_cells": "pseudo-cell generation"}


def model_kind(config) -> ModelKind:
    """The kind of a folder from its config (a `config.json` dict or a config object); ValueError for folders that
    are not scMMGPT's."""
    architectures = (config.get("architectures") if isinstance(config, dict) else config.architectures) or []
    for architecture in architectures:
        if architecture in MODEL_KINDS:
            return MODEL_KINDS[architecture]
    raise ValueError(f"the model's config names architectures {list(architectures)}, none of which is scMMGPT's "
                     f"({sorted(MODEL_KINDS)}); save the model with save_pretrained first")


def require_job(kind: ModelKind, job: str) -> None:
    """One-line ValueError when a model of `kind` cannot do `job`."""
    if job not in kind.jobs:
        able = [k.name for k in _KINDS if job in k.jobs]
        raise ValueError(f"{JOB_NAMES.get(job, job)} needs a {' or '.join(dict.fromkeys(able))} model; this is a "
                         f"{kind.name} model ({kind.architecture}), which does: {', '.join(kind.jobs)}")


def _n_cells(cells) -> int:
    return cells.n_obs if hasattr(cells, "n_obs") else cells.shape[0]


def cell_batches(cells, feature_extractor, gene_names, batch_size, progress, desc, device, **cell_kwargs):
    """Yield (start, tokenised cells on `device`: `gene_ids`, `expression_values`, `cell_attention_mask`) over `cells`
    (AnnData, scipy.sparse or numpy) in batches, through the model's cell tokenizer."""
    total = _n_cells(cells)
    if total == 0:
        raise ValueError("no cells were given")
    for start in tqdm(range(0, total, batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = cells[start : start + batch_size]
        encoded = feature_extractor(chunk, gene_names=gene_names, return_tensors="pt", **cell_kwargs)
        yield start, {
            "gene_ids": encoded["gene_ids"].to(device),
            "expression_values": encoded["expression_values"].to(device),
            "cell_attention_mask": encoded["attention_mask"].to(device),
        }


class CellTextJobsMixin:
    """Mixed into the scMMGPT models; `self.alignment_model` is the stage-1 part (the model itself in stage 1)."""

    processor = None

    @property
    def alignment_model(self):
        return getattr(self, "scmmgpt", self)

    # ---------------------------------------------------------------------------------------------- helpers
    def _get_processor(self, processor):
        processor = processor or self.processor
        if processor is None and getattr(self, "name_or_path", None):
            from transformers import AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(self.name_or_path, trust_remote_code=True)
            except (OSError, ValueError):
                processor = None
            self.processor = processor
        if processor is None:
            raise ValueError("this job needs the model's ScMMGPTProcessor: pass processor=..., set model.processor, "
                             "or save the processor into the model folder")
        return processor

    def _cell_batches(self, cells, processor, gene_names, batch_size, progress, desc, **cell_kwargs):
        """Yield (start, tokenised cells on the model's device) over `cells` in batches."""
        return cell_batches(cells, processor.feature_extractor, gene_names, batch_size, progress, desc, self.device,
                            **cell_kwargs)

    # ---------------------------------------------------------------------------------------------- embeddings
    @torch.inference_mode()
    def embed(self, cells, gene_names=None, processor=None, space: str = "encoder", batch_size: int = 64,
              progress: bool = False, **cell_kwargs) -> np.ndarray:
        """Cell embeddings, (cells, dim): `space="encoder"` gives the cell encoder's `<cls>` embedding (scGPT's cell
        embedding), `space="aligned"` the normalised features in the shared cell–text space."""
        if space not in ("encoder", "aligned"):
            raise ValueError(f"space must be 'encoder' or 'aligned', got {space!r}")
        processor, model = self._get_processor(processor), self.alignment_model
        out = []
        for _, batch in self._cell_batches(cells, processor, gene_names, batch_size, progress, "embed", **cell_kwargs):
            if space == "encoder":
                out.append(model.cell_model(batch["gene_ids"], batch["expression_values"], batch["cell_attention_mask"]).cell_embeds)
            else:
                out.append(model.get_cell_features(**batch))
        return torch.cat(out).float().cpu().numpy()

    # ---------------------------------------------------------------------------------------------- annotation
    @torch.inference_mode()
    def label_text_features(self, label_texts: list[str], processor=None) -> torch.Tensor:
        processor = self._get_processor(processor)
        encoded = processor.qformer_text(label_texts, max_length=self.config.max_text_length)
        return self.alignment_model.get_text_features(encoded["input_ids"].to(self.device),
                                                      encoded["attention_mask"].to(self.device))

    @torch.inference_mode()
    def annotate(self, cells, labels: list[str], method: str = "retrieval", label_texts: list[str] | None = None,
                 gene_names=None, processor=None, batch_size: int = 64, progress: bool = False,
                 **cell_kwargs) -> CellAnnotation:
        """Assign each cell one of `labels`.

        - `"retrieval"` (zero-shot, stage 1 and 2): cosine similarity of cell features to the features of
          `label_texts` (default `"cell type: {label}."`; give `"cell type: X. <definition>"` texts for better recall);
        - `"likelihood"` (stage 2): mean log-probability of each label name after `ANNOTATE_PROMPT` under the LLM,
          all labels of a batch of cells in one forward pass;
        - `"generate"` (stage 2): greedy generation after the same prompt, matched to the closest label.
        """
        labels = [str(label) for label in labels]
        if not labels or len(set(labels)) != len(labels):
            raise ValueError("labels must be a non-empty list of distinct names")
        if label_texts is not None and len(label_texts) != len(labels):
            raise ValueError(f"{len(label_texts)} label_texts for {len(labels)} labels")
        processor = self._get_processor(processor)
        batches = self._cell_batches(cells, processor, gene_names, batch_size, progress, f"annotate ({method})",
                                     **cell_kwargs)
        if method == "retrieval":
            text = self.label_text_features(label_texts or [f"cell type: {label}." for label in labels], processor)
            scores = [self.alignment_model.get_cell_features(**batch) @ text.T for _, batch in batches]
        elif method == "likelihood":
            self._require_language_model(method)
            scores = [self._label_log_likelihoods(batch, labels, processor) for _, batch in batches]
        elif method == "generate":
            self._require_language_model(method)
            scores = [self._generated_label_scores(batch, labels, processor) for _, batch in batches]
        else:
            raise ValueError(f"method must be 'retrieval', 'likelihood' or 'generate', got {method!r}")
        scores = torch.cat([torch.as_tensor(s) for s in scores]).float().cpu().numpy()
        return CellAnnotation(predictions=[labels[i] for i in scores.argmax(1)], scores=scores, labels=labels)

    def _require_language_model(self, job: str):
        if getattr(self, "language_model", None) is None:
            raise ValueError(f"{job} needs the stage-2 model (ScMMGPTForConditionalGeneration) with its LLM")

    @torch.inference_mode()
    def _label_log_likelihoods(self, batch, labels, processor) -> torch.Tensor:
        """(cells, labels) mean token log-probability of each label name continuing the annotation prompt."""
        tokenizer = processor.tokenizer
        prompt = tokenizer(processor.expand_cell_placeholders(ANNOTATE_PROMPT), return_tensors="pt")["input_ids"][0]
        candidates = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in labels]
        n_cells, n_labels, n_prompt = batch["gene_ids"].shape[0], len(labels), len(prompt)
        width = n_prompt + max(len(c) for c in candidates)
        ids = torch.full((n_labels, width), tokenizer.pad_token_id, dtype=torch.long)
        target = torch.zeros(n_labels, width, dtype=torch.bool)
        for j, cand in enumerate(candidates):
            ids[j, :n_prompt], ids[j, n_prompt : n_prompt + len(cand)] = prompt, torch.tensor(cand)
            target[j, n_prompt : n_prompt + len(cand)] = True
        ids, target = ids.to(self.device), target.to(self.device)
        attention = ((ids != tokenizer.pad_token_id) | target | (torch.arange(width, device=self.device) < n_prompt)).long()
        candidate_ids, candidate_mask = ids[:, n_prompt:], target[:, n_prompt:]
        # the cell's soft tokens are computed once per cell and shared by its label sequences
        soft = self.get_cell_soft_tokens(**batch)  # (cells, queries, hidden)
        label_embeds = self.get_input_embeddings()(ids)
        slots = self._cell_slot_mask(ids)[None, :, :, None]
        per_forward = max(1, LIKELIHOOD_SEQUENCES_PER_FORWARD // n_labels)  # bounds the logits' memory
        scores = []
        for start in range(0, n_cells, per_forward):
            cells = soft[start : start + per_forward]
            embeds = label_embeds[None].expand(len(cells), -1, -1, -1)
            embeds = embeds.masked_scatter(slots.expand_as(embeds), cells[:, None].expand(-1, n_labels, -1, -1).to(embeds.dtype))
            # logits only where a label token is predicted: positions n_prompt-1 … width-2
            logits = self.language_model(inputs_embeds=embeds.flatten(0, 1), attention_mask=attention.repeat(len(cells), 1),
                                         logits_to_keep=width - n_prompt + 1).logits[:, :-1].float()
            logits = logits.view(len(cells), n_labels, width - n_prompt, -1)
            token_log_probs = logits.gather(-1, candidate_ids[None, ..., None].expand(len(cells), -1, -1, 1)).squeeze(-1)
            token_log_probs = (token_log_probs - logits.logsumexp(-1)) * candidate_mask
            scores.append(token_log_probs.sum(-1) / candidate_mask.sum(-1).clamp(min=1))
        return torch.cat(scores)

    def _generate_text(self, batch, prompt, processor, max_new_tokens, **generate_kwargs) -> list[str]:
        tokenizer = processor.tokenizer
        # decoder-only batches pad on the left
        text = tokenizer([processor.expand_cell_placeholders(prompt)] * batch["gene_ids"].shape[0],
                         return_tensors="pt", padding=True, padding_side="left")
        generate_kwargs.setdefault("do_sample", False)
        # Trainer saves models with use_cache=False: without the cache every step re-encodes the cells and re-reads
        # the whole prompt
        generate_kwargs.setdefault("use_cache", True)
        out = self.generate(input_ids=text["input_ids"].to(self.device),
                            attention_mask=text["attention_mask"].to(self.device), **batch,
                            max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **generate_kwargs)
        return [t.strip() for t in tokenizer.batch_decode(out[:, text["input_ids"].shape[1] :], skip_special_tokens=True)]

    def _generated_label_scores(self, batch, labels, processor) -> torch.Tensor:
        import difflib

        texts = self._generate_text(batch, ANNOTATE_PROMPT, processor, max_new_tokens=16)
        scores = torch.zeros(len(texts), len(labels))
        for i, text in enumerate(texts):
            head = text.split(".")[0].strip().lower()
            ratios = [difflib.SequenceMatcher(None, head, label.lower()).ratio() for label in labels]
            scores[i, int(np.argmax(ratios))] = 1.0
        return scores

    # ---------------------------------------------------------------------------------------------- description
    @torch.inference_mode()
    def describe(self, cells, prompt: str | None = None, gene_names=None, processor=None, batch_size: int = 16,
                 max_new_tokens: int = 64, progress: bool = False, cell_kwargs: dict | None = None,
                 **generate_kwargs) -> list[str]:
        """A written description of each cell (greedy by default; any `generate` argument is accepted)."""
        self._require_language_model("describe")
        processor = self._get_processor(processor)
        prompt = prompt or DESCRIBE_PROMPT
        if prompt.count("<cell>") != 1:
            raise ValueError(f"the prompt must contain exactly one <cell> placeholder, got {prompt!r}")
        out = []
        for _, batch in self._cell_batches(cells, processor, gene_names, batch_size, progress, "describe",
                                           **(cell_kwargs or {})):
            out += self._generate_text(batch, prompt, processor, max_new_tokens, **generate_kwargs)
        return out

    # ---------------------------------------------------------------------------------------------- text → cell
    @torch.inference_mode()
    def generate_cells(self, texts: str | list[str], n_per_text: int = 1, genes: list[str] | None = None,
                       seed: int | None = None, noise_scale: float = 0.1, processor=None,
                       batch_size: int = 32) -> GeneratedCells:
        """Pseudo-cells from text prompts: the LLM reads `"Generate a cell. {text} Cell:"` followed by the output
        cell slots, their states are projected to a cell state and decoded to log1p expression of `genes` (default:
        the whole gene vocabulary). A text's reading is deterministic; draws beyond the first add seeded Gaussian
        noise of `noise_scale` × the state's std, so `n_per_text` cells scatter around it."""
        self._require_language_model("generate_cells")
        processor = self._get_processor(processor)
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise ValueError("no texts were given")
        genes = list(processor.feature_extractor.gene_names) if genes is None else [str(g) for g in genes]
        gene_ids = torch.as_tensor(processor.feature_extractor.convert_genes_to_ids(genes))
        if (gene_ids < 0).any():
            unknown = [g for g, i in zip(genes, gene_ids.tolist()) if i < 0]
            raise ValueError(f"{len(unknown)} requested genes are not in the model's vocabulary: {unknown[:10]}")
        states = torch.cat([self._text_cell_states(texts[i : i + batch_size], processor)
                            for i in range(0, len(texts), batch_size)])
        states = states.repeat_interleave(n_per_text, dim=0)
        draw = torch.arange(len(states)) % n_per_text
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
        noise = torch.randn(states.shape, generator=generator).to(states)
        scale = noise_scale * states.std(dim=(1, 2), keepdim=True)
        states = states + noise * scale * (draw > 0).to(states)[:, None, None]
        expression = torch.cat([self.expression_decoder(states[i : i + batch_size], gene_ids.to(self.device).expand(
            len(states[i : i + batch_size]), -1)) for i in range(0, len(states), batch_size)])
        return GeneratedCells(expression=expression.clamp(min=0).float().cpu().numpy(), gene_names=genes,
                              texts=[t for t in texts for _ in range(n_per_text)])

    def _text_cell_states(self, texts, processor) -> torch.Tensor:
        prompts = [GENERATE_PROMPT.format(text=t) + processor.cell_slot_text for t in texts]
        tokenizer = processor.tokenizer
        # left padding: the slots end every row at the same positions
        encoded = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        ids, mask = encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)
        hidden = self.language_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        slots = self._cell_slot_mask(ids)
        return self.text_to_cell_projector(hidden[slots].view(len(texts), self.config.num_query_tokens, -1))


__all__ = ["CellTextJobsMixin", "CellAnnotation", "GeneratedCells", "MODEL_KINDS", "ModelKind", "cell_batches", "model_kind",
           "require_job"]
