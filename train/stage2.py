"""Stage 2 (generation) with TRL's `SFTTrainer`: the stage-1 model joined to a causal LLM, the LLM tuned with PEFT LoRA
(or QLoRA on CUDA, or in full), the projectors and the expression decoder trained in full.

The data stay the built cell rows; `Stage2Collator` turns each batch into prompt → target examples of both directions
(cell → text with `DESCRIBE_PROMPT`, text → cell with `GENERATE_PROMPT`: the processor's prompts, so that training and
the jobs agree), so TRL's own dataset preparation is skipped (`dataset_kwargs={"skip_prepare_dataset": True}`) and no
column is dropped (`remove_unused_columns=False`). The three losses (LM, cell embedding, expression) are logged beside
their weighted sum.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from modeling_scmmgpt import ScMMGPTForConditionalGeneration, ScMMGPTProcessor
from modeling_scmmgpt.processing_scmmgpt import DESCRIBE_PROMPT, GENERATE_PROMPT
from modeling_scmmgpt.jobs_scmmgpt import ScMMGPTJobs
from modeling_scmmgpt.modeling_expression_decoder import CountDistribution, ExpressionDecoder, expression_loss

from .augment import library_size
from .collators import Stage2Collator
from .streaming import log_normalized, rows_to_matrix
from .trainers import LossPartsLoggingMixin

STAGE2_LOSSES = ("loss_lm", "loss_cell_embed", "loss_expression", "loss_expression_teacher")
PROJECTORS = ["cell_to_text_projector", "text_to_cell_projector", "expression_decoder"]
# LoRA on the LLM's attention and MLP projections only (Llama / Mistral / Qwen names; GPT-2: c_attn, c_proj, c_fc)
LLM_LORA_TARGETS = r"language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|c_attn|c_proj|c_fc)"
# `SFTConfig` defaults of a stage-2 section: the collator builds the examples from the raw rows; bf16 only when asked
STAGE2_TRAINING = dict(dataset_kwargs={"skip_prepare_dataset": True}, activation_checkpointing=False, bf16=False)


@dataclass
class Stage2Arguments:
    """What stage 2 trains and how (the `SFTConfig` fields of the same config section set the optimisation).

    Args:
        tuning: `"lora"` (PEFT LoRA on the LLM, projectors and decoder in full), `"full"` (every LLM weight) or
            `"frozen"` (the LLM frozen: projectors and decoder only).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA adapter (the regex is matched against full
            module names, so it stays inside `language_model`).
        modules_to_save: modules trained in full next to the adapter (and saved with it).
        train_qformer: also tune the stage-1 part (cell encoder + Q-Former); frozen by default, as in BLIP-2's stage 2
            with a frozen encoder.
        load_in_4bit: QLoRA: load the LLM in 4-bit NF4 through bitsandbytes (CUDA only; ignored with a warning on CPU).
        text_to_cell_fraction: share of examples that are text → cell (the rest cell → text).
        cell_embed_loss_weight, expression_loss_weight: weights of the text → cell losses in the total loss.
        max_decoder_genes: the most expressed genes per target cell scored by the expression loss (None: all).
        expression_teacher_weight: weight of a teacher-forced expression loss: the decoder also reads the target
            cell's *true* Q-Former states. Without it the decoder, fed only the LLM's early (uninformative) states,
            learns per-gene means from the gene embedding alone and ignores its context for good, so every text
            decodes to the same average cell (seen on PBMC: k-NN accuracy at chance, 0.1). 0 turns it off.
        decoder_warmup_steps: steps of fitting the new expression decoder to the frozen stage-1 cell states of
            training cells before the LLM is trained (0: none); see `warm_up_expression_decoder`.
        decoder_warmup_cells: the most training cells (the first ones) whose states the warm-up reads, and the
            cell-state spread is fitted on.
        cell_state_spread: after training, fit the spread of the training cells' states around their text's mean
            (`fit_cell_state_spread`), which `generate_cells` draws states from; False leaves it unfitted (one state
            per text, as before).
        text_to_cell_min_rows: text → cell copies of the rows of each text with fewer rows are added to a map-style
            training set (`oversample_rare_texts`), so rare cell types' texts are learned as well; 0: none.
        train_expression_decoder: keep training the decoder during stage 2. False keeps the warmed-up decoder fixed,
            so the expression loss trains the LLM and the text → cell projector to produce states it decodes well
            (and the teacher-forced loss, which has nothing left to train, is skipped). Trained on, the decoder
            drifted to the common types' single cells and mis-decoded rare ones (PBMC, CD34+: 5.6 PCA units from
            the type's mean expression against 2.5 kept fixed).
        expression_distribution: what the expression decoder predicts (`ScMMGPTConfig.expression_distribution`):
            `"mse"` (log1p values, the paper's), `"nb"` / `"zinb"` (a count distribution fitted by its likelihood on
            the cells' counts, so generated cells are draws); None keeps the model config's.
        max_seconds: wall-time guard on training (None: none).
    """

    tuning: str = "lora"
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str = LLM_LORA_TARGETS
    modules_to_save: list[str] = field(default_factory=lambda: list(PROJECTORS))
    train_qformer: bool = False
    load_in_4bit: bool = False
    text_to_cell_fraction: float = 0.5
    cell_embed_loss_weight: float = 1.0
    expression_loss_weight: float = 1.0
    max_decoder_genes: int | None = None
    expression_teacher_weight: float = 1.0
    decoder_warmup_steps: int = 0
    decoder_warmup_cells: int = 4096
    cell_state_spread: bool = True
    train_expression_decoder: bool = True
    text_to_cell_min_rows: int = 0
    expression_distribution: str | None = None
    max_seconds: float | None = None

    def __post_init__(self):
        if self.tuning not in ("lora", "full", "frozen"):
            raise ValueError(f"stage2 tuning must be 'lora', 'full' or 'frozen', got {self.tuning!r}")
        if not 0.0 <= self.text_to_cell_fraction <= 1.0:
            raise ValueError(f"text_to_cell_fraction must be in [0, 1], got {self.text_to_cell_fraction}")
        if self.expression_distribution not in (None, "mse", "nb", "zinb"):
            raise ValueError(f"stage2 expression_distribution must be 'mse', 'nb' or 'zinb', got "
                             f"{self.expression_distribution!r}")


def quantization_config_4bit(compute_dtype=torch.bfloat16):
    """`BitsAndBytesConfig` for QLoRA (NF4, double quantisation); bitsandbytes is imported only here."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_language_model(path: str, load_in_4bit: bool = False, dtype=None):
    """A causal LM and its tokenizer from a local folder or Hub id; in 4-bit (QLoRA) only on CUDA."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if load_in_4bit:
        if torch.cuda.is_available():
            kwargs["quantization_config"] = quantization_config_4bit(kwargs.get("dtype", torch.bfloat16))
            kwargs["device_map"] = {"": torch.cuda.current_device()}
        else:
            warnings.warn("load_in_4bit needs CUDA (bitsandbytes); loading the LLM unquantised on CPU", stacklevel=2)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs), AutoTokenizer.from_pretrained(path)


def build_stage2_model(stage1_model, language_model, processor: ScMMGPTProcessor,
                       cell_embed_loss_weight: float = 1.0, expression_loss_weight: float = 1.0,
                       seed: int = 0) -> ScMMGPTForConditionalGeneration:
    """`ScMMGPTForConditionalGeneration` holding the trained stage-1 weights (`scmmgpt`), the given LLM, and new
    projectors and expression decoder; the processor's cell tokens are added to the LLM's vocabulary."""
    config = stage1_model.config.__class__.from_dict(stage1_model.config.to_dict())
    config.text_config = language_model.config
    config.cell_embed_loss_weight, config.expression_loss_weight = cell_embed_loss_weight, expression_loss_weight
    torch.manual_seed(seed)
    model = ScMMGPTForConditionalGeneration(config, language_model=language_model)
    model.scmmgpt.load_state_dict(stage1_model.state_dict())
    model.set_cell_token_ids(processor)
    return model


def apply_tuning(model: ScMMGPTForConditionalGeneration, args: Stage2Arguments):
    """Freeze / adapt `model` as `args.tuning` says. Returns `(model, peft_config)`: for LoRA the `LoraConfig` that
    `SFTTrainer` wraps the model with, otherwise None and the model's own `requires_grad` flags set."""
    model.scmmgpt.requires_grad_(args.train_qformer)
    if args.tuning == "lora":
        from peft import LoraConfig

        if not any(re.fullmatch(args.lora_target_modules, name) for name, _ in model.named_modules()):
            raise ValueError(f"lora_target_modules {args.lora_target_modules!r} matches no module of the model")
        modules_to_save = [name for name in args.modules_to_save
                           if args.train_expression_decoder or name != "expression_decoder"]
        modules_to_save += ["scmmgpt"] if args.train_qformer else []
        return model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 target_modules=args.lora_target_modules, modules_to_save=modules_to_save,
                                 bias="none")
    model.language_model.requires_grad_(args.tuning == "full")
    for name in PROJECTORS:
        getattr(model, name).requires_grad_(True)
    model.expression_decoder.requires_grad_(args.train_expression_decoder)
    return model, None


def _sft_trainer_class():
    from trl import SFTTrainer

    class Stage2Trainer(LossPartsLoggingMixin, SFTTrainer):
        """`SFTTrainer` whose loss is the model's own (LM + weighted text → cell losses), each part logged as the mean
        over the steps since the last log. TRL's fused LM head is not used: the loss needs the LLM's hidden states at
        the output cell slots, which it does not return."""

        loss_parts = STAGE2_LOSSES

        def __init__(self, *args, expression_teacher_weight: float = 0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.expression_teacher_weight = float(expression_teacher_weight)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs = {**inputs, "use_cache": False}
            outputs = model(**inputs)
            loss = outputs.loss
            parts = {name: outputs.get(name) for name in self.loss_parts}
            if self.expression_teacher_weight and model.training:
                teacher = self._teacher_forced_expression_loss(model, inputs)
                if teacher is not None:
                    parts["loss_expression_teacher"] = teacher
                    loss = loss + self.expression_teacher_weight * teacher
            if model.training:  # a batch without text → cell examples has no cell losses (None parts are skipped)
                self.record_loss_parts(parts)
            return (loss, outputs) if return_outputs else loss

        def _teacher_forced_expression_loss(self, model, inputs):
            """The expression loss (`expression_loss`: MSE, or a count decoder's negative log-likelihood) of the
            expression decoded from the target cells' true Q-Former states (text → cell rows only)."""
            base = self.accelerator.unwrap_model(model)
            base = base.get_base_model() if hasattr(base, "get_base_model") else base
            rows = inputs["decoder_mask"].bool().any(1)
            if not bool(rows.any()):
                return None
            with torch.no_grad():
                states = base.scmmgpt.query_outputs(inputs["target_gene_ids"][rows],
                                                    inputs["target_expression_values"][rows],
                                                    inputs["target_cell_attention_mask"][rows])
            decoded = base.expression_decoder(states, inputs["decoder_gene_ids"][rows])
            return expression_loss(decoded, base.config.expression_distribution, inputs["decoder_targets"][rows],
                                   inputs["decoder_mask"][rows], inputs["decoder_counts"][rows],
                                   inputs["decoder_size_factors"][rows])

    return Stage2Trainer


def stage2_collator(processor, args: Stage2Arguments, max_length: int = 512, seed: int = 0,
                    augment=None) -> Stage2Collator:
    """The stage-2 collator with the processor's prompts (`DESCRIBE_PROMPT`, `GENERATE_PROMPT`), the same the jobs
    (`describe`, `generate_cells`) use at inference."""
    return Stage2Collator(processor=processor, cell_to_text_prompt=DESCRIBE_PROMPT, text_to_cell_prompt=GENERATE_PROMPT,
                          text_to_cell_fraction=args.text_to_cell_fraction, max_length=max_length,
                          max_decoder_genes=args.max_decoder_genes, seed=seed, augment=augment)


def _first_rows(dataset, n: int) -> list[dict]:
    """The first `n` rows of a `datasets.Dataset` or of a (streamed) iterable of rows."""
    import itertools

    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return [dataset[i] for i in range(min(n, len(dataset)))]
    return list(itertools.islice(iter(dataset), n))


@torch.no_grad()
def true_cell_states(model: ScMMGPTForConditionalGeneration, rows, cell_tokenizer, batch_size: int = 64) -> torch.Tensor:
    """The stage-1 Q-Former states of built rows (a list or `datasets.Dataset`), (cells, queries, hidden), on the
    model's device, in eval mode (no dropout) whatever mode the model is in: the cell states the text → cell path is
    trained towards, and the decoder warm-up's inputs, must be those seen at inference."""
    from .streaming import cell_input_batches

    was_training = model.scmmgpt.training
    model.scmmgpt.eval()
    try:
        return torch.cat([model.scmmgpt.query_outputs(**batch)
                          for batch in cell_input_batches(rows, cell_tokenizer, batch_size, model.device)])
    finally:
        model.scmmgpt.train(was_training)


def rows_by_text(texts) -> list[np.ndarray]:
    """The row indices of each distinct text, one array per text (in sorted text order)."""
    _, group_of = np.unique(texts, return_inverse=True)
    return [np.flatnonzero(group_of == g) for g in range(group_of.max() + 1)]


def warm_up_expression_decoder(model: ScMMGPTForConditionalGeneration, rows, cell_tokenizer, steps: int,
                               batch_size: int = 16, learning_rate: float = 1e-2, mixture_size: int = 8,
                               group_means: int = 8, seed: int = 0,
                               progress: bool = False) -> list[float]:
    """Fit the expression decoder to the frozen stage-1 cell states of `rows` before stage 2 trains the LLM.

    Generation decodes the state the text → cell projector predicts for a text, and an MSE-trained projector predicts
    the *mean* state of the cells sharing that text, a point no single cell occupies. So half of each batch are
    random convex mixtures (Dirichlet(1) weights) of `mixture_size` cells with the same text, whose target is the same
    mixture of their expression; groups (texts) are drawn uniformly, so rare cell types are learned as well as
    common ones. `group_means` more rows of each batch are whole groups: a text's mean state, whose target is its
    mean expression, the very point generation decodes (mixtures of 8 cells only scatter around it). Targets are
    dense: every vocabulary gene expressed in some row, the others being 0 in every cell.
    The learning rate decays to 0 (cosine) so that the last steps settle on the means rather than jitter around them.
    On PBMC (3 split seeds, 15-neighbour k-NN on held-out cells) mixtures alone (600 steps) decoded the per-type mean
    states 2.0-3.6 PCA units (mean over types) from the types' mean expression, 0.6 k-NN accuracy; with 8 group means
    a batch and 2000 steps (~65 s on a laptop CPU) 1.1-1.8 units and 0.6-0.7, where the true per-type mean expression
    scores 0.7 (the most a generator of type-typical cells can get on that held-out set). The states are read in eval
    mode (`true_cell_states`): fitted to the dropout-perturbed states of a Q-Former left in training mode, the decoder
    of one seed's pipeline decoded the mean states 1.84 units off on average (CD34+ 3.23), against 0.75 (0.31).

    A count decoder (`"nb"` / `"zinb"`) is fitted by the likelihood of the member cells' own counts instead of a
    mixed target: a mixture's state must give a distribution under which each of its cells is likely (weighted as
    in the mixture), and a text's mean state one under which `mixture_size` of the text's cells drawn at random are,
    so that the state generation decodes carries the spread of the text's cells, not their average. Genes no row
    expresses (a fixed sample, at most as many as the expressed ones) are fitted to zero counts, so that they are
    never drawn. The log rate's output bias starts at the rows' mean log rate: a fresh decoder predicts ~1 read per
    target_sum, and where the cells' rates are thousands (a small gene panel) the likelihood first spent its steps
    widening the distribution (on 40 genes the warm-up stalled at its starting loss without it).

    Returns the loss of each step.
    """
    from tqdm.auto import tqdm

    if steps <= 0:
        return []
    generator = torch.Generator().manual_seed(seed)
    device = next(model.expression_decoder.parameters()).device
    counting = model.config.expression_distribution != "mse"
    gene_ids, targets_of, size_factors = _warmup_targets(rows, cell_tokenizer, counting, generator)
    gene_ids, targets_of, size_factors = gene_ids.to(device), targets_of.to(device), size_factors.to(device)
    if counting:
        with torch.no_grad():  # the mean reads per target_sum over every (cell, gene) of the rows
            mean_rate = targets_of.sum() / (size_factors.sum() * targets_of.shape[1])
            model.expression_decoder.mlp[-1].bias[0] = mean_rate.clamp(min=1e-6).log()
    states = true_cell_states(model, rows, cell_tokenizer).to(device)
    groups = [torch.as_tensor(g) for g in rows_by_text([row["text"] for row in rows])]
    group_states = torch.stack([states[g.to(device)].mean(0) for g in groups])
    group_targets = None if counting else torch.stack([targets_of[g.to(device)].mean(0) for g in groups])
    decoder = model.expression_decoder
    decoder.train()
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    dirichlet = torch.distributions.Dirichlet(torch.ones(mixture_size))
    losses = []
    for _ in tqdm(range(steps), desc="stage 2: expression decoder warm-up", disable=not progress):
        drawn = torch.randint(len(groups), (batch_size,), generator=generator).tolist()
        members = torch.stack([groups[g][torch.randint(len(groups[g]), (mixture_size,), generator=generator)]
                               for g in drawn])
        weights = torch.zeros(batch_size, mixture_size)
        weights[:, 0] = 1.0  # single cells ...
        weights[batch_size // 2:] = dirichlet.sample((batch_size - batch_size // 2,))  # ... and same-text mixtures
        batch_states = torch.einsum("bm,bmqh->bqh", weights.to(device), states[members.to(device)])
        means = torch.randint(len(groups), (group_means,), generator=generator) if group_means else None
        if means is not None:
            batch_states = torch.cat([batch_states, group_states[means.to(device)]])
        decoded = decoder(batch_states, gene_ids.expand(len(batch_states), -1))
        if counting:  # each row's cells: its mixture's members, or cells drawn from the text of a mean
            if means is not None:
                members = torch.cat([members, torch.stack([
                    groups[g][torch.randint(len(groups[g]), (mixture_size,), generator=generator)]
                    for g in means.tolist()])])
                weights = torch.cat([weights, torch.full((group_means, mixture_size), 1.0 / mixture_size)])
            loss = _mixture_nll(decoded, members.to(device), weights.to(device), targets_of, size_factors)
        else:
            targets = torch.einsum("bm,bmg->bg", weights.to(device), targets_of[members.to(device)])
            if means is not None:
                targets = torch.cat([targets, group_targets[means.to(device)]])
            loss = F.mse_loss(decoded, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def _warmup_targets(rows, cell_tokenizer, counting: bool, generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The warm-up's genes and each row's targets over them: (vocabulary gene ids (genes,), log1p expression or, for
    a count decoder, counts (cells, genes), size factors (cells,))."""
    from .streaming import N_SPECIAL

    expression = torch.from_numpy(cell_expression_matrix(rows, cell_tokenizer))
    seen = expression.sum(0) > 0
    genes = torch.nonzero(seen).squeeze(1)  # the MSE decoder: only genes seen expressed
    target_sum = cell_tokenizer.target_sum
    libraries = torch.tensor([max(library_size(rows[i], target_sum), 1.0) for i in range(len(rows))],
                             dtype=torch.float64)
    if not counting:
        return genes + N_SPECIAL, expression[:, genes], libraries / target_sum
    unseen = torch.nonzero(~seen).squeeze(1)
    unseen = unseen[torch.randperm(len(unseen), generator=generator)[: len(genes)]]
    genes = torch.cat([genes, unseen])
    counts = torch.round(torch.expm1(expression[:, genes].double()) * libraries[:, None] / target_sum)
    return genes + N_SPECIAL, counts.float(), (libraries / target_sum).float()


def _mixture_nll(decoded, members, weights, counts, size_factors) -> torch.Tensor:
    """Mean over rows of Σ_m weight_m · (negative log-likelihood per gene of member m's counts under the row's
    distribution): decoded (rows, genes, 2 | 3), members and weights (rows, members), counts (cells, genes)."""
    n_members = members.shape[1]
    distribution = CountDistribution.from_decoder_output(decoded.repeat_interleave(n_members, 0))
    cells = members.flatten()
    nll = -distribution.log_prob(counts[cells], size_factors[cells]).mean(-1).view(-1, n_members)
    return (nll * weights).sum(1).mean()


def oversample_rare_texts(dataset, min_rows: int, seed: int = 0, text_column: str = "text"):
    """`dataset` plus text → cell copies (`task: "text_to_cell"`) of the rows of each text with fewer than `min_rows`
    rows, drawn with replacement, so that the text has `min_rows`. Cells come in proportion to their type, so a type
    of 7 training cells among 560 gives ~1 % of the text → cell examples, and its text was read into states that
    decoded far from its cells (PBMC, CD34+). Map-style `datasets.Dataset` only: a streamed one is returned as is."""
    import datasets

    from .collators import TEXT_TO_CELL

    if min_rows <= 0 or not isinstance(dataset, datasets.Dataset):
        return dataset
    rng = np.random.default_rng(seed)
    extra = []
    for members in rows_by_text(dataset[text_column]):
        extra += rng.choice(members, max(0, min_rows - len(members))).tolist()
    if not extra:
        return dataset
    if "task" not in dataset.column_names:
        dataset = dataset.add_column("task", [None] * len(dataset), feature=datasets.Value("string"))
    copies = dataset.select(extra).map(lambda _: {"task": TEXT_TO_CELL})
    return datasets.concatenate_datasets([dataset, copies])


def train_stage2(model: ScMMGPTForConditionalGeneration, train_dataset, processor, sft_config, args: Stage2Arguments,
                 *, callbacks=None, resume_from_checkpoint=None, augment=None):
    """Stage 2 with `SFTTrainer`, after `warm_up_expression_decoder` when `args.decoder_warmup_steps`. Returns
    `(trainer, merged_model)`: the trainer (its state holds the log history, `decoder_warmup_losses` the warm-up's)
    and a plain `ScMMGPTForConditionalGeneration` with any LoRA adapter merged in, ready for `save_pretrained`.

    `sft_config` is a `trl.SFTConfig`; it must keep `remove_unused_columns=False` and
    `dataset_kwargs={"skip_prepare_dataset": True}` (the collator reads the raw cell rows).
    """
    if sft_config.remove_unused_columns:
        raise ValueError("stage 2 needs remove_unused_columns=False: the collator reads the raw cell rows")
    if not (sft_config.dataset_kwargs or {}).get("skip_prepare_dataset"):
        raise ValueError('stage 2 needs dataset_kwargs={"skip_prepare_dataset": True}: the collator builds the text')
    model.config.cell_embed_loss_weight = args.cell_embed_loss_weight
    model.config.expression_loss_weight = args.expression_loss_weight
    use_expression_distribution(model, args.expression_distribution, seed=sft_config.seed)
    counting = model.config.expression_distribution != "mse"
    warmup_losses = []
    # every rank reads the same first rows: identical decoders and spreads
    rows = _first_rows(train_dataset, args.decoder_warmup_cells)
    if counting:
        model.config.library_size_quantiles = library_size_quantiles(rows, processor.feature_extractor.target_sum)
    if args.decoder_warmup_steps:
        torch.manual_seed(sft_config.seed)
        warmup_losses = warm_up_expression_decoder(model, rows, processor.feature_extractor,
                                                   args.decoder_warmup_steps, seed=sft_config.seed,
                                                   progress=not sft_config.disable_tqdm)
    train_dataset = oversample_rare_texts(train_dataset, args.text_to_cell_min_rows, seed=sft_config.seed)
    model, peft_config = apply_tuning(model, args)
    trainer = _sft_trainer_class()(
        model=model, args=sft_config, train_dataset=train_dataset, processing_class=processor,
        data_collator=stage2_collator(processor, args, max_length=sft_config.max_length or 512, seed=sft_config.seed,
                                      augment=augment),
        peft_config=peft_config, callbacks=callbacks,
        expression_teacher_weight=args.expression_teacher_weight if args.train_expression_decoder else 0.0,
    )
    trainer.decoder_warmup_losses = warmup_losses
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trained = trainer.model
    trained = trainer.accelerator.unwrap_model(trained)
    if hasattr(trained, "merge_and_unload"):  # a PeftModel: fold the adapter and the saved modules back in
        trained = trained.merge_and_unload()
    _undo_fused_head(trained)
    if args.cell_state_spread:
        fit_cell_state_spread(trained, rows, processor.feature_extractor, seed=sft_config.seed)
    return trainer, trained


def fit_cell_state_spread(model: ScMMGPTForConditionalGeneration, rows, cell_tokenizer, seed: int = 0):
    """Fit `model.cell_state_spread` on built rows: their stage-1 states grouped by text (`CellStateSpread.fit`)."""
    states = true_cell_states(model, rows, cell_tokenizer)
    groups = [torch.as_tensor(g) for g in rows_by_text([row["text"] for row in rows])]
    model.cell_state_spread.fit(states, groups, torch.Generator().manual_seed(seed))


def use_expression_distribution(model: ScMMGPTForConditionalGeneration, distribution: str | None, seed: int = 0):
    """Give `model` a new expression decoder predicting `distribution` (`"mse"`, `"nb"`, `"zinb"`) when its config
    names another (None: keep it). Stage 2 builds the decoder new anyway; initialised as the model's own weights."""
    if distribution is None or distribution == model.config.expression_distribution:
        return
    model.config.expression_distribution = distribution
    device = next(model.expression_decoder.parameters()).device
    torch.manual_seed(seed)
    decoder = ExpressionDecoder(model.config)
    decoder.apply(model._init_weights)
    model.expression_decoder = decoder.to(device)


def library_size_quantiles(rows, target_sum: float = 1e4) -> list[float]:
    """The 101 quantiles (0 %, 1 %, …, 100 %) of the library sizes of built `rows` (`collators.library_size`), which
    `generate_cells` draws sampled cells' library sizes from (`ScMMGPTConfig.library_size_quantiles`)."""
    sizes = np.array([library_size(rows[i], target_sum) for i in range(len(rows))], dtype=np.float64)
    return [round(float(q), 1) for q in np.quantile(sizes, np.linspace(0.0, 1.0, 101))]


def _undo_fused_head(model):
    """TRL patches `forward` on the instance (its fused LM head); the saved / returned model uses the class's own."""
    if "forward" in vars(model):
        del model.forward


# ---------------------------------------------------------------------------------------------------- evaluation
def cell_expression_matrix(rows, cell_tokenizer) -> np.ndarray:
    """Built rows → dense log1p-normalised expression over the whole gene vocabulary, (cells, genes)."""
    rows = [rows[i] for i in range(len(rows))]
    matrix = rows_to_matrix(rows, len(cell_tokenizer.gene_names))
    return np.asarray(log_normalized(rows, matrix, cell_tokenizer.target_sum).todense(), dtype=np.float32)


@torch.inference_mode()
def generated_cell_knn_accuracy(model, label_texts: dict[str, str], reference_expression: np.ndarray,
                                reference_labels, n_per_text: int = 5, k: int = 5, seed: int = 0,
                                processor=None) -> dict:
    """k-NN accuracy of pseudo-cells: `n_per_text` cells generated from each label's text are classified by a
    k-nearest-neighbour classifier (Euclidean, on log1p expression of every vocabulary gene) fitted on real cells;
    the score is the share classified as the label whose text generated them.

    Returns:
        `{"knn_accuracy": float, "per_label": {label: accuracy}, "k": k, "n_per_text": n}`.
    """
    from sklearn.neighbors import KNeighborsClassifier

    model.eval()
    labels = list(label_texts)
    generated = ScMMGPTJobs(model, processor, verbose=False).generate_cells(
        [label_texts[label] for label in labels], n_per_text=n_per_text, seed=seed)
    truth = np.repeat(labels, n_per_text)
    classifier = KNeighborsClassifier(n_neighbors=k).fit(reference_expression, np.asarray(reference_labels))
    predicted = classifier.predict(generated.expression)
    correct = predicted == truth
    return {"knn_accuracy": float(correct.mean()), "k": k, "n_per_text": n_per_text,
            "per_label": {label: float(correct[truth == label].mean()) for label in labels}}


@torch.inference_mode()
def generated_state_accuracy(model, label_texts: dict[str, str], rows, cell_tokenizer, processor=None,
                             batch_size: int = 64) -> float:
    """Share of label texts whose generated cell state (the text → cell projector's output, before the expression
    decoder) lies closest, in mean squared distance, to the mean true Q-Former state of that label's real cells: does
    the LLM read the text into the right kind of cell, whatever the decoder makes of it."""
    model.eval()
    labels = list(label_texts)
    cells = np.asarray(rows["cell_type"])
    states = true_cell_states(model, rows, cell_tokenizer, batch_size).float().cpu()
    means = torch.stack([states[torch.as_tensor(cells == label)].mean(0) for label in labels])
    jobs = ScMMGPTJobs(model, processor, verbose=False)
    generated = jobs.text_cell_states([label_texts[label] for label in labels]).float().cpu()
    distances = ((generated[:, None] - means[None]) ** 2).mean((-1, -2))
    return float((distances.argmin(1) == torch.arange(len(labels))).float().mean())


__all__ = ["LLM_LORA_TARGETS", "PROJECTORS", "STAGE2_LOSSES", "STAGE2_TRAINING", "Stage2Arguments", "apply_tuning",
           "build_stage2_model", "cell_expression_matrix", "fit_cell_state_spread", "generated_cell_knn_accuracy",
           "generated_state_accuracy", "library_size_quantiles", "load_language_model", "quantization_config_4bit",
           "stage2_collator", "train_stage2", "true_cell_states", "use_expression_distribution",
           "warm_up_expression_decoder"]
