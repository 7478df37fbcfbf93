"""scMMGPT models: stage 1 (`ScMMGPTModel`: cell encoder + Q-Former, alignment losses) and stage 2
(`ScMMGPTForConditionalGeneration`: + cell→text projector, causal LLM, text→cell projector, expression decoder).

Module names a PEFT user needs (LoRA on the LLM only, projectors trained in full):
    LoraConfig(target_modules=r"language_model\\..*\\.(q_proj|k_proj|v_proj|o_proj)",   # Llama-style; c_attn for GPT-2
               modules_to_save=["cell_to_text_projector", "text_to_cell_projector", "expression_decoder"])
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.utils import logging as hf_logging

from .configuration_scmmgpt import ScMMGPTConfig
from .modeling_cell_encoder import ScMMGPTCellModel, masked_mean
from .modeling_cell_pretraining import maskable_positions
from .modeling_data_parallel import data_parallel_world, gather_rows
from .modeling_expression_decoder import (CellStateSpread, CountDistribution, ExpressionDecoder, decoded_log1p,
                                          expression_loss)
from .modeling_outputs import ScMMGPTCausalLMOutput, ScMMGPTModelOutput, ScMMGPTTextToCellOutput
from .modeling_qformer import ScMMGPTQFormer
from .saving import SafeSerializationMixin


class ScMMGPTPreTrainedModel(SafeSerializationMixin, PreTrainedModel):
    # SafeSerializationMixin: atomic save_pretrained, safetensors-only from_pretrained with clear errors
    config_class = ScMMGPTConfig
    config: ScMMGPTConfig
    base_model_prefix = "scmmgpt"
    main_input_name = "gene_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["CellEncoderLayer", "QFormerLayer"]
    # the losses are per-batch means (LM, MSEs, contrastive), never sums over `num_items_in_batch`: Trainer must divide
    # them by the gradient-accumulation steps itself (a forward with **kwargs would otherwise read as doing it)
    accepts_loss_kwargs = False
    # checkpoints from before `contrastive_logit_scale` hold a 0-d `logit_scale`: a stage-1 training parameter only
    # (inference never reads it), so such checkpoints load with the initial temperature in its place
    _keys_to_ignore_on_load_unexpected = [r"(^|\.)logit_scale$"]
    # folders saved before the cell-state spread load with it unfitted (generation then adds no spread)
    _keys_to_ignore_on_load_missing = [r"(^|\.)contrastive_logit_scale$", r"^cell_state_spread\."]

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ScMMGPTModel):
            init.normal_(module.query_tokens, mean=0.0, std=self.config.initializer_range)
            init.constant_(module.contrastive_logit_scale,
                           float(torch.tensor(1.0 / self.config.contrastive_temperature).log()))
            if module.text_pooling_query is not None:
                init.zeros_(module.text_pooling_query)
        if isinstance(module, CellStateSpread):  # unfitted (a folder saved before it): adds no spread
            module.reset()


def _mlp(in_features: int, hidden: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features))


def same_texts(ids, mask, other_ids, other_mask) -> torch.Tensor:
    """(len(ids), len(other_ids)) bool: which tokenised texts are the same text, whatever their padding."""
    width = max(ids.shape[1], other_ids.shape[1])
    a = F.pad(ids.masked_fill(mask == 0, -1), (0, width - ids.shape[1]), value=-1)
    b = F.pad(other_ids.masked_fill(other_mask == 0, -1), (0, width - other_ids.shape[1]), value=-1)
    return (a[:, None] == b[None]).all(-1)


class ScMMGPTModel(ScMMGPTPreTrainedModel):
    r"""
    Stage 1: cell encoder + Q-Former + projection heads, trained with cell–text contrastive, matching and captioning.

    Cell inputs (`ScMMGPTCellTokenizer`): `gene_ids`, `expression_values`, `cell_attention_mask` (batch, genes + 1).
    Text inputs (the Q-Former's BERT tokenizer, `processor.qformer_text`): `qformer_input_ids`,
    `qformer_attention_mask` (batch, tokens), named apart from the LLM's `input_ids` as in InstructBLIP.
    `negative_texts` (optional): the same three text arguments for texts every cell's text must also beat in the
    contrastive loss, such as every training label's text, so that a type absent from the batch is still a
    candidate, as it is in retrieval (`Stage1Collator(negative_texts=...)`); `label_text_index` (batch,): the row of
    each cell's own label's text among them (-1: none), never its negative. Those that are a cell's text in the
    batch are candidates already and are skipped.
    """

    def __init__(self, config: ScMMGPTConfig):
        super().__init__(config)
        qconfig = config.qformer_config
        self.cell_model = ScMMGPTCellModel(config.cell_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, qconfig.hidden_size))
        self.cell_query_projection = nn.Linear(config.cell_config.hidden_size, qconfig.hidden_size)
        self.qformer = ScMMGPTQFormer(qconfig, config.cross_attention_frequency)
        self.cell_projection = nn.Linear(qconfig.hidden_size, config.embed_dim)
        self.text_projection = nn.Linear(qconfig.hidden_size, config.embed_dim)
        self.gene_text_projection = (nn.Linear(config.cell_config.hidden_size, qconfig.hidden_size)
                                     if config.text_gene_grounding else None)
        self.matching_head = nn.Linear(qconfig.hidden_size, 2)
        # zero: attention pooling starts as the mean pooling a pre-trained Q-Former (all-MiniLM-L6-v2) was trained for
        self.text_pooling_query = (nn.Parameter(torch.zeros(qconfig.hidden_size))
                                   if config.text_pooling == "attention" else None)
        # log of the contrastive loss's inverse temperature; one element, not a 0-d tensor: FSDP shards no 0-d parameter
        self.contrastive_logit_scale = nn.Parameter(torch.zeros(1))
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.qformer.embeddings.word_embeddings

    # ------------------------------------------------------------------------------------------------ features
    def query_outputs(self, gene_ids, expression_values, cell_attention_mask=None, text_ids=None, text_mask=None):
        """Q-Former outputs at the queries, (batch, num_query_tokens, hidden); with text, queries and text attend
        to each other (the matching view) and the full (batch, queries + text, hidden) is returned."""
        gene_states, queries = self._encode_cells(gene_ids, expression_values, cell_attention_mask)
        return self._read_cells(gene_states, queries, cell_attention_mask, text_ids, text_mask)

    def _encode_cells(self, gene_ids, expression_values, cell_attention_mask=None):
        """The cell encoder's output (batch, genes + 1, cell hidden) and the Q-Former's input queries built from it:
        computed once per training step and shared by the three stage-1 losses (as BLIP-2 shares its image
        features)."""
        gene_states = self.cell_model(gene_ids, expression_values, cell_attention_mask).last_hidden_state
        return gene_states, self._queries(gene_states, gene_ids, expression_values, cell_attention_mask)

    def _read_cells(self, gene_states, queries, cell_attention_mask=None, text_ids=None, text_mask=None,
                    text_bias=None):
        """The Q-Former over already encoded cells (`_encode_cells`). `text_bias` (batch, 1, queries + text,
        queries + text) overrides the attention pattern built from `text_mask`."""
        batch, n_query = gene_states.shape[0], self.config.num_query_tokens
        hidden = self.qformer.embeddings(text_ids, query_embeds=queries)
        bias = text_bias
        if bias is None and text_mask is not None:
            keys = torch.cat([torch.ones(batch, n_query, dtype=torch.bool, device=hidden.device), text_mask.bool()], 1)
            bias = keys[:, None, None, :]
        out = self.qformer(hidden, bias, n_query, gene_states, cell_attention_mask)
        return out if text_ids is not None else out[:, :n_query]

    def _queries(self, gene_states, gene_ids, expression_values, cell_attention_mask=None) -> torch.Tensor:
        """The Q-Former's input queries, (batch, num_query_tokens, hidden): the learned query tokens plus a projection
        of the cell's mean (layer-normed) gene state, each gene weighted by its expression value. Without that term
        a freshly initialised Q-Former hears the cell only through cross-attention, whose contribution starts near
        1e-3 of the residual stream, and contrastive training collapses to constant features (seen on PBMC); the
        `<cls>` output is near-constant across cells at initialisation too, the mean gene state is not. The
        weighting lets the highly expressed genes, the markers that tell cell types apart, lead the summary: on
        PBMC (stage 1 from the same stage-0 encoder, 3 split seeds) zero-shot retrieval rose from 0.710 to 0.752
        and the two closest cell types' mean query states moved from 0.166 to 0.335 of the states' spread apart
        (0.056 -> 0.132 on the seed where T reg and CD8+ naive cells had all but merged)."""
        genes = maskable_positions(gene_ids, cell_attention_mask, self.config.cell_config)
        weights = genes * expression_values.clamp(min=0)
        mean_state = masked_mean(self.qformer.cell_layernorm(gene_states), weights)
        return self.query_tokens + self.cell_query_projection(mean_state)[:, None]

    def get_cell_features(self, gene_ids, expression_values, cell_attention_mask=None) -> torch.Tensor:
        """Normalised cell features in the shared cell–text space, (batch, embed_dim)."""
        return self._cell_features(self.query_outputs(gene_ids, expression_values, cell_attention_mask))

    def _cell_features(self, queries) -> torch.Tensor:
        return F.normalize(self.cell_projection(queries.mean(1)), dim=-1)

    def get_text_features(self, qformer_input_ids, qformer_attention_mask=None, qformer_gene_ids=None) -> torch.Tensor:
        """Normalised text features (the Q-Former's mean text output), (batch, embed_dim), of text tokenised by the
        Q-Former's own tokenizer (`processor.qformer_text`); `qformer_gene_ids` (batch, tokens) names the cell
        vocabulary's gene of each token (0: none), read when the model grounds gene names (`text_gene_grounding`)."""
        input_ids = qformer_input_ids
        attention_mask = torch.ones_like(input_ids) if qformer_attention_mask is None else qformer_attention_mask
        self._check_text_ids(input_ids)
        embeddings = self.qformer.embeddings(input_ids, text_extra=self._gene_grounding(qformer_gene_ids))
        hidden = self.qformer(embeddings, attention_mask.bool()[:, None, None, :], 0)
        return F.normalize(self.text_projection(self._pool_text(hidden, attention_mask)), dim=-1)

    def _pool_text(self, hidden, attention_mask) -> torch.Tensor:
        """(batch, hidden): the mean of the text's token states (all-MiniLM-L6-v2, the default Q-Former, is trained
        for mean pooling), or with `text_pooling="attention"` their softmax-weighted sum."""
        valid = attention_mask.bool()
        if self.text_pooling_query is None:
            weights = valid.unsqueeze(-1).to(hidden.dtype)
            return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        scores = (hidden @ self.text_pooling_query).masked_fill(~valid, torch.finfo(hidden.dtype).min)
        return (hidden * scores.softmax(-1).unsqueeze(-1)).sum(1)

    def _negative_texts(self, negative_texts, label_text_index, batch_ids, batch_mask):
        """`(features, skip)` of `negative_texts` (text arguments, the same on every rank), or `(None, None)`:
        `skip` (cells, negatives) marks the pairs left out of the loss, a negative that is some cell's text in the
        batch (a candidate already) or the cell's own label's text (`label_text_index`, -1: none)."""
        if not negative_texts:
            return None, None
        ids, mask = negative_texts["qformer_input_ids"], negative_texts["qformer_attention_mask"]
        skip = same_texts(ids, mask, batch_ids, batch_mask).any(1)[None].expand(len(batch_ids), -1)
        if label_text_index is not None:
            skip = skip | (label_text_index[:, None] == torch.arange(len(ids), device=ids.device))
        used = ~skip.all(0)
        if not used.any():
            return None, None
        gene_ids = negative_texts.get("qformer_gene_ids")
        features = self.get_text_features(ids[used], mask[used], None if gene_ids is None else gene_ids[used])
        return features, skip[:, used]

    def _gene_grounding(self, gene_ids) -> torch.Tensor | None:
        if gene_ids is None or self.gene_text_projection is None:
            return None
        named = (gene_ids != self.config.cell_config.pad_token_id).unsqueeze(-1)
        return self.gene_text_projection(self.cell_model.encoder(gene_ids)) * named

    def _check_text_ids(self, input_ids):
        vocab = self.qformer.embeddings.word_embeddings.num_embeddings
        if input_ids.numel() and int(input_ids.max()) >= vocab:
            raise ValueError(f"text token id {int(input_ids.max())} is outside the Q-Former's vocabulary of {vocab}: "
                             "tokenise stage-1 text with the Q-Former's own (BERT) tokenizer, processor.qformer_text")

    def load_qformer_from_bert(self, bert_path: str, **hub_kwargs) -> list[str]:
        """Initialise the Q-Former from a BERT checkpoint (local folder or Hub id with `model.safetensors`); returns
        the Q-Former weights that BERT does not provide (cross-attention, LM head transform, ...)."""
        from safetensors.torch import load_file
        from transformers.utils import cached_file

        return self.qformer.load_bert_weights(load_file(cached_file(bert_path, "model.safetensors", **hub_kwargs)))

    # ------------------------------------------------------------------------------------------------ losses
    def _contrastive_loss(self, cell_embeds, text_embeds, same_text, negative_embeds=None, skip=None):
        """Symmetric InfoNCE; cells whose texts are identical all count as positives (cell types repeat in a batch).
        `negative_embeds`: more texts each cell's own must beat (other labels' texts), but for the pairs `skip`
        marks (cells × negatives)."""
        scale = self.contrastive_logit_scale.clamp(max=4.6052).exp()  # <= 100, as CLIP
        logits = scale * cell_embeds @ text_embeds.T
        targets = same_text.float() / same_text.sum(1, keepdim=True)
        margined = logits - scale * self.config.contrastive_margin * same_text  # CosFace's margin, on positives only
        per_text, text_targets = margined, targets
        if negative_embeds is not None:
            # a large finite logit, not -inf: the soft targets' zeros would meet log(0) in the cross-entropy
            negatives = (scale * cell_embeds @ negative_embeds.T).masked_fill(skip, -1e4)
            per_text = torch.cat([margined, negatives], 1)
            text_targets = F.pad(targets, (0, len(negative_embeds)))
        loss = (F.cross_entropy(per_text, text_targets) + F.cross_entropy(margined.T, targets)) / 2
        return loss, logits

    def _matching_loss(self, gene_states, queries, cell_attention_mask, input_ids, attention_mask, logits, same,
                       own_rows: slice | None = None, world: int = 1):
        """Cell–text matching: each positive pair, plus a hard negative text per cell and a hard negative cell per
        text drawn in proportion to their similarity (BLIP-2's hard-negative mining). With `world` > 1 the inputs are
        the global batch's (`forward` gathers them): every rank draws the negatives of the whole batch (with the same
        seed, the same ones), scores the pairs anchored on its `own_rows`, and scales its sum so that the mean over
        ranks is the mean over all pairs, the loss of one process holding the whole batch."""
        with torch.no_grad():
            weights = F.softmax(logits.float(), dim=1).masked_fill(same, 0.0)
        rows = torch.arange(len(same), device=same.device)
        cell_rows, texts, anchors, labels = rows, rows, rows, torch.ones_like(rows)
        for w, fixed_is_cell in ((weights, True), (weights.T, False)):
            usable = w.sum(1) > 0  # rows whose batch holds some other text
            if usable.any():
                fixed = torch.nonzero(usable).squeeze(1)
                drawn = torch.multinomial(w[usable], 1).squeeze(1)
                cell_rows = torch.cat([cell_rows, fixed if fixed_is_cell else drawn])
                texts = torch.cat([texts, drawn if fixed_is_cell else fixed])
                anchors = torch.cat([anchors, fixed])
                labels = torch.cat([labels, torch.zeros_like(fixed)])
        n_pairs = len(labels)
        if world > 1:
            own = (anchors >= own_rows.start) & (anchors < own_rows.stop)
            cell_rows, texts, labels = cell_rows[own], texts[own], labels[own]
        joint = self._read_cells(gene_states[cell_rows], queries[cell_rows], cell_attention_mask[cell_rows],
                                 input_ids[texts], attention_mask[texts])
        match_logits = self.matching_head(joint[:, : self.config.num_query_tokens]).mean(1)
        if world == 1:
            return F.cross_entropy(match_logits, labels)
        return F.cross_entropy(match_logits, labels, reduction="sum") * (world / n_pairs)

    def _captioning_loss(self, gene_states, queries, cell_attention_mask, input_ids, attention_mask, world: int = 1):
        """Next-token loss of the text through the Q-Former: queries see queries; text sees queries + earlier text.
        With `config.captioning_max_cells`, only the batch's first that many cells are captioned (per process): the
        LM head over the BERT vocabulary is most of a small model's stage-1 step (77 % on PBMC at batch 32). With
        `world` > 1 processes, this rank's token sum is scaled so that the mean over ranks is the mean over the
        global batch's tokens (ranks' texts differ in length)."""
        keep = self.config.captioning_max_cells
        if keep is not None and keep < input_ids.shape[0]:
            gene_states, queries, cell_attention_mask, input_ids, attention_mask = (
                t[:keep] for t in (gene_states, queries, cell_attention_mask, input_ids, attention_mask))
        n_query, (batch, n_text) = self.config.num_query_tokens, input_ids.shape
        device = input_ids.device
        length = n_query + n_text
        allowed = torch.zeros(batch, length, length, dtype=torch.bool, device=device)
        allowed[:, :n_query, :n_query] = True
        allowed[:, n_query:, :n_query] = True
        causal = torch.ones(n_text, n_text, dtype=torch.bool, device=device).tril()
        allowed[:, n_query:, n_query:] = causal & attention_mask.bool()[:, None, :]
        hidden = self._read_cells(gene_states, queries, cell_attention_mask, input_ids, text_bias=allowed[:, None])
        logits = self.qformer.text_logits(hidden[:, n_query:-1])
        targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
        logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        if world == 1:
            return F.cross_entropy(logits, targets, ignore_index=-100)
        tokens = (targets != -100).sum()
        torch.distributed.all_reduce(tokens)
        return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") * world / tokens.clamp(min=1)

    def forward(
        self,
        gene_ids: torch.LongTensor,
        expression_values: torch.Tensor,
        cell_attention_mask: torch.Tensor | None = None,
        qformer_input_ids: torch.LongTensor | None = None,
        qformer_attention_mask: torch.Tensor | None = None,
        qformer_gene_ids: torch.LongTensor | None = None,
        negative_texts: dict | None = None,
        label_text_index: torch.LongTensor | None = None,
        return_loss: bool = True,
        **kwargs,
    ) -> ScMMGPTModelOutput:
        cell_attention_mask = torch.ones_like(gene_ids) if cell_attention_mask is None else cell_attention_mask
        gene_states, queries = self._encode_cells(gene_ids, expression_values, cell_attention_mask)
        cell_embeds = self._cell_features(self._read_cells(gene_states, queries, cell_attention_mask))
        if qformer_input_ids is None:
            return ScMMGPTModelOutput(cell_embeds=cell_embeds)
        input_ids, attention_mask = qformer_input_ids, qformer_attention_mask
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        text_embeds = self.get_text_features(input_ids, attention_mask, qformer_gene_ids)
        # data-parallel training (DDP / FSDP / DeepSpeed): the contrastive and matching losses see the global batch,
        # as BLIP-2's do, so N processes of batch B train like one process of batch N·B (the test suite checks it)
        rank, world = data_parallel_world() if self.training else (0, 1)
        all_ids, all_mask = gather_rows(input_ids, world), gather_rows(attention_mask, world)
        same = same_texts(all_ids, all_mask, all_ids, all_mask)
        # every rank computes the whole contrastive loss; the gathers' backward sums the ranks' gradients, which
        # DDP's averaging then divides back: the gradient of the one-process loss
        negatives = self._negative_texts(negative_texts, None if label_text_index is None else
                                         gather_rows(label_text_index, world), all_ids, all_mask)
        contrastive, logits = self._contrastive_loss(gather_rows(cell_embeds, world), gather_rows(text_embeds, world),
                                                     same, *negatives)
        if not return_loss:
            return ScMMGPTModelOutput(logits_per_cell=logits, cell_embeds=cell_embeds, text_embeds=text_embeds)
        sizes = gather_rows(torch.tensor([len(input_ids)], device=input_ids.device), world).tolist()
        own_rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
        matching = self._matching_loss(
            gather_rows(gene_states, world), gather_rows(queries, world), gather_rows(cell_attention_mask, world),
            all_ids, all_mask, logits, same, own_rows, world)
        captioning = (self._captioning_loss(gene_states, queries, cell_attention_mask, input_ids, attention_mask,
                                            world)
                      if self.config.captioning_max_cells != 0 else contrastive.new_zeros(()))
        return ScMMGPTModelOutput(
            loss=contrastive + matching + captioning, loss_contrastive=contrastive, loss_matching=matching,
            loss_captioning=captioning, logits_per_cell=logits, cell_embeds=cell_embeds, text_embeds=text_embeds,
        )


class ScMMGPTForConditionalGeneration(ScMMGPTPreTrainedModel, GenerationMixin):
    r"""
    Stage 2: the stage-1 model (`scmmgpt`), a cell→text projector into the LLM's `<cell_i>` slots, the causal LLM
    (`language_model`), and the text→cell path (`text_to_cell_projector` + `expression_decoder`, and the
    `cell_state_spread` of training cells that generation draws states from).

    Text inputs come from `ScMMGPTProcessor` (`<cell>` expanded to `<boc><cell_0>…<eoc>`); `config.cell_token_ids`
    holds the ids of `<cell_0>…`. In `labels`, prompt tokens are -100: `<cell_i>` slots in the prompt receive the input
    cells' features, `<cell_i>` slots in the labelled target are *output* slots whose LLM states are mapped back to a
    cell (MSE to the target cell's Q-Former states, and MSE of the decoded expression).
    """

    main_input_name = "input_ids"

    def __init__(self, config: ScMMGPTConfig, language_model: PreTrainedModel | None = None):
        super().__init__(config)
        text_width, query_width = config.text_config.hidden_size, config.qformer_config.hidden_size
        self.scmmgpt = ScMMGPTModel(config)
        self.cell_to_text_projector = _mlp(query_width, config.projector_hidden_size, text_width)
        self.text_to_cell_projector = _mlp(text_width, config.projector_hidden_size, query_width)
        self.expression_decoder = ExpressionDecoder(config)
        self.cell_state_spread = CellStateSpread(config)
        self.language_model = AutoModelForCausalLM.from_config(config.text_config) if language_model is None else None
        self.post_init()
        if language_model is not None:  # set after post_init so that pre-trained LLM weights are not re-initialised
            self.language_model = language_model
            self.config.text_config = language_model.config
        self._suppress_cell_tokens_in_text()

    # with a bitsandbytes config, only the LLM's linear layers are quantised: the cell side is small and precise
    _QUANTIZATION_SKIP = ["scmmgpt", "cell_to_text_projector", "text_to_cell_projector", "expression_decoder",
                          "language_model.lm_head"]

    @classmethod
    def from_pretrained(cls, *args, quantization_config=None, **kwargs):
        """`PreTrainedModel.from_pretrained`; a bitsandbytes `quantization_config` (4-bit QLoRA) quantises the LLM
        only, unless it names its own `llm_int8_skip_modules`."""
        if quantization_config is not None and getattr(quantization_config, "llm_int8_skip_modules", "n/a") is None:
            quantization_config.llm_int8_skip_modules = list(cls._QUANTIZATION_SKIP)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        loaded = super().from_pretrained(*args, **kwargs)  # (model, loading info) with output_loading_info=True
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model._suppress_cell_tokens_in_text()  # folders saved before the generation config carried it
        return loaded

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def train(self, mode: bool = True):
        """As `nn.Module.train`, except that a frozen stage-1 part (`scmmgpt` with no trainable parameter, stage 2's
        default) stays in eval mode: its Q-Former's dropout would perturb the cell states that stage 2 reads and
        regresses onto, unlike the states at inference (on PBMC by 0.39 of the states' spread, more than some
        T-cell types lie apart; an expression decoder fitted to such states decoded the true per-type mean states
        1.59 PCA units from the types' mean expression on average, against 0.76 fitted to eval-mode states)."""
        super().train(mode)
        if mode and not any(p.requires_grad for p in self.scmmgpt.parameters()):
            self.scmmgpt.eval()
        return self

    def get_output_embeddings(self):
        return self.language_model.get_output_embeddings()

    # ------------------------------------------------------------------------------------------------ cell ↔ text
    def get_placeholder_mask(self, input_ids: torch.LongTensor) -> torch.Tensor:
        """(batch, length) bool: the `<cell_i>` slot tokens, which cells fill (inputs) or are read from (outputs)."""
        if not self.config.cell_token_ids:
            raise ValueError("config.cell_token_ids is not set: build the model with the processor's special tokens "
                             "(model.set_cell_token_ids(processor))")
        return torch.isin(input_ids, torch.tensor(self.config.cell_token_ids, device=input_ids.device))

    def set_cell_token_ids(self, processor) -> None:
        """Record the processor's `<boc>`, `<cell_i>`, `<eoc>` ids and grow the LLM's embeddings to its vocabulary."""
        self.config.cell_token_ids = list(processor.cell_token_ids)
        self.config.boc_token_id, self.config.eoc_token_id = processor.boc_token_id, processor.eoc_token_id
        if len(processor.tokenizer) > self.get_input_embeddings().num_embeddings:
            # the mean-and-covariance init of the new rows is wanted; transformers' notice of it is not news here
            resizing_logger = hf_logging.get_logger("transformers.modeling_utils")
            level = resizing_logger.level
            resizing_logger.setLevel(hf_logging.ERROR)
            try:
                self.language_model.resize_token_embeddings(len(processor.tokenizer))
            finally:
                resizing_logger.setLevel(level)
        self._suppress_cell_tokens_in_text()

    def _suppress_cell_tokens_in_text(self) -> None:
        """Generated text never holds a `<cell_i>` slot token: it would be read as a cell placeholder at the next step
        (with cells given and no KV cache: more slots than cells, an error)."""
        if self.config.cell_token_ids and self.generation_config is not None:
            self.generation_config.suppress_tokens = list(self.config.cell_token_ids)

    def get_cell_features(self, gene_ids, expression_values, cell_attention_mask=None) -> torch.Tensor:
        """Normalised cell features in the shared cell–text space, (batch, embed_dim) (the stage-1 part's)."""
        return self.scmmgpt.get_cell_features(gene_ids, expression_values, cell_attention_mask)

    def get_text_features(self, qformer_input_ids, qformer_attention_mask=None, qformer_gene_ids=None) -> torch.Tensor:
        """Normalised text features of Q-Former-tokenised text, (batch, embed_dim) (the stage-1 part's)."""
        return self.scmmgpt.get_text_features(qformer_input_ids, qformer_attention_mask, qformer_gene_ids)

    def get_cell_soft_tokens(self, gene_ids, expression_values, cell_attention_mask=None) -> torch.Tensor:
        """Cells → LLM input embeddings of their slots, (cells, num_query_tokens, llm_hidden)."""
        return self.cell_to_text_projector(self.scmmgpt.query_outputs(gene_ids, expression_values, cell_attention_mask))

    def _merge_cells(self, input_ids, inputs_embeds, input_slots, gene_ids, expression_values, cell_attention_mask):
        """Scatter projected cells into the input slots. Cells align with examples when there are as many cells as
        examples (an example without `<cell>` then ignores its row); otherwise they fill the slots in order."""
        n_query = self.config.num_query_tokens
        per_example = input_slots.sum(1)
        if gene_ids.shape[0] == input_ids.shape[0]:
            keep = per_example > 0
            gene_ids, expression_values = gene_ids[keep], expression_values[keep]
            cell_attention_mask = None if cell_attention_mask is None else cell_attention_mask[keep]
        n_slots = int(per_example.sum())
        if n_slots != gene_ids.shape[0] * n_query:
            raise ValueError(
                f"the text has {n_slots} cell slot tokens but {gene_ids.shape[0]} cells × {n_query} queries = "
                f"{gene_ids.shape[0] * n_query} cell features were given; each <cell> placeholder takes one cell"
            )
        if n_slots == 0:
            return inputs_embeds
        features = self.get_cell_soft_tokens(gene_ids, expression_values, cell_attention_mask)
        mask = input_slots.unsqueeze(-1).expand_as(inputs_embeds)
        return inputs_embeds.masked_scatter(mask, features.to(inputs_embeds.dtype))

    def decode_cell_states(self, slot_states: torch.Tensor, gene_ids: torch.LongTensor | None = None):
        """LLM states at output slots (n, num_query_tokens, llm_hidden) → (cell states (n, slots, qformer_hidden),
        the expression decoder's raw output for `gene_ids` ((n, genes), or (n, genes, 2 | 3) for a count
        distribution; see `ExpressionDecoder`), or None)."""
        cell_states = self.text_to_cell_projector(slot_states)
        decoded = None if gene_ids is None else self.expression_decoder(cell_states, gene_ids)
        return cell_states, decoded

    def decode_expression(self, cell_states: torch.Tensor, gene_ids: torch.LongTensor) -> torch.Tensor:
        """Cell states (n, slots, qformer_hidden) → predicted log1p expression (n, genes) of `gene_ids` (n, genes):
        the MSE decoder's value, or log1p of a count distribution's expected reads per target_sum (its mean)."""
        return decoded_log1p(self.expression_decoder(cell_states, gene_ids), self.config.expression_distribution)

    def decode_expression_distribution(self, cell_states: torch.Tensor,
                                       gene_ids: torch.LongTensor) -> CountDistribution:
        """Cell states (n, slots, qformer_hidden) → the per-gene count distribution (n, genes) of `gene_ids`, for a
        model whose `config.expression_distribution` is `"nb"` or `"zinb"`."""
        if self.config.expression_distribution == "mse":
            raise ValueError("this model's expression decoder predicts log1p values only (expression_distribution "
                             "'mse'), not a count distribution: decode the mean, or train an 'nb' / 'zinb' decoder")
        return CountDistribution.from_decoder_output(self.expression_decoder(cell_states, gene_ids))

    def get_text_cell_states(self, input_ids: torch.LongTensor, attention_mask=None) -> torch.Tensor:
        """The cell states a text describes, (batch, num_query_tokens, qformer_hidden): the LLM reads `input_ids`,
        each row ending in one cell's output slots (left-padded), and its last hidden states at the slots are
        projected back to the cell side."""
        hidden = self.language_model(input_ids=input_ids, attention_mask=attention_mask,
                                     output_hidden_states=True).hidden_states[-1]
        slots = self.get_placeholder_mask(input_ids)
        return self.text_to_cell_projector(hidden[slots].view(len(input_ids), self.config.num_query_tokens, -1))

    def text_to_cell_loss(self, slot_states, target_cells, decoder_gene_ids=None, decoder_targets=None,
                          decoder_mask=None, decoder_counts=None, decoder_size_factors=None) -> "ScMMGPTTextToCellOutput":
        """The text → cell losses of output slots: MSE of the cell states read from the LLM's slot states (n,
        num_query_tokens, llm_hidden) to the target cells' own Q-Former states (`target_cells`: gene ids, values,
        mask), and the expression loss of `decoder_gene_ids` weighted by `decoder_mask` (`expression_loss`: MSE to
        the log1p `decoder_targets`, or for a count decoder the negative log-likelihood of `decoder_counts` (n,
        genes) at `decoder_size_factors` (n,), library / target_sum); `loss` is their sum weighted by
        `config.cell_embed_loss_weight` / `config.expression_loss_weight`."""
        cell_states, decoded = self.decode_cell_states(slot_states, decoder_gene_ids)
        with torch.no_grad():  # the target is the cell's own Q-Former reading, not trained through this loss
            true_states = self.scmmgpt.query_outputs(*target_cells)
        distribution = self.config.expression_distribution
        out = ScMMGPTTextToCellOutput(loss_cell_embed=F.mse_loss(cell_states, true_states), cell_states=cell_states,
                                      expression=None if decoded is None else decoded_log1p(decoded, distribution))
        out.loss = self.config.cell_embed_loss_weight * out.loss_cell_embed
        if decoded is not None:
            out.loss_expression = expression_loss(decoded, distribution, decoder_targets, decoder_mask, decoder_counts,
                                                  decoder_size_factors)
            out.loss = out.loss + self.config.expression_loss_weight * out.loss_expression
        return out

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        gene_ids: torch.LongTensor | None = None,
        expression_values: torch.Tensor | None = None,
        cell_attention_mask: torch.Tensor | None = None,
        target_gene_ids: torch.LongTensor | None = None,
        target_expression_values: torch.Tensor | None = None,
        target_cell_attention_mask: torch.Tensor | None = None,
        decoder_gene_ids: torch.LongTensor | None = None,
        decoder_targets: torch.Tensor | None = None,
        decoder_mask: torch.Tensor | None = None,
        decoder_counts: torch.Tensor | None = None,
        decoder_size_factors: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> ScMMGPTCausalLMOutput:
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        slots = self.get_placeholder_mask(input_ids) if input_ids is not None else None
        output_slots = slots & (labels != -100) if labels is not None and slots is not None else None
        if gene_ids is not None:
            input_slots = slots & ~output_slots if output_slots is not None else slots
            inputs_embeds = self._merge_cells(input_ids, inputs_embeds, input_slots, gene_ids, expression_values,
                                              cell_attention_mask)
        wants_cells = output_slots is not None and target_gene_ids is not None and bool(output_slots.any())
        output_hidden_states = kwargs.pop("output_hidden_states", False) or wants_cells
        outputs = self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, cache=cache,
            use_cache=use_cache, output_hidden_states=output_hidden_states, **kwargs,
        )
        result = ScMMGPTCausalLMOutput(loss=outputs.loss, loss_lm=outputs.loss, logits=outputs.logits,
                                       cache=getattr(outputs, "cache", None), hidden_states=outputs.hidden_states)
        if wants_cells:
            rows = output_slots.any(1)
            n_query = self.config.num_query_tokens
            if (output_slots.sum(1)[rows] != n_query).any():
                raise ValueError(f"each example with an output cell needs exactly {n_query} labelled <cell_i> slots; "
                                 f"got {output_slots.sum(1)[rows].tolist()}")
            slot_states = outputs.hidden_states[-1][output_slots].view(-1, n_query, inputs_embeds.shape[-1])
            target_cells = (target_gene_ids[rows], target_expression_values[rows],
                            None if target_cell_attention_mask is None else target_cell_attention_mask[rows])
            pick = (lambda t: None if t is None else t[rows])
            cells = self.text_to_cell_loss(slot_states, target_cells, pick(decoder_gene_ids), pick(decoder_targets),
                                           pick(decoder_mask), pick(decoder_counts), pick(decoder_size_factors))
            result.loss = result.loss + cells.loss
            result.loss_cell_embed, result.loss_expression = cells.loss_cell_embed, cells.loss_expression
            result.cell_states, result.expression = cells.cell_states, cells.expression
        return result

    def prepare_inputs_for_generation(self, input_ids, *args, is_first_iteration: bool | None = False, **kwargs):
        """Cells are encoded in the prefill step only; later steps reuse the KV cache."""
        if not is_first_iteration and kwargs.get("use_cache", True):
            for key in ("gene_ids", "expression_values", "cell_attention_mask"):
                kwargs.pop(key, None)
        return super().prepare_inputs_for_generation(input_ids, *args, is_first_iteration=is_first_iteration, **kwargs)


__all__ = ["ScMMGPTPreTrainedModel", "ScMMGPTModel", "ScMMGPTForConditionalGeneration", "ExpressionDecoder",
           "ScMMGPTTextToCellOutput", "CountDistribution"]
