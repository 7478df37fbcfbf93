"""Package-level contracts: light import, registration, console script."""

import subprocess
import sys


def test_import_pulls_in_no_optional_package():
    # the import's time is a benchmark (benchmarks/run.py, "import"), not an assertion: it depends on the machine
    # (not zstandard: torch.distributed.checkpoint imports it whenever it is installed)
    code = (
        "import sys; import modeling_scmmgpt; "
        "print(','.join(m for m in ('anndata', 'scanpy', 'bitsandbytes', 'peft', 'datasets', 'trl', 'sklearn', "
        "'cellxgene_ontology_guide') "
        "if m in sys.modules))"
    )
    heavy = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert heavy == "", f"import modeling_scmmgpt pulled in optional packages: {heavy}"
    # nor reads the Cell Ontology: it is loaded when a label needs it
    code = "import modeling_scmmgpt.ontology_scmmgpt as o; print(o.load_cell_ontology.cache_info().currsize)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "0"


def test_register_is_idempotent_and_auto_classes_resolve():
    from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

    import modeling_scmmgpt

    modeling_scmmgpt.register()
    config = AutoConfig.for_model("scmmgpt_cell", vocab_size=50, hidden_size=16, num_attention_heads=2,
                                  num_hidden_layers=1, intermediate_size=16)
    assert type(AutoModel.from_config(config)).__name__ == "ScMMGPTCellModel"
    from transformers.models.auto.feature_extraction_auto import FEATURE_EXTRACTOR_MAPPING

    assert FEATURE_EXTRACTOR_MAPPING[type(config)].__name__ == "ScMMGPTCellTokenizer"
    assert AutoFeatureExtractor is not None


def test_console_script_help():
    out = subprocess.run([sys.executable, "-m", "modeling_scmmgpt.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "demo" in out.stdout and "build-dataset" in out.stdout


# the modeling layer: configs, cell tokenizer, processor, models; everything above it may import it, never the reverse
MODELING_FILES = ("configuration_scmmgpt", "feature_extraction_scmmgpt", "processing_scmmgpt", "saving",
                  "modeling_cell_encoder", "modeling_cell_pretraining", "modeling_cell_classification",
                  "modeling_qformer", "modeling_data_parallel", "modeling_outputs", "modeling_scmmgpt",
                  "ontology_scmmgpt")
UPPER_LAYERS = ("jobs_scmmgpt", "kinds_scmmgpt", "pseudocells_scmmgpt", "results_scmmgpt", "inputs_scmmgpt",
                "pipeline_scmmgpt", "cli", "cli_jobs", "hub", "convert_scgpt",
                "scmmgpt_train", "train")


def _imported_modules(path) -> set[str]:
    """Every module a file imports, at any depth (top-level, in functions, relative), by its last dotted parts."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}".lstrip(".") for alias in node.names)
    return names


def test_modeling_files_import_nothing_from_the_layers_above():
    from pathlib import Path

    import modeling_scmmgpt

    folder = Path(modeling_scmmgpt.__file__).parent
    for name in MODELING_FILES:
        imported = _imported_modules(folder / f"{name}.py")
        upward = {m for m in imported for layer in UPPER_LAYERS
                  if m == layer or m.startswith(f"{layer}.") or m.split(".")[-1].startswith(layer)
                  or f".{layer}" in f".{m}"}
        assert not upward, f"{name}.py imports from a layer above the models: {sorted(upward)}"
