"""Does a folder load the way a Hub user would load it? `check_folder_loads(folder)` answers in a fresh interpreter.

The child runs this file by its path (`python hub_load_check.py FOLDER`, from an empty temporary folder), not with
`python -m modeling_scmmgpt.hub_load_check`: importing it as part of the package would import the package, and the
check is that nothing but the folder's own code (`trust_remote_code`) is needed. So this module imports nothing from
the package, relatively or otherwise, and the child blocks `modeling_scmmgpt` before loading anything.

The child prints one line, `SCMMGPT_LOAD_REPORT {json}`: the model and processor classes, whether the model class
came from the folder's code, missing / unexpected / mismatched weights, the pipeline classes declared in
`custom_pipelines`, and the label of a two-cell annotation smoke run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import warnings
from pathlib import Path

LOAD_REPORT = "SCMMGPT_LOAD_REPORT "
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------- the child
def _isolate():
    """As on a machine without the package: neither the installed package nor this file's folder (which Python put
    first on `sys.path`) may provide code; only the folder's remote code may."""
    sys.modules["modeling_scmmgpt"] = None
    sys.path[:] = [p for p in sys.path if Path(p or os.getcwd()).resolve() != HERE]


def _load_model(folder: str):
    """The model through the auto class the folder's `auto_map` gives its architecture (AutoModel for a bare
    encoder), with the loading info."""
    import transformers
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    auto_class = next((name for name, ref in (config.auto_map or {}).items()
                       if name != "AutoConfig" and ref.split(".")[-1] in (config.architectures or [])), "AutoModel")
    model, info = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True,
                                                                    output_loading_info=True)
    return config, model.eval(), info


def _load_processor(folder: str):
    from transformers import AutoFeatureExtractor, AutoProcessor

    if os.path.isfile(os.path.join(folder, "processor_config.json")):
        return AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    return AutoFeatureExtractor.from_pretrained(folder, trust_remote_code=True)


def _run_pipelines(folder: str, config, model, processor, report: dict):
    """Build each declared pipeline; annotate two cells by retrieval, the cheapest job, as a smoke run."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    for task, spec in (getattr(config, "custom_pipelines", None) or {}).items():
        pipeline_class = get_class_from_dynamic_module(spec["impl"], folder)
        pipe = pipeline_class(model=model, processor=processor, task=task, device=-1)
        report["pipelines"][task] = pipeline_class.__name__
        if task == "cell-annotation":
            # a classifier has only a cell tokenizer, and annotates with its own labels
            cell_tokenizer = getattr(processor, "feature_extractor", processor)
            # free-text labels with their texts: the check needs neither the model's label texts nor the ontology
            labels = {} if cell_tokenizer is processor else {
                "labels": ["a cell", "another cell"], "label_texts": ["cell type: a cell.", "cell type: another cell."]}
            genes = list(cell_tokenizer.gene_names[:16])
            out = pipe({"genes": genes, "counts": [[1.0] * len(genes), [float(i % 3) for i in range(len(genes))]]},
                       batch_size=2, **labels)
            report["smoke"] = json.loads(json.dumps(out))[0]["label"]


def main(argv: list[str] | None = None) -> int:
    """Load the folder given as the one argument and print the load report; an exception means it does not load."""
    (folder,) = sys.argv[1:] if argv is None else argv
    _isolate()
    warnings.simplefilter("ignore")
    config, model, info = _load_model(folder)
    report = {"model_class": type(model).__name__,
              "remote_code": type(model).__module__.startswith("transformers_modules"),
              "missing_keys": sorted(info.get("missing_keys") or []),
              "unexpected_keys": sorted(info.get("unexpected_keys") or []),
              "mismatched_keys": [str(k) for k in info.get("mismatched_keys") or []], "pipelines": {}}
    processor = _load_processor(folder)
    report["processor_class"] = type(processor).__name__
    _run_pipelines(folder, config, model, processor, report)
    print(LOAD_REPORT + json.dumps(report))
    return 0


# ---------------------------------------------------------------------------------------------------- the parent
def _problems(report: dict) -> list[str]:
    problems = [f"{key}: {report[key][:10]}" for key in ("missing_keys", "unexpected_keys", "mismatched_keys")
                if report[key]]
    if not report["remote_code"]:
        problems.append("the model class did not come from the folder's code")
    return problems


def check_folder_loads(folder, timeout: int = 1800) -> dict:
    """Load `folder` the way a Hub user would, in a fresh interpreter where `modeling_scmmgpt` cannot be imported:
    config, model (`trust_remote_code`, all weights present), processor, each declared pipeline class, and a two-cell
    annotation. Returns the load report; RuntimeError with the child's error when anything fails."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory(prefix="scmmgpt-load-check-") as modules:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": modules, "TRANSFORMERS_VERBOSITY": "error"}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(folder)], capture_output=True,
                              text=True, env=env, timeout=timeout, cwd=modules)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(LOAD_REPORT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{folder} does not load with trust_remote_code in a fresh process:\n"
                           + textwrap.indent((proc.stderr or proc.stdout)[-4000:], "  "))
    report = json.loads(lines[-1][len(LOAD_REPORT):])
    problems = _problems(report)
    if problems:
        raise RuntimeError(f"{folder} loads but not completely: " + "; ".join(problems))
    return report


__all__ = ["LOAD_REPORT", "check_folder_loads", "main"]


if __name__ == "__main__":
    sys.exit(main())
