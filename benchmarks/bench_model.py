"""Benchmarks of the multimodal model (Q-Former + LLM): stage-1 and stage-2 training throughput and annotation
throughput on the tiny config.

The model (`modeling_scmmgpt/modeling_scmmgpt.py`) has not landed yet, so these rows say "not yet measured" instead of
showing a number. When it lands, write each measurement as a function here that returns a dict with `cells_per_s`
(and run it through `common.measure_in_subprocess` from `run.py`, like the encoder rows), then list it in `BENCHES`
with `implemented=True`.
"""

import importlib.util
import os

from .common import ROOT

# name → (what it measures, the function in this module once written)
BENCHES = {
    "stage1_training": "stage-1 training step (GTC + GTM + LM losses, backward, optimizer) on the tiny config, cells/s",
    "stage2_training": "stage-2 training step (LM + cell-embedding MSE + expression MSE, LoRA) on the tiny config, cells/s",
    "annotation": "batched cell-type annotation (retrieval and LLM likelihood ranking) on the tiny config, cells/s",
}


def model_landed() -> bool:
    return os.path.exists(os.path.join(ROOT, "modeling_scmmgpt", "modeling_scmmgpt.py")) and (
        importlib.util.find_spec("modeling_scmmgpt") is not None
    )


def rows(quick: bool = False) -> list[dict]:
    """One row per model benchmark; a status instead of a figure for the ones not measured."""
    out = []
    for name, what in BENCHES.items():
        function = globals().get(name)
        if function is None:
            status = ("not yet measured: model landed, benchmark not written (benchmarks/bench_model.py)"
                      if model_landed() else "not yet measured: model not landed")
            out.append({"name": name, "measures": what, "status": status})
        else:  # pragma: no cover - filled in when the model lands
            from .common import measure_in_subprocess

            out.append({"name": name, "measures": what, **measure_in_subprocess("bench_model", name, quick=quick)})
    return out
