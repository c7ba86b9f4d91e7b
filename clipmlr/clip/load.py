"""Finding, downloading, verifying and reading OpenAI's CLIP ResNet checkpoints.

OpenAI publishes each model at https://openaipublic.azureedge.net/clip/models/<sha256>/<name>.pt, a
TorchScript archive with fp16 weights; the sha256 in the URL is that of the whole file. We verify it, download
to a temporary name and rename only when the file is complete and correct (torch.hub.download_url_to_file does
both).
"""
import hashlib
import http.client
import os
import shutil
import urllib.error
import warnings
import zipfile

import torch

from .model import build_model

BASE_URL = "https://openaipublic.azureedge.net/clip/models"
MODELS = {  # name -> sha256 of the released file
    "RN50": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
}


class DownloadError(RuntimeError):
    """A checkpoint that could not be fetched or failed its sha256 check; the message says what to do."""


class LoadError(ValueError):
    """A name or file that is no CLIP ResNet checkpoint (unknown, unreadable, truncated, ViT, ...)."""


class NoCheckpoint(FileNotFoundError):
    """A checkpoint path where there is no file."""


def available_models():
    """The names `load` accepts (besides file paths)."""
    return list(MODELS)


def model_url(name):
    return f"{BASE_URL}/{MODELS[name]}/{name}.pt"


def sha256_of(path, chunk=1 << 20):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def outermost_missing(path):
    """The outermost folder on the way to `path` that does not exist yet (what makedirs would create first),
    or None when `path` exists: a failed download removes it again, leaving nothing empty behind."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        return None
    while not os.path.exists(os.path.dirname(path)):
        path = os.path.dirname(path)
    return path


def download(name, root="weights", url=None, progress=True):
    """Returns the path of a verified checkpoint for `name` in `root`, downloading it if missing or corrupt.

    `url` overrides the OpenAI address (the tests point it at a local server). A file whose sha256 differs is
    fetched again; a failed transfer leaves nothing under the final name.
    """
    if name not in MODELS:
        raise LoadError(f"unknown CLIP model {name!r}; the available models are {available_models()}")
    expected = MODELS[name]
    url = url or model_url(name)
    path = os.path.join(root, f"{name}.pt")
    if os.path.isfile(path):
        if sha256_of(path) == expected:
            return path
        print(f"{path} is corrupt or incomplete (its sha256 is not {expected}); downloading it again")
    created = outermost_missing(root)
    os.makedirs(root, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=expected, progress=progress)
    # the last: a reply that is not HTTP
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise DownloadError(
            f"could not download CLIP {name} from {url} ({reason}). Without network, fetch that URL on "
            f"another machine and copy the file to {os.path.abspath(path)}; its sha256 must be "
            f"{expected}.") from None
    except RuntimeError as e:  # torch.hub's hash check (the partial file is already removed)
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise DownloadError(
            f"the file downloaded from {url} is corrupt ({e}); expected sha256 {expected}. "
            f"Run again to retry, or copy a good file to {os.path.abspath(path)}.") from None
    return path


def is_torchscript(path):
    """True for a TorchScript archive (a zip holding code/ and constants.pkl), False for anything else."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read_state_dict(path):
    """Reads a TorchScript archive (OpenAI's format) or a plain state dict saved with torch.save.

    torch 2.x warns that torch.jit.load is deprecated; OpenAI's files are TorchScript archives and nothing
    else reads them, so that one warning is silenced here (and only for those files).
    """
    if is_torchscript(path):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*deprecated",
                                        category=FutureWarning)
                return torch.jit.load(path, map_location="cpu").state_dict()
        except Exception:  # a damaged archive: the plain reader below reports it
            pass
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LoadError(
            f"cannot read the checkpoint {path} ({os.path.getsize(path):,} bytes): it is neither a "
            f"TorchScript archive nor a torch.save'd state dict, and may be truncated or corrupt "
            f"({type(e).__name__}). "
            f"Delete it and load the model by name to download it again.") from None
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict):
        raise LoadError(f"{path} holds a {type(state_dict).__name__}, not a CLIP state dict")
    return state_dict


MEAN = (0.48145466, 0.4578275, 0.40821073)  # the statistics of CLIP's training images (openai/CLIP, clip.py)
STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_for(resolution):
    """OpenAI's `preprocess` for a model of that input side: a PIL image -> (3, S, S) tensor, by a bicubic
    resize of the short side to S, a centre crop, RGB, and CLIP's normalisation. (The paper's transform, a
    plain resize to S x S with no crop, is augment.image_transform; run.py uses that one.)"""
    from torchvision import transforms as T  # the CLIP itself needs no torchvision
    return T.Compose([T.Resize(resolution, interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(resolution), lambda image: image.convert("RGB"), T.ToTensor(),
                      T.Normalize(MEAN, STD)])


def load(name_or_path="RN101", device="cpu", download_root="weights", url=None):
    """`model, preprocess = load(...)`, OpenAI's convention: a CLIP by name (see `available_models`,
    downloaded into `download_root`, default ./weights, if not there already) or from a checkpoint file.

    `model` is fp32, in eval mode on `device`, every parameter frozen; `model.sha256` is the checkpoint file's
    sha256 (so results can name the exact weights they came from). `preprocess` is OpenAI's image transform
    for the model's input side (`preprocess_for`). `url` overrides OpenAI's address (the tests serve a local
    one).
    """
    name_or_path = os.fspath(name_or_path)
    sha = None
    if name_or_path in MODELS:
        path = download(name_or_path, download_root, url)
        sha = MODELS[name_or_path]  # download verified it
    elif os.path.isfile(name_or_path):
        path = name_or_path
    elif os.path.sep in name_or_path or name_or_path.endswith((".pt", ".pth")):
        raise NoCheckpoint(f"no CLIP checkpoint at {os.path.abspath(name_or_path)}; "
                           f"give an existing file or one of the names {available_models()}")
    else:
        raise LoadError(f"unknown CLIP model {name_or_path!r}; the available models are "
                        f"{available_models()}, or give the path of a checkpoint file")
    state_dict = read_state_dict(path)  # LoadError for a file that is no checkpoint
    try:
        model = build_model(state_dict)
    except ValueError as e:  # build_model's word for a state dict that is no CLIP ResNet
        raise LoadError(f"{path}: {e}") from None
    model.requires_grad_(False)
    model.sha256 = sha or sha256_of(path)
    return model.to(device), preprocess_for(model.visual.input_resolution)
