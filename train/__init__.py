"""Training code of scMMGPT (installed as `scmmgpt_train`): data building, collators, stage 0/1/2 training, evaluation."""
