"""Writing files so that a crash never leaves a partial file under its final name, and reading them back."""
import json
import os
import tempfile

import torch


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or from a run with other settings."""


def save_atomic(obj, path):
    """torch.save (or JSON for a dict ending in .json) to a temporary file, fsync, then rename over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".json"):
                f.write(json.dumps(obj, indent=2).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"nothing to resume: {path} does not exist (start without --resume)")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); "
                              f"delete the folder to start again") from None


def settings_mismatch(saved, current):
    """'name: saved -> current' for every setting that differs, '' when none does."""
    keys = sorted(set(saved) | set(current))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k))
