"""`scmmgpt push MODEL_DIR REPO_ID`: check a saved scMMGPT folder and upload it to the Hugging Face Hub.

- `assemble_push_folder(model_dir, out_dir)`: the folder to upload (safetensors weights, `config.json` with `auto_map`
  and `custom_pipelines`, the code files, processor files, the card, the Inference Endpoints handler).
- `check_folder_loads` (from `hub_load_check`): the assembled folder loads through `trust_remote_code` in a fresh
  process.
- `push_model` / `push_main`: both, then the upload (`--dry-run` lists the files instead).

The handler files (`handler.py`, `requirements.txt`) live in the repository's `hub_cards/`; a wheel carries them as
`modeling_scmmgpt/hub_endpoint/` (pyproject's package-dir mapping), and `ENDPOINT_DIRS` looks in both places.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from .hub_cards import CELL_ONLY_KINDS, read_json, render_model_card, validate_card_metadata
from .hub_load_check import check_folder_loads
from .kinds_scmmgpt import model_kind

PACKAGE_DIR = Path(__file__).resolve().parent
# where the Inference Endpoints handler files are: inside an installed wheel, or beside the package in the repository
ENDPOINT_DIRS = (PACKAGE_DIR / "hub_endpoint", PACKAGE_DIR.parent / "hub_cards")
ENDPOINT_FILES = ("handler.py", "requirements.txt")
# never uploaded: pickles (we publish safetensors only) and training state
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SKIPPED_DIRS = re.compile(r"^(checkpoint-\d+|runs|wandb|logs|__pycache__|hf_modules)$")
SKIPPED_FILES = re.compile(r"^(trainer_state\.json|optimizer.*|scheduler.*|rng_state.*)$")


def _write_json(path, data):
    """Replace a file with JSON (unlinking first, so that a hard-linked original is never written through)."""
    path = Path(path)
    if path.exists():
        path.unlink()
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------- folders
def _code_modules(folder: Path) -> set[str]:
    """Module names referenced by the folder's `auto_map`s and `custom_pipelines`."""
    refs = []

    def collect(auto_map):
        for value in (auto_map or {}).values():
            refs.extend(v for v in (value if isinstance(value, (list, tuple)) else [value]) if v)

    config = read_json(folder / "config.json")
    collect(config.get("auto_map"))
    refs.extend(task["impl"] for task in (config.get("custom_pipelines") or {}).values())
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            data = read_json(folder / name)
            collect(data.get("auto_map"))
            collect((data.get("feature_extractor") or {}).get("auto_map"))
    return {ref.split("--")[-1].rsplit(".", 1)[0] for ref in refs}


def _add_code_files(folder: Path) -> list[str]:
    """Copy from this package every code file the folder's maps need (and what they import relatively) that the folder
    lacks; the folder's own copies, saved with its weights, are kept. Returns the files added."""
    added, pending, seen = [], sorted(_code_modules(folder)), set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        target = folder / f"{module}.py"
        if not target.is_file():
            source = PACKAGE_DIR / f"{module}.py"
            if not source.is_file():
                raise FileNotFoundError(f"the folder needs {module}.py, which neither it nor the scMMGPT package has")
            shutil.copyfile(source, target)
            added.append(target.name)
        text = target.read_text(encoding="utf-8")
        pending += re.findall(r"^\s*from\s+\.(\w+)\s+import", text, flags=re.MULTILINE)
        pending += re.findall(r"^\s*import\s+\.(\w+)\s*$", text, flags=re.MULTILINE)
    return added


def _copy_tree(source: Path, target: Path, skipped: list[str], prefix: str = ""):
    """Copy what belongs on the Hub; weights are hard-linked (never written to afterwards), the rest copied."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(source.iterdir()):
        rel = prefix + entry.name
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if SKIPPED_DIRS.match(entry.name):
                skipped.append(f"{rel}/ (training artefact)")
            else:
                _copy_tree(entry, target / entry.name, skipped, rel + "/")
            continue
        if entry.suffix in PICKLE_SUFFIXES:
            skipped.append(f"{rel} (pickle; only safetensors are published)")
            continue
        if SKIPPED_FILES.match(entry.name):
            skipped.append(f"{rel} (training state)")
            continue
        if entry.suffix == ".safetensors":
            try:
                os.link(entry, target / entry.name)
                continue
            except OSError:
                pass
        shutil.copy2(entry, target / entry.name)


def _check_weights(folder: Path, source: Path):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{source}: the weight index lists shards that are missing: {missing}")
    elif not (folder / "model.safetensors").is_file():
        pickles = sorted(p.name for p in source.glob("pytorch_model*.bin"))
        hint = (f" (it has {pickles}: pickle weights are not published; load and re-save with save_pretrained)"
                if pickles else "")
        raise FileNotFoundError(f"{source} has no safetensors weights (model.safetensors){hint}")


def _check_processor_files(folder: Path, kind: str, source: Path):
    needed = ["gene_vocab.json"]
    needed += (["processor_config.json", "tokenizer_config.json"] if kind not in CELL_ONLY_KINDS
               else ["preprocessor_config.json"])
    missing = [n for n in needed if not (folder / n).is_file()]
    if missing:
        what = ("processor.save_pretrained(folder)" if kind not in CELL_ONLY_KINDS
                else "cell_tokenizer.save_pretrained(folder)")
        raise FileNotFoundError(f"{source} lacks {missing}: save the processor into the model folder ({what})")


def _write_auto_map(out: Path, config: dict, kind) -> None:
    """`auto_map`: what save_pretrained writes for registered classes; filled in for folders saved without it."""
    auto_map = dict(config.get("auto_map") or {})
    auto_map.setdefault("AutoConfig", f"configuration_scmmgpt.{kind.config_class}")
    auto_map.setdefault(kind.auto_class, f"{kind.module}.{kind.architecture}")
    _write_json(out / "config.json", {**config, "auto_map": auto_map})


def endpoint_file(name: str) -> Path | None:
    """The path of an Inference Endpoints handler file (`handler.py`, `requirements.txt`), wheel or repository."""
    return next((folder / name for folder in ENDPOINT_DIRS if (folder / name).is_file()), None)


def _add_endpoint_files(out: Path) -> list[str]:
    """The handler serves the pipelines; a bare cell encoder has none, so it gets no handler."""
    if not read_json(out / "config.json").get("custom_pipelines"):
        return []
    added = []
    for name in ENDPOINT_FILES:
        source = endpoint_file(name)
        if not (out / name).exists() and source is not None:
            shutil.copyfile(source, out / name)
            added.append(name)
    return added


def _card(out: Path, source: Path, repo_id, eval_results, card_kwargs) -> str:
    """Render the card when the folder has none or results are given; validate it either way."""
    state = "kept"
    if eval_results is not None or not (out / "README.md").is_file():
        if (out / "README.md").exists():
            (out / "README.md").unlink()
        render_model_card(out, eval_results, repo_id=repo_id, **(card_kwargs or {}))
        state = "rendered"
    try:
        validate_card_metadata(out / "README.md")
    except ValueError as error:
        if state == "kept":
            raise ValueError(f"{source}/README.md: {error} (delete it to have the card rendered, or pass evaluation "
                             "results, `--eval-results FILE`, to re-render it)") from None
        raise
    return state


def assemble_push_folder(model_dir, out_dir, *, repo_id: str | None = None, eval_results: dict | None = None,
                         card_kwargs: dict | None = None) -> dict:
    """Build in `out_dir` (created; must not exist or be empty) the folder to upload from a saved model folder:
    safetensors weights (hard-linked), `config.json` with `auto_map` and `custom_pipelines`, the code files, processor
    files, the model card (rendered when the folder has none or `eval_results` are given; validated either way), and the
    Inference Endpoints `handler.py` + `requirements.txt`. Pickles and training state are left out.

    Returns `{"kind", "skipped": [...], "added": [...], "card": "kept" | "rendered"}`."""
    from .pipeline_scmmgpt import save_pipelines

    source, out = Path(model_dir), Path(out_dir)
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} is not a saved model folder (no config.json)")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    config = read_json(source / "config.json")
    kind = model_kind(config)
    skipped: list[str] = []
    _copy_tree(source, out, skipped)
    _check_weights(out, source)
    _check_processor_files(out, kind.name, source)
    _write_auto_map(out, config, kind)
    save_pipelines(out)
    added = _add_code_files(out) + _add_endpoint_files(out)
    card_state = _card(out, source, repo_id, eval_results, card_kwargs)
    return {"kind": kind.name, "skipped": skipped, "added": added, "card": card_state}


# ---------------------------------------------------------------------------------------------------- push
def list_files(folder) -> list[tuple[str, int]]:
    """(relative path, size in bytes) of every file under `folder`, sorted."""
    folder = Path(folder)
    return sorted((p.relative_to(folder).as_posix(), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def push_model(model_dir, repo_id: str, *, private: bool = False, dry_run: bool = False, token: str | None = None,
               eval_results: dict | None = None, card_kwargs: dict | None = None, commit_message: str | None = None,
               check_load: bool = True, staging_dir: str | None = None, log=print) -> dict:
    """Assemble (`assemble_push_folder`), validate the card and that the folder loads through `trust_remote_code`
    (`check_folder_loads`), then create the repo (`private` applies when it is created) and upload the folder with
    `HfApi.upload_folder`. `dry_run` does everything but the two Hub calls. The assembled folder is built in a
    temporary folder beside `model_dir` (removed afterwards) or in `staging_dir` (kept).

    Returns `{"repo_id", "files": [(path, bytes)], "dry_run", "skipped", "added", "load_report", "commit_url"}`."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as error:
        raise ValueError(f"invalid repo id {repo_id!r}: {error}") from None
    source = Path(model_dir).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"no model folder at {model_dir}")
    root = None
    if staging_dir is None:  # beside the source, so that weights hard-link instead of copying
        root = Path(tempfile.mkdtemp(prefix=".scmmgpt-push-", dir=source.parent))
        staging = root / re.sub(r"[^\w-]", "_", repo_id.split("/")[-1])
    else:
        staging = Path(staging_dir)
    try:
        assembled = assemble_push_folder(source, staging, repo_id=repo_id, eval_results=eval_results,
                                         card_kwargs=card_kwargs)
        report = check_folder_loads(staging) if check_load else None
        files = list_files(staging)
        result = {"repo_id": repo_id, "files": files, "dry_run": dry_run, "load_report": report,
                  "commit_url": None, **assembled}
        log(f"{'dry run: would upload' if dry_run else 'uploading'} {len(files)} files to {repo_id}:")
        for path, size in files:
            log(f"  {path}  ({size:,} bytes)")
        for entry in assembled["skipped"]:
            log(f"  left out: {entry}")
        if dry_run:
            return result
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(staging), repo_type="model",
                                   commit_message=commit_message or f"Upload scMMGPT ({assembled['kind']})")
        result["commit_url"] = getattr(commit, "commit_url", None) or str(commit)
        log(f"uploaded: {result['commit_url']}")
        return result
    finally:
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)


def push_main(argv: list[str] | None = None) -> int:
    """`scmmgpt push MODEL_DIR REPO_ID [--private] [--dry-run]`: check and upload a saved model folder to the Hub."""
    parser = argparse.ArgumentParser(prog="scmmgpt push", description=push_main.__doc__)
    parser.add_argument("model_dir", help="a folder written by save_pretrained (model + processor)")
    parser.add_argument("repo_id", help="the Hub repository, org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private (when it is new)")
    parser.add_argument("--dry-run", action="store_true", help="do everything except the upload; list the files")
    parser.add_argument("--eval-results", help="JSON file of evaluation results for the card (re-renders it)")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message")
    parser.add_argument("--staging-dir", help="assemble the upload here and keep it (default: a temporary folder)")
    parser.add_argument("--skip-load-check", action="store_true",
                        help="skip loading the folder in a fresh process (for models too big for this machine)")
    args = parser.parse_args(argv)
    eval_results = read_json(args.eval_results) if args.eval_results else None
    try:
        push_model(args.model_dir, args.repo_id, private=args.private, dry_run=args.dry_run, token=args.token,
                   eval_results=eval_results, commit_message=args.commit_message, staging_dir=args.staging_dir,
                   check_load=not args.skip_load_check)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"scmmgpt push: {error}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "assemble_push_folder",
    "check_folder_loads",
    "endpoint_file",
    "list_files",
    "push_main",
    "push_model",
]
