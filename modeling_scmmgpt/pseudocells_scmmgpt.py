"""Pseudo-cell generation from text, the stage-2 job that runs the model the other way (text → cell): `generate_cells`
and `iter_generated_cells`, a mixin of `jobs_scmmgpt.ScMMGPTJobs`, which gives it `model`, `processor`,
`cell_tokenizer`, `kind` and `progress`."""

import warnings
from collections.abc import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .inputs_scmmgpt import check_names, check_non_negative, check_positive_int
from .kinds_scmmgpt import require_job
from .processing_scmmgpt import GENERATE_PROMPT
from .results_scmmgpt import GeneratedCells

GENERATED_OUTPUTS = ("counts", "log1p", "mean")  # what generate_cells returns: sampled counts, as log1p, or the mean
DEFAULT_LIBRARY_SIZE = 1e4  # sampled cells' library size when the model carries no training library sizes


class PseudoCellJobs:
    """`generate_cells` / `iter_generated_cells` of `ScMMGPTJobs` (see there for the loaded model's attributes)."""

    def _check_prompts(self, texts) -> list[str]:
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError("give a text or a non-empty list of texts")
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError("every text must be a non-empty string (an empty prompt says nothing about the cell)")
        tokenizer, budget = self.processor.tokenizer, self._prompt_budget()
        out = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > budget:
                warnings.warn(f"a prompt of {len(ids)} tokens is longer than the model reads ({budget}); it is "
                              f"truncated: {text[:60]!r}…", stacklevel=4)  # as in _warn_empty
                text = tokenizer.decode(ids[:budget])
            out.append(text)
        return out

    def _prompt_budget(self) -> int:
        """Text tokens a prompt may have: the LLM's positions less the prompt frame and the cell slots."""
        config = self.model.config.text_config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
        frame = len(self.processor.tokenizer(GENERATE_PROMPT.format(text="") + self.processor.cell_slot_text)["input_ids"])
        return max(1, positions - frame)

    @property
    def expression_distribution(self) -> str:
        """What the model's expression decoder predicts: `"mse"` (log1p values), `"nb"` or `"zinb"` (counts)."""
        return getattr(self.model.config, "expression_distribution", "mse")

    def generate_cells(self, texts, n_per_text: int = 1, genes: list[str] | None = None, seed: int | None = None,
                       noise_scale: float | None = None, batch_size: int = 32, *, output: str | None = None,
                       library_size=None, state_spread: float | None = None) -> GeneratedCells:
        """Pseudo-cells from text prompts: the LLM reads `"Generate a cell. {text} Cell:"` and the output cell slots,
        whose states are projected to a cell state and decoded over `genes` (default: the whole vocabulary).

        Args:
            output: `"counts"`: counts drawn from the decoder's per-gene count distribution (a `"nb"` / `"zinb"`
                decoder, `config.expression_distribution`) at each cell's library size; `"log1p"`: those draws as
                log1p(counts / library × target_sum), comparable with log-normalised cells; `"mean"`: the decoder's
                log1p mean, one point per text (the paper's decoding, and the only one of an `"mse"` decoder).
                Default: `"log1p"` for a count decoder, `"mean"` for an MSE one.
            library_size: of sampled cells: a number, or one per generated cell; None draws them from the training
                cells' library sizes (`config.library_size_quantiles`), else uses `DEFAULT_LIBRARY_SIZE` (10 000).
            state_spread: each cell's state is the text's state plus `state_spread` × the residual of a training
                cell around its own text's mean state (the model's `cell_state_spread`, fitted by stage 2; the nearest
                seen text's cells for a new text), so cells vary together across genes as real ones do; default 1.0
                for the sampled kinds, 0 for `"mean"` (and nothing for a model saved without a fitted spread).
            noise_scale: draws beyond a text's first add seeded Gaussian noise of `noise_scale` × the state's std to
                its cell state, so `n_per_text` means scatter around it; default 0.1 for `"mean"`, 0 for the sampled
                kinds.
            seed: every random draw (state spread and noise, library sizes, counts) comes from it: the same seed
                gives the same cells (None: 0).

        `iter_generated_cells` gives the same cells batch by batch.
        """
        return GeneratedCells.concatenate(list(self._generated_batches(
            texts, n_per_text, genes, seed, noise_scale, batch_size, output, library_size, state_spread)))

    def iter_generated_cells(self, texts, n_per_text: int = 1, genes: list[str] | None = None,
                             seed: int | None = None, noise_scale: float | None = None, batch_size: int = 32, *,
                             output: str | None = None, library_size=None,
                             state_spread: float | None = None) -> Iterator[GeneratedCells]:
        """`generate_cells`' cells `batch_size` at a time, the same cells for the same arguments (checked before
        the first batch): for writing many cells without holding them all."""
        return self._generated_batches(texts, n_per_text, genes, seed, noise_scale, batch_size, output, library_size,
                                       state_spread)

    def _generated_batches(self, texts, n_per_text, genes, seed, noise_scale, batch_size, output, library_size,
                           state_spread) -> Iterator[GeneratedCells]:
        """The arguments checked (warnings name the public job's caller: `stacklevel` 4), then a generator of the
        batches."""
        require_job(self.kind, "generate_cells")
        texts = self._check_prompts(texts)
        n_per_text, batch_size = check_positive_int(n_per_text, "n_per_text"), check_positive_int(batch_size, "batch_size")
        output = self._generated_output(output)
        noise_scale = check_non_negative((0.1 if output == "mean" else 0.0) if noise_scale is None else noise_scale,
                                    "noise_scale")
        state_spread = check_non_negative((0.0 if output == "mean" else 1.0) if state_spread is None else state_spread,
                                     "state_spread")
        genes = list(self.cell_tokenizer.gene_names) if genes is None else check_names(genes, "genes")
        gene_ids = torch.as_tensor(self.cell_tokenizer.convert_genes_to_ids(genes))
        if (gene_ids < 0).any():
            unknown = [g for g, i in zip(genes, gene_ids.tolist()) if i < 0]
            raise ValueError(f"{len(unknown)} requested genes are not in the model's vocabulary: {unknown[:10]}")
        seed = 0 if seed is None else int(seed)
        generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
        n_cells = len(texts) * n_per_text
        libraries = None if output == "mean" else self._library_sizes(library_size, n_cells, rng)
        gene_ids = gene_ids.to(self.model.device)

        def batches():
            states = torch.cat([self.text_cell_states(texts[i : i + batch_size])
                                for i in range(0, len(texts), batch_size)])
            bar = tqdm(total=n_cells, desc="generate", unit="cell", disable=not self.progress)
            for start in range(0, n_cells, batch_size):
                rows = torch.arange(start, min(start + batch_size, n_cells))
                sizes = None if libraries is None else libraries[rows.numpy()]
                with torch.inference_mode():  # per batch: never left on in the caller's code between batches
                    drawn = self.model.cell_state_spread.sample(states[rows // n_per_text], generator, state_spread)
                    later = (rows % n_per_text > 0).to(drawn)[:, None, None]  # a text's first draw: no noise
                    noise = torch.randn(drawn.shape, generator=generator).to(drawn)
                    drawn = drawn + noise * noise_scale * drawn.std(dim=(1, 2), keepdim=True) * later
                    expression = self._decoded_cells(drawn, gene_ids.expand(len(rows), -1), output, sizes, rng)
                yield GeneratedCells(expression=expression.astype(np.int32 if output == "counts" else np.float32),
                                     gene_names=genes, texts=[texts[i] for i in (rows // n_per_text).tolist()],
                                     output=output, library_sizes=sizes,
                                     target_sum=float(self.cell_tokenizer.target_sum))
                bar.update(len(rows))
            bar.close()

        return batches()

    def _generated_output(self, output) -> str:
        """The kind `generate_cells` returns: `output` checked against the decoder, or the decoder's default."""
        sampled = self.expression_distribution != "mse"
        output = ("log1p" if sampled else "mean") if output is None else output
        if output not in GENERATED_OUTPUTS:
            raise ValueError(f"output must be one of {list(GENERATED_OUTPUTS)}, got {output!r}")
        if output != "mean" and not sampled:
            raise ValueError(f"output={output!r} draws cells from a count distribution, but this model's expression "
                             "decoder predicts log1p values only (expression_distribution 'mse'): use output='mean'")
        return output

    def _library_sizes(self, library_size, n_cells: int, rng: np.random.Generator) -> np.ndarray:
        """(n_cells,) library sizes of sampled cells: given, or drawn (log-linear between the training quantiles)."""
        if library_size is None:
            quantiles = getattr(self.model.config, "library_size_quantiles", None)
            if not quantiles:
                return np.full(n_cells, DEFAULT_LIBRARY_SIZE)
            log_quantiles = np.log(np.maximum(np.asarray(quantiles, dtype=np.float64), 1.0))
            drawn = np.interp(rng.random(n_cells), np.linspace(0.0, 1.0, len(log_quantiles)), log_quantiles)
            return np.round(np.exp(drawn))
        sizes = np.asarray(library_size, dtype=np.float64)
        sizes = np.full(n_cells, float(sizes)) if sizes.ndim == 0 else sizes
        if sizes.shape != (n_cells,) or not np.isfinite(sizes).all() or (sizes <= 0).any():
            raise ValueError(f"library_size must be a positive number or {n_cells} positive numbers (one per "
                             f"generated cell), got {library_size!r}")
        return sizes

    def _decoded_cells(self, cell_states, gene_ids, output: str, libraries, rng) -> np.ndarray:
        """(cells, genes) of one batch of cell states: the log1p mean, or counts drawn at `libraries` (as counts or
        as log1p)."""
        if output == "mean":
            return self.model.decode_expression(cell_states, gene_ids).clamp(min=0).float().cpu().numpy()
        size_factors = libraries / self.cell_tokenizer.target_sum
        counts = self.model.decode_expression_distribution(cell_states, gene_ids).sample(size_factors, rng)
        return counts if output == "counts" else np.log1p(counts / size_factors[:, None])

    @torch.inference_mode()
    def text_cell_states(self, texts: list[str]) -> torch.Tensor:
        """The cell state each text is read into, (texts, num_query_tokens, qformer_hidden): what `generate_cells`
        decodes (before its noise)."""
        prompts = [GENERATE_PROMPT.format(text=t) + self.processor.cell_slot_text for t in texts]
        # left padding: the slots end every row at the same positions
        encoded = self.processor.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        return self.model.get_text_cell_states(encoded["input_ids"].to(self.model.device),
                                               encoded["attention_mask"].to(self.model.device))


__all__ = ["DEFAULT_LIBRARY_SIZE", "GENERATED_OUTPUTS", "PseudoCellJobs"]
