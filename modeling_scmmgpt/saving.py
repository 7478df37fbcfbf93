"""Safe saving and loading of scMMGPT models: atomic `save_pretrained`, clear errors for damaged weights, safetensors
only.

- A save is written into a temporary folder beside the target and renamed into place at the end, so a save killed
  midway (Ctrl-C, OOM kill, full disk) never leaves a folder that loads as if complete. Files already in the target that
  the save does not write (a tokenizer saved there before, say) are carried over; stale weight files are not.
- `from_pretrained` reads safetensors only (`use_safetensors=True` unless asked otherwise; a `.bin` pickle would be
  refused by `torch.load(weights_only=True)` anyway) and turns safetensors' terse header errors into one that names the
  folder and says what to do.
"""

import os
import re
import shutil
import tempfile

# weight files a new save replaces as a whole (transformers removes stale shards the same way)
_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def _carry_over(source: str, target: str, top: bool = True):
    """Hard-link (or copy) into `target` whatever `source` holds that `target` lacks, the folder's own weight files
    excepted (those of subfolders, e.g. a Trainer's `checkpoint-N/`, are kept)."""
    for name in os.listdir(source):
        src, dst = os.path.join(source, name), os.path.join(target, name)
        if os.path.lexists(dst) or (top and _WEIGHT_FILE.match(name)):
            continue
        if os.path.isdir(src) and not os.path.islink(src):
            os.makedirs(dst)
            _carry_over(src, dst, top=False)
            continue
        try:
            os.link(src, dst)  # the save is done: nothing writes into these files any more
        except OSError:
            shutil.copy2(src, dst, follow_symlinks=False)


def atomic_save(save, save_directory, *args, **kwargs):
    """Calls `save(temporary_folder, *args, **kwargs)` and moves the result to `save_directory` in one rename
    (two when the target exists: target → backup, new → target; the backup is removed afterwards)."""
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file, not a folder")
    target = os.path.abspath(save_directory)
    parent, name = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    if kwargs.get("push_to_hub"):  # transformers names the Hub repo after the folder it is given
        kwargs.setdefault("repo_id", name)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        result = save(staging, *args, **kwargs)
        if os.path.isdir(target):
            _carry_over(target, staging)
            backup = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
            os.rmdir(backup)
            os.replace(target, backup)
            os.replace(staging, target)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result


class SafeSerializationMixin:
    """Mix in before `PreTrainedModel`: atomic `save_pretrained`, safetensors-only `from_pretrained` with clear errors."""

    def save_pretrained(self, save_directory, *args, **kwargs):
        return atomic_save(super().save_pretrained, save_directory, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        kwargs.setdefault("use_safetensors", True)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as error:
            if type(error).__name__ != "SafetensorError":
                raise
            raise OSError(
                f"the weights in {pretrained_model_name_or_path} cannot be read ({error}): the safetensors file is "
                "corrupted or truncated, e.g. by an interrupted download or copy; download or save it again"
            ) from error


__all__ = ["SafeSerializationMixin", "atomic_save"]
