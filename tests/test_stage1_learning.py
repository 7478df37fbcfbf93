"""A tiny stage-1 model learns cell–text alignment on real cells: trained with `Trainer` on the shipped PBMC file and
Cell Ontology texts, zero-shot retrieval annotation of held-out cells rises from chance to well above the majority
class (above the majority class by 0.2; chance is 0.10)."""

import numpy as np
import torch
from transformers import TrainingArguments

from scmmgpt_train.data import build_dataset
from scmmgpt_train.splits import split_dataset
from scmmgpt_train.stage1 import (
    Stage1Trainer,
    build_stage1_model,
    label_texts_of,
    retrieval_accuracy,
    stage1_collator,
)


def test_stage1_training_raises_held_out_retrieval_accuracy(pbmc_path, minilm_tokenizer, tmp_path):
    dataset, cell_tokenizer = build_dataset(pbmc_path, return_tokenizer=True, label_column="bulk_labels")
    cell_tokenizer.max_genes = 128
    splits = split_dataset(dataset, by="cell", test_size=0.3, seed=0)
    label_texts = label_texts_of(dataset)
    assert len(label_texts) == 10 and all(t.startswith("cell type: ") for t in label_texts.values())
    test_labels = np.asarray(splits["test"]["cell_type"])
    majority = max(np.mean(test_labels == label) for label in label_texts)

    torch.manual_seed(0)
    # captioning 8 cells a batch, as tiny-cpu does: the BERT-vocabulary LM head dominates a step otherwise
    model = build_stage1_model(cell_tokenizer, minilm_tokenizer, max_text_length=64, num_query_tokens=8, embed_dim=32,
                               cell_config=dict(hidden_size=64, num_attention_heads=4, intermediate_size=128),
                               captioning_max_cells=8)
    before = retrieval_accuracy(model, splits["test"], cell_tokenizer, minilm_tokenizer, label_texts)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=150, per_device_train_batch_size=32, learning_rate=1e-3, warmup_steps=10,
        weight_decay=1e-3, logging_steps=25, save_strategy="no", report_to=[], remove_unused_columns=False,
        use_cpu=True, seed=0, disable_tqdm=True,
    )
    trainer = Stage1Trainer(model=model, args=args, train_dataset=splits["train"],
                            data_collator=stage1_collator(cell_tokenizer, minilm_tokenizer, 64))
    trainer.train()
    after = retrieval_accuracy(model, splits["test"], cell_tokenizer, minilm_tokenizer, label_texts)
    print(f"held-out retrieval accuracy {before:.3f} -> {after:.3f} (majority {majority:.3f}, chance 0.100)")

    logs = [entry for entry in trainer.state.log_history if "loss_contrastive" in entry]
    assert logs[-1]["loss_contrastive"] < logs[0]["loss_contrastive"] - 0.5
    assert logs[-1]["loss_captioning"] < logs[0]["loss_captioning"]
    assert before < 0.25
    assert after > majority + 0.2
