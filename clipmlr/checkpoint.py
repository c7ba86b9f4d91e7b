"""Checkpoints and resume (a layer): files written so that a crash never leaves a partial file under its final
name, a run's state read back, and the check that a resumed run has the settings it was started with."""
import json
import os
import pickle
import secrets

import torch


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, or from a run with other settings."""


TMP_SUFFIX = ".tmp"  # what save_atomic's temporary files end with (remove_stale finds the ones a kill left)


def save_atomic(obj, path):
    """torch.save (or strict JSON for a path ending in .json) to a temporary file, fsync, then rename over
    `path`.

    The file honours the umask like any other (0644 under the usual 022). JSON is strict: NaN or infinity
    raises (write None for an undefined value), so every JSON reader can read the file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() gives
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".json"):
                f.write(json.dumps(obj, indent=2, allow_nan=False).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale(folder):
    """Deletes the temporary files that a run killed while writing left in `folder`; returns their names."""
    if not os.path.isdir(folder):
        return []
    stale = sorted(n for n in os.listdir(folder) if n.endswith(TMP_SUFFIX))
    for name in stale:
        os.remove(os.path.join(folder, name))
    return stale


def load_checkpoint(path):
    """The dict saved at `path` (tensors, numbers, strings, lists and dicts only: read with weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's own message can run to paragraphs (weights_only's): its first line
        detail = ("not a file torch.save wrote" if isinstance(e, pickle.UnpicklingError)
                  else (str(e).strip().splitlines() or [""])[0])
        raise CheckpointError(f"cannot read the checkpoint {path} ({type(e).__name__}: {detail}); "
                              f"delete the folder to start again") from None


def resume_state(out, settings, resume):
    """The state saved in out/checkpoint.pt to continue from, or None to start at epoch 1.

    Without `resume`, a folder that holds a run is refused (a new run never overwrites one). With it, the
    saved settings must equal `settings`; a folder with no checkpoint yet (a run stopped in its first epoch or
    while building its feature cache) starts at epoch 1, and a feature cache it had begun goes on where it
    stopped.
    """
    path = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(path):
        return None
    if not resume:
        if os.path.isfile(os.path.join(out, "results.json")):
            raise CheckpointError(f"{out} already holds a finished run (its results.json); give another "
                                  f"--out, or delete that folder to train it again")
        raise CheckpointError(f"{out} already holds an unfinished run; pass --resume to continue it, or "
                              f"another --out")
    state = load_checkpoint(path)
    diff = settings_mismatch(state["settings"], settings)
    if diff:
        raise CheckpointError(f"cannot resume {path}: it was made with different settings ({diff}); "
                              f"use the same options, or another --out for a new run")
    return state


def settings_mismatch(saved, current):
    """'name: saved -> current' for every setting that differs, '' when none does."""
    keys = sorted(set(saved) | set(current))
    return ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}"
                     for k in keys if saved.get(k) != current.get(k))
