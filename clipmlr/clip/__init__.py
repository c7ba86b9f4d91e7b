"""clipmlr's own CLIP (ResNet image encoder + text transformer) that loads OpenAI's released checkpoints.

Public functions: `model, preprocess = load(name_or_path, device)` (OpenAI's convention; `model.sha256` names
the checkpoint file), `available_models`, `build_model`, `tokenize`; the model's `encode_image`,
`encode_text`, `encode_dense` and `encode_embedded`.
"""
from .load import (MEAN, STD, DownloadError, LoadError, NoCheckpoint, available_models, download, load,
                   preprocess_for, read_state_dict, sha256_of)
from .model import CLIP, build_model
from .tokenizer import tokenize

__all__ = ["CLIP", "MEAN", "STD", "DownloadError", "LoadError", "NoCheckpoint", "available_models",
           "build_model", "download", "load", "preprocess_for", "read_state_dict", "sha256_of", "tokenize"]
