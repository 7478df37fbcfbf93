"""The jobs of scMMGPT — `annotate`, `describe`, `embed`, `generate_cells` — over any saved scMMGPT model.

    jobs = ScMMGPTJobs.from_pretrained("demo_output/model")      # any kind of folder: stage 2, stage 1, classifier
    jobs.annotate("pbmc.h5ad").predictions                     # labels: those the model was trained on
    jobs.annotate("pbmc.h5ad", labels=["B cell", "CL:0000623"])  # or any Cell Ontology names / CL ids
    jobs.describe(adata[:5]); jobs.embed(adata); jobs.generate_cells("cell type: B cell.", n_per_text=50, seed=0)

This is the one layer that the Python API, the pipelines, the CLI, the endpoint handler and the evaluation call. It
decides once what the models leave open: which kind of folder can do which job (`kinds_scmmgpt.MODEL_KINDS`), how
cells are read (`inputs_scmmgpt.read_cells`: which matrix, which values, chunk by chunk), and how every job checks its
arguments. Pseudo-cell generation (text → cell) lives in `pseudocells_scmmgpt.PseudoCellJobs`, a mixin of the jobs.
Cells in which no gene of the vocabulary is expressed get no answer (no label, NaN scores and embedding, an empty
description) and one warning with their count.
"""

import difflib
import json
import os
import re
import sys
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from .inputs_scmmgpt import CellInputs, check_names, check_positive_int, read_cells
from .kinds_scmmgpt import MODEL_KINDS, ModelKind, kind_of_model, model_kind, require_job
from .ontology_scmmgpt import cell_type_terms, cell_type_text, cl_id, ontology_name, trained_subtypes
from .processing_scmmgpt import ANNOTATE_PROMPT, DESCRIBE_PROMPT
from .pseudocells_scmmgpt import DEFAULT_LIBRARY_SIZE, GENERATED_OUTPUTS, PseudoCellJobs
from .results_scmmgpt import CellAnnotation, GeneratedCells

LABELS_FILE = "label_texts.json"  # label → text, saved beside a trained model by the training pipeline
LIKELIHOOD_SEQUENCES_PER_FORWARD = 256  # (cells × labels) sequences scored per LLM forward
READ_CHUNK = 2048  # the most cells read from the input at a time (a backed file is read this much at once)
READ_VALUES = 1 << 24  # ... and at most this many matrix entries, so that a dense chunk of a wide matrix stays small
DEFAULT_DESCRIPTION_TOKENS = 128  # describe's length when the model carries no label texts to size it by


def _best_per_owner(scores: np.ndarray, owners: list[int], n_labels: int) -> np.ndarray:
    """(cells, texts) scores → (cells, labels): each label's best over the texts it owns (its own comes first)."""
    if len(owners) == n_labels:
        return scores
    best = scores[:, :n_labels].copy()
    for column, owner in enumerate(owners[n_labels:], start=n_labels):
        np.maximum(best[:, owner], scores[:, column], out=best[:, owner])
    return best


def _given_texts(labels, label_texts) -> dict[str, str]:
    """The caller's `label_texts` as label → text: a dict as it is, a list paired with `labels` one by one."""
    if label_texts is None:
        return {}
    if isinstance(label_texts, dict):
        return {str(label): str(text) for label, text in label_texts.items()}
    if isinstance(label_texts, str) or labels is None or len(label_texts) != len(labels):
        raise ValueError(f"label_texts must be a dict label → text, or a list of one text per label "
                         f"({len(labels or ())} labels)")
    return {label: str(text) for label, text in zip(labels, label_texts)}


def _refuse_same_cell_type(labels: list[str], names: list[str], ids: list):
    """ValueError when two labels are one cell type (the same name, or the same CL term): their scores would tie.
    (Texts may repeat: a model's own labels can share a term's text, e.g. two sorts of one cell type.)"""
    for values in (names, ids):
        seen = {}
        for label, value in zip(labels, values):
            if value is not None and value in seen:
                raise ValueError(f"labels {seen[value]!r} and {label!r} are one cell type ({value}): give it once")
            seen[value] = label


def _tidy_description(text: str, cut: bool) -> str:
    """One "cell type:" prefix, and a text cut by the length limit ends at its last full sentence."""
    text = re.sub(r"^(cell type:\s*)+", "cell type: ", text.strip())
    if cut and not text.endswith("."):
        end = text.rfind(". ")
        text = text[: end + 1] if end > 0 else text.rsplit(" ", 1)[0]
    return text


# ---------------------------------------------------------------------------------------------------- the jobs
class ScMMGPTJobs(PseudoCellJobs):
    r"""
    The jobs of one loaded model. `model` is any scMMGPT model (see `MODEL_KINDS`); `processor` its
    `ScMMGPTProcessor` (stage 1 / 2) or `ScMMGPTCellTokenizer` (classifier / encoder); `label_texts` (label → text)
    the cell types the model was trained on, the default label set of `annotate`.

    Cell arguments of every job: `cells` (AnnData, `.h5ad` path, matrix with `gene_names`, gene → count dicts, the
    endpoint payload, or an already read `CellInputs`), and the input options `layer`, `use_raw`, `gene_column`,
    `normalize` (`"auto"`, True, False) of `inputs_scmmgpt.read_cells`; `batch_size` cells per forward pass.
    """

    def __init__(self, model, processor, label_texts: dict | None = None, progress: bool | None = None,
                 verbose: bool = True):
        self.model = model.eval()
        self.kind = kind_of_model(model)
        self.processor = processor
        self.cell_tokenizer = getattr(processor, "feature_extractor", processor)
        if self.cell_tokenizer is None or not hasattr(self.cell_tokenizer, "convert_genes_to_ids"):
            raise ValueError(f"the {self.kind.name} model's jobs need its processor (ScMMGPTProcessor or "
                             "ScMMGPTCellTokenizer); load both from the model folder")
        self.label_texts = dict(label_texts) if label_texts else None
        self.progress = sys.stderr.isatty() if progress is None else bool(progress)
        self.verbose = verbose

    @classmethod
    def from_pretrained(cls, path, progress: bool | None = None, verbose: bool = True, **kwargs) -> "ScMMGPTJobs":
        """Load any kind of scMMGPT folder (local or Hub id) with its processor and label texts; `kwargs` go to
        `from_pretrained` (`trust_remote_code`, `revision`, `dtype`, `device_map`, ...)."""
        import transformers

        hub = {k: kwargs[k] for k in ("trust_remote_code", "revision", "token", "cache_dir") if k in kwargs}
        try:
            kind = model_kind(transformers.AutoConfig.from_pretrained(path, **hub))
            model = getattr(transformers, kind.auto_class).from_pretrained(path, **kwargs)
            loader = transformers.AutoProcessor if kind.name in ("stage1", "stage2") else transformers.AutoFeatureExtractor
            processor = loader.from_pretrained(path, **hub)
        except OSError as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{path}: cannot load the model folder ({first})") from err
        return cls(model, processor, read_label_texts(path, **hub), progress=progress, verbose=verbose)

    # ---------------------------------------------------------------------------------------------- cells
    def read(self, cells, gene_names=None, **input_options) -> CellInputs:
        """Cells → `CellInputs` (the same decision for every job); says the decision and unknown genes once."""
        if isinstance(cells, CellInputs):
            return cells
        inputs = read_cells(cells, self.cell_tokenizer, gene_names, **input_options)
        known = self.cell_tokenizer.convert_genes_to_ids(inputs.gene_names) >= 0
        self._say(inputs.decision)
        if not known.all():
            missing = [g for g, k in zip(inputs.gene_names, known) if not k]
            self._say(f"{len(missing)} of {len(known)} genes are not in the model's vocabulary and are ignored "
                      f"(e.g. {missing[:5]})")
        return inputs

    def _say(self, line: str):
        if self.verbose:
            print(f"scmmgpt: {line}", file=sys.stderr)

    def _batches(self, inputs: CellInputs, batch_size: int, desc: str):
        """Yield (start, tokenised cells on the model's device, mask of cells with no known gene expressed)."""
        batch_size = check_positive_int(batch_size, "batch_size")
        bar = tqdm(total=inputs.n_cells, desc=desc, unit="cell", disable=not self.progress)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not in the vocabulary.*")  # said once, in `read`
            rows = max(batch_size, min(READ_CHUNK, READ_VALUES // max(1, len(inputs.gene_names))))
            for start, chunk in inputs.chunks(rows):
                for offset in range(0, chunk.shape[0], batch_size):
                    encoded = self.cell_tokenizer(chunk[offset : offset + batch_size], gene_names=inputs.gene_names,
                                                  normalize=inputs.normalize, return_tensors="pt")
                    mask = encoded["attention_mask"]
                    yield start + offset, {
                        "gene_ids": encoded["gene_ids"].to(self.model.device),
                        "expression_values": encoded["expression_values"].to(self.model.device),
                        "cell_attention_mask": mask.to(self.model.device),
                    }, (mask.sum(1) <= 1).numpy()
                    bar.update(mask.shape[0])
        bar.close()

    def _warn_empty(self, empty: np.ndarray, what: str):
        if empty.any():  # stacklevel: past the job and torch.inference_mode's wrapper, to the job's caller
            warnings.warn(f"{int(empty.sum())} of {empty.size} cells have no expressed gene of the model's vocabulary: "
                          f"{what}", stacklevel=4)

    # ---------------------------------------------------------------------------------------------- embeddings
    @torch.inference_mode()
    def embed(self, cells, space: str = "encoder", batch_size: int = 64, gene_names=None,
              **input_options) -> np.ndarray:
        """Cell embeddings (cells, dim), float32: `space="encoder"` the cell encoder's `<cls>` embedding (scGPT's
        cell embedding), `"aligned"` the normalised features in the shared cell–text space (stage 1 / 2)."""
        require_job(self.kind, "embed")
        if space not in ("encoder", "aligned"):
            raise ValueError(f"space must be 'encoder' or 'aligned', got {space!r}")
        if space == "aligned" and self.kind.name not in ("stage1", "stage2"):
            raise ValueError(f"space='aligned' needs a stage-1 or stage-2 model; this is a {self.kind.name} model")
        inputs = self.read(cells, gene_names, **input_options)
        out, empty = None, np.zeros(inputs.n_cells, dtype=bool)
        for start, batch, none in self._batches(inputs, batch_size, "embed"):
            vectors = self._embed_batch(batch, space)
            if out is None:
                out = np.empty((inputs.n_cells, vectors.shape[1]), dtype=np.float32)
            # a copy into the result: a view would keep the batch's hidden states alive
            out[start : start + len(vectors)] = vectors.float().cpu().numpy()
            empty[start : start + len(vectors)] = none
        out[empty] = np.nan
        self._warn_empty(empty, "their embeddings are NaN")
        return out

    def _embed_batch(self, batch, space):
        if space == "aligned":
            return self.model.get_cell_features(**batch)
        encoder = self.model.base_model
        encoder = getattr(encoder, "cell_model", encoder)
        return encoder(batch["gene_ids"], batch["expression_values"], batch["cell_attention_mask"]).cell_embeds

    # ---------------------------------------------------------------------------------------------- annotation
    def _label_set(self, labels, label_texts, subtypes: bool = True):
        """(labels as the predictions name them, the text each is scored by, its CL id or None, label → the model's
        own labels it also scores as); see `annotate`."""
        if labels is not None:
            labels = check_names(labels, "labels")
        given = _given_texts(labels, label_texts)
        if labels is None:
            if not given and self.label_texts is None:
                raise ValueError("give labels: this model carries no label texts (label_texts.json) of the cell "
                                 "types it was trained on")
            labels = check_names(list(given or self.label_texts), "label_texts")
        known = {**(self.label_texts or {}), **given}  # the caller's texts win over the model's
        # remote code finds the shipped ontology in the model folder, not next to itself
        terms = cell_type_terms([label for label in labels if label not in known], list(self.label_texts or ()),
                                getattr(self.model, "name_or_path", None))
        # a CL id is reported by its term's name: "natural killer cell" reads better in a table than "CL:0000623"
        names = [terms[label].name if label in terms and cl_id(label) else label for label in labels]
        ids = [terms[label].id if label in terms else None for label in labels]
        texts = [known[label] if label in known else cell_type_text(terms[label].name, terms[label].definition)
                 for label in labels]
        _refuse_same_cell_type(labels, names, ids)
        return names, texts, ids, self._subtypes(labels, names, terms) if subtypes else {}

    def _subtypes(self, labels: list[str], names: list[str], terms: dict) -> dict[str, list[str]]:
        """name → the model's own labels (not asked for themselves) that the ontology label's term covers."""
        trained = {label: text for label, text in (self.label_texts or {}).items() if label not in labels}
        covered = trained_subtypes(terms, trained, getattr(self.model, "name_or_path", None))
        return {names[labels.index(label)]: own for label, own in covered.items()}

    @torch.inference_mode()
    def annotate(self, cells, labels=None, method: str | None = None, label_texts=None, batch_size: int = 64,
                 gene_names=None, subtypes: bool = True, **input_options) -> CellAnnotation:
        """Assign each cell one of `labels` (default: the cell types the model was trained on).

        Each label is scored by a text, the first found of: the caller's `label_texts` (a list of one text per label,
        or a dict label → text for some of them: free-text labels on purpose), the model's own text for a label it
        was trained on (its label_texts.json, e.g. "CD19+ B"), or the Cell Ontology term of a CL id (`CL:0000623` or
        `CL_0000623`) or of a term name / exact synonym, case-insensitive ("B cell", "NK cell"), whose text is
        `"cell type: {name}. {definition}"` as in training. Predictions name labels as given, except that a CL id
        comes back as its term's name ("natural killer cell"); `CellAnnotation.label_ids` keeps the CL ids. Any other
        label is a one-line ValueError with close matches among the ontology's names and the model's labels.

        A Cell Ontology label coarser than cell types the model was trained on ("T cell", "lymphocyte", "monocyte")
        scores as the best of its own text and theirs (`subtypes=True`; each trained type counts for the nearest such
        label above it, `CellAnnotation.subtypes` says which): its own text is one the model never trained on, while
        its cells sit by their subtypes' texts.

        - `"retrieval"` (zero-shot, stage 1 and 2): cosine similarity of cell features to the features of the
          label texts;
        - `"likelihood"` (stage 2): mean log-probability of each label's name after `ANNOTATE_PROMPT` under the LLM,
          where the name is the ontology name in the label's text ("CD14-positive monocyte" for "CD14+ Monocyte");
        - `"generate"` (stage 2): greedy generation after the same prompt, matched to the closest name;
        - a fine-tuned classifier uses its head and its own labels (`"classifier"`).
        """
        require_job(self.kind, "annotate")
        method = method or self.kind.annotation_methods[0]
        if method not in self.kind.annotation_methods:
            raise ValueError(f"method {method!r} is not one of this {self.kind.name} model's: "
                             f"{list(self.kind.annotation_methods)}")
        ids, covered = None, {}
        if method == "classifier":
            if labels is not None or label_texts is not None:
                raise ValueError("a fine-tuned classifier annotates with its own labels: drop labels / label_texts")
            labels = [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]
        else:
            labels, label_texts, ids, covered = self._label_set(labels, label_texts, subtypes)
        inputs = self.read(cells, gene_names, **input_options)
        owners, scored_texts = list(range(len(labels))), list(label_texts or ())
        for label, own in covered.items():
            self._say(f"{label!r} also scores as the model's own {', '.join(map(repr, own))}")
            owners += [labels.index(label)] * len(own)
            scored_texts += [self.label_texts[o] for o in own]
        score = self._label_scorer(method, scored_texts)
        scores, empty = np.empty((inputs.n_cells, len(labels)), dtype=np.float32), np.zeros(inputs.n_cells, bool)
        for start, batch, none in self._batches(inputs, batch_size, f"annotate ({method})"):
            part = _best_per_owner(torch.as_tensor(score(batch)).float().cpu().numpy(), owners, len(labels))
            scores[start : start + len(part)], empty[start : start + len(part)] = part, none
        scores[empty] = np.nan
        self._warn_empty(empty, "they get no label")
        best = np.nan_to_num(scores, nan=-np.inf).argmax(1)
        predictions = [None if e else labels[i] for i, e in zip(best, empty)]
        return CellAnnotation(predictions=predictions, scores=scores, labels=labels, label_texts=label_texts,
                              label_ids=ids, subtypes=covered or None)

    def _label_scorer(self, method, label_texts):
        """batch → (cells, labels) scores for `method`."""
        if method == "classifier":
            return lambda batch: self.model(batch["gene_ids"], batch["expression_values"],
                                            batch["cell_attention_mask"]).logits.float().softmax(-1)
        if method == "retrieval":
            text = self._text_features(label_texts)
            return lambda batch: self.model.get_cell_features(**batch) @ text.T
        names = [ontology_name(t) for t in label_texts]
        if method == "likelihood":
            return lambda batch: self._label_log_likelihoods(batch, names)
        return lambda batch: self._generated_label_scores(batch, names)

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        encoded = self.processor.qformer_text(texts, max_length=self.model.config.max_text_length,
                                              gene_ids=self.model.config.text_gene_grounding)
        return self.model.get_text_features(**{k: v.to(self.model.device) for k, v in encoded.items()})

    def _label_log_likelihoods(self, batch, names: list[str]) -> torch.Tensor:
        """(cells, labels) mean token log-probability of each name continuing the annotation prompt; each cell's soft
        tokens are computed once and shared by its label sequences."""
        tokenizer, device = self.processor.tokenizer, self.model.device
        prompt = tokenizer(self.processor.expand_cell_placeholders(ANNOTATE_PROMPT), return_tensors="pt")["input_ids"][0]
        candidates = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in names]
        n_labels, n_prompt = len(names), len(prompt)
        width = n_prompt + max(len(c) for c in candidates)
        ids = torch.full((n_labels, width), tokenizer.pad_token_id, dtype=torch.long)
        target = torch.zeros(n_labels, width, dtype=torch.bool)
        for j, candidate in enumerate(candidates):
            ids[j, :n_prompt], ids[j, n_prompt : n_prompt + len(candidate)] = prompt, torch.tensor(candidate)
            target[j, n_prompt : n_prompt + len(candidate)] = True
        ids, target = ids.to(device), target.to(device)
        attention = (target | (torch.arange(width, device=device) < n_prompt)).long()
        soft = self.model.get_cell_soft_tokens(**batch)  # (cells, queries, hidden)
        label_embeds = self.model.get_input_embeddings()(ids)
        slots = self.model.get_placeholder_mask(ids)[None, :, :, None]
        per_forward = max(1, LIKELIHOOD_SEQUENCES_PER_FORWARD // n_labels)  # bounds the logits' memory
        scores = []
        for start in range(0, soft.shape[0], per_forward):
            cells = soft[start : start + per_forward]
            embeds = label_embeds[None].expand(len(cells), -1, -1, -1)
            embeds = embeds.masked_scatter(slots.expand_as(embeds),
                                           cells[:, None].expand(-1, n_labels, -1, -1).to(embeds.dtype))
            # logits only where a label token is predicted: positions n_prompt-1 … width-2
            logits = self.model(inputs_embeds=embeds.flatten(0, 1), attention_mask=attention.repeat(len(cells), 1),
                                logits_to_keep=width - n_prompt + 1).logits[:, :-1].float()
            logits = logits.view(len(cells), n_labels, width - n_prompt, -1)
            picked = logits.gather(-1, ids[None, :, n_prompt:, None].expand(len(cells), -1, -1, 1)).squeeze(-1)
            picked = (picked - logits.logsumexp(-1)) * target[:, n_prompt:]
            scores.append(picked.sum(-1) / target[:, n_prompt:].sum(-1).clamp(min=1))
        return torch.cat(scores)

    def _generated_label_scores(self, batch, names: list[str]) -> torch.Tensor:
        texts, _ = self._generate_text(batch, ANNOTATE_PROMPT, max_new_tokens=16)
        scores = torch.zeros(len(texts), len(names))
        for i, text in enumerate(texts):
            head = text.split(".")[0].strip().lower()
            ratios = [difflib.SequenceMatcher(None, head, name.lower()).ratio() for name in names]
            scores[i, int(np.argmax(ratios))] = 1.0
        return scores

    # ---------------------------------------------------------------------------------------------- description
    def _generate_text(self, batch, prompt, max_new_tokens, **generate_kwargs) -> tuple[list[str], list[bool]]:
        """(texts, whether each hit `max_new_tokens`) generated after `prompt` for each cell of `batch`."""
        tokenizer = self.processor.tokenizer
        text = tokenizer([self.processor.expand_cell_placeholders(prompt)] * batch["gene_ids"].shape[0],
                         return_tensors="pt", padding=True, padding_side="left")  # decoder-only batches pad left
        generate_kwargs.setdefault("do_sample", False)
        # Trainer saves models with use_cache=False: without the cache every step re-encodes the cells
        generate_kwargs.setdefault("use_cache", True)
        out = self.model.generate(input_ids=text["input_ids"].to(self.model.device),
                                  attention_mask=text["attention_mask"].to(self.model.device), **batch,
                                  max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                  **generate_kwargs)
        new = out[:, text["input_ids"].shape[1] :]
        stops = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
        cut = [len(row) >= max_new_tokens and int(row[-1]) not in stops for row in new.tolist()]
        return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)], cut

    def default_description_tokens(self) -> int:
        """Long enough for the longest label text the model learned (descriptions are such texts), else 128."""
        if not self.label_texts:
            return DEFAULT_DESCRIPTION_TOKENS
        lengths = [len(self.processor.tokenizer(t, add_special_tokens=False)["input_ids"])
                   for t in self.label_texts.values()]
        return max(lengths) + 8

    @torch.inference_mode()
    def describe(self, cells, prompt: str | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
                 gene_names=None, generate_kwargs: dict | None = None, **input_options) -> list[str]:
        """A written description of each cell (greedy by default; `generate_kwargs` go to `generate`). An empty
        string for a cell with no known gene expressed."""
        require_job(self.kind, "describe")
        prompt = prompt or DESCRIBE_PROMPT
        if not isinstance(prompt, str) or prompt.count("<cell>") != 1:
            raise ValueError(f"the prompt must contain exactly one <cell> placeholder, got {prompt!r}")
        if max_new_tokens is None:
            max_new_tokens = self.default_description_tokens()
        max_new_tokens = check_positive_int(max_new_tokens, "max_new_tokens")
        inputs = self.read(cells, gene_names, **input_options)
        out, empty = [], np.zeros(inputs.n_cells, dtype=bool)
        for start, batch, none in self._batches(inputs, batch_size, "describe"):
            texts, cut = self._generate_text(batch, prompt, max_new_tokens, **dict(generate_kwargs or {}))
            out += ["" if e else _tidy_description(t, c) for t, c, e in zip(texts, cut, none)]
            empty[start : start + len(texts)] = none
        self._warn_empty(empty, "they get no description")
        return out

def read_label_texts(path, **hub) -> dict | None:
    """The folder's `label_texts.json` (label → text), or None."""
    from transformers.utils import cached_file

    if os.path.isdir(path):
        file = os.path.join(path, LABELS_FILE)
        file = file if os.path.isfile(file) else None
    else:
        file = cached_file(path, LABELS_FILE, _raise_exceptions_for_missing_entries=False, **hub)
    if file is None:
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


__all__ = ["ScMMGPTJobs", "CellAnnotation", "GeneratedCells", "GENERATED_OUTPUTS", "DEFAULT_LIBRARY_SIZE",
           "MODEL_KINDS", "ModelKind", "model_kind", "kind_of_model", "require_job", "ontology_name",
           "read_label_texts", "LABELS_FILE"]
