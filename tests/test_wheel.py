"""The built wheel is complete: installed in a fresh virtual environment, away from the repository, it renders a model
card from the templates it carries, assembles a push folder with the Inference Endpoints handler and resolves Cell
Ontology labels from the ontology it carries."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

from .test_pipelines import make_processor, make_stage2

REPO = Path(__file__).resolve().parent.parent
# what the wheel is built from; copied so that the build leaves nothing in the shared working tree
SOURCES = ("pyproject.toml", "README.md", "modeling_scmmgpt", "train", "hub_cards")

CHILD = """
import json, sys
from pathlib import Path

sys.modules["cellxgene_ontology_guide"] = sys.modules["zstandard"] = None  # a base install: neither is a dependency

import modeling_scmmgpt
from modeling_scmmgpt.hub_cards import render_model_card
from modeling_scmmgpt.hub_push import assemble_push_folder
from modeling_scmmgpt.ontology_scmmgpt import cell_type_terms

folder, staged = sys.argv[1:]
card = render_model_card(folder, {"annotation": [{"method": "retrieval", "accuracy": 0.75}]}, model_name="scmmgpt-w")
report = assemble_push_folder(folder, staged, repo_id="org/scmmgpt-w")
terms = cell_type_terms(["B cell", "CL:0000623"])
print(json.dumps({"package": modeling_scmmgpt.__file__, "name": card.data.model_name, "text": card.text,
                  "added": report["added"], "terms": {label: term.name for label, term in terms.items()}}))
"""


def _run(*args, **kwargs) -> str:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{args[:4]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def build_wheel(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist",
         source, cwd=tmp_path)
    return next((tmp_path / "dist").glob("scmmgpt-*.whl"))


def fresh_venv_with(wheel: Path, tmp_path: Path) -> Path:
    """A venv holding only the wheel; the dependencies come from this interpreter's site-packages through a `.pth`
    (a plain path: the editable install's own `.pth` there is not processed, so the repository stays invisible)."""
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel)
    return python


@pytest.fixture
def saved_model(pbmc, minilm_tokenizer, tmp_path):
    processor = make_processor(pbmc, minilm_tokenizer)
    folder = tmp_path / "trained"
    make_stage2(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_wheel_installed_elsewhere_renders_cards_and_ships_the_handler(saved_model, tmp_path):
    wheel = build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        assert "modeling_scmmgpt/cell_ontology.json.gz" in archive.namelist()
    python = fresh_venv_with(wheel, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = _run(python, "-c", textwrap.dedent(CHILD), saved_model, tmp_path / "staged", cwd=elsewhere,
               env={**env, "HF_HUB_OFFLINE": "1"})
    result = json.loads(out.strip().splitlines()[-1])
    assert str(tmp_path / "venv") in result["package"] and str(REPO) not in result["package"]
    assert result["name"] == "scmmgpt-w" and "# scmmgpt-w" in result["text"]
    assert "| Cell type annotation (retrieval) | PBMC 68k (reduced), scanpy | – | accuracy | 0.75 |" in result["text"]
    assert "## How to load" in result["text"] and "## Limitations" in result["text"]
    assert {"handler.py", "requirements.txt"} <= set(result["added"])
    assert (tmp_path / "staged" / "handler.py").read_text() == (REPO / "hub_cards" / "handler.py").read_text()
    # Cell Ontology labels resolve from the ontology the wheel carries, which a push folder carries too
    assert result["terms"] == {"B cell": "B cell", "CL:0000623": "natural killer cell"}
    assert (tmp_path / "staged" / "cell_ontology.json.gz").is_file()
