"""The frozen image encoder's dense features, computed once and kept on disk
(a layer: the method runs without it).

The CLIP never changes, so its features of an image need not be computed 50 times.
`encode_split(dataset, views, encode, batch_size, workers, cache_dir, key)` encodes every image `views` times
into cache_dir (once: later epochs, other heads and label fractions read it back) and returns a dataset of
(features (L, D) fp16, labels, index). `encode` is the caller's function from a batch of images (B, 3, S, S)
to features (B, L, D): heads.frozen_encoder, the very function run.py's loop encodes with.

Epoch e serves view e mod V (Stored). The trade-off of V: in the loop, 50 epochs show every training image
under 50 different augmentations and pay 50 encoder passes over the training set; the cache shows V of them
over and over (V=1: no augmentation diversity at all) and pays V passes, once for every head and label
fraction; augmented views are drawn under the run's seed, so each seed has its own (plain views are shared by
all seeds).
Disk: V·N·L·D·2 bytes; at 448 px (L = 197, D = 512) VOC2007
trainval is 1.0 GB per view (8.1 GB for V=8; the test split 1.0 GB), COCO2014 train 16.5 GB per view (132 GB
for V=8). Reading it back is disk-bound when it does not fit in the page cache. The build decodes every image,
so it is also the check that every image is readable (run.py needs no separate decoding pass then,
except with --pipeline device: nvJPEG is not as strict).

A cache folder, DIR/<data>-<split>-<hash of the key>/, holds
    meta.json      the full key (checkpoint sha256 — or, for an unsaved random model, a hash of its
                   weights —, data, data root, a hash of the image list, resolution, split, view kind,
                   the transform, V, the augmentations' seed, the device type and precision it was
                   encoded in), the shape, the chunk size, and whether the build is complete
    features.npy   (V, N, L, D) float16 in NumPy's format, read memory-mapped
    done.pt        (V, chunks) uint8 tensor: 1 once that chunk of images is safely on disk
A killed build resumes at the first chunk not done. View v of image i is augmented under the item seed of
(seed, v·N + i) alone, so a resumed build writes the very bytes an uninterrupted one would, whatever the
workers — at the same
number of CPU threads: a convolution's float sums depend on how the threads split them, so a cache built with
another thread count (torchrun sets OMP_NUM_THREADS=1) may differ by one fp16 rounding step in a few values.
An existing folder is used only if its key equals the requested one field by field; otherwise it is refused.

Shape key: V views, N images, L positions (1 + H*W), D feature dim, B batch.
"""
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil

import numpy as np
import torch
from tqdm import tqdm

from . import distributed
from .checkpoint import save_atomic
from .data import DataError
from .augment import SeededViews
from .pipelines import collate

CACHE_FORMAT = 3  # bump when the layout or the per-view seeding changes: old caches then no longer match


class CacheError(ValueError):
    """A cache folder that belongs to other settings, is unreadable, or would not fit on the disk."""


class Stored(torch.utils.data.Dataset):
    """Features computed once, (V, N, L, D) fp16 (a read-only memmap). Item j is view (j // N) mod V of image
    j mod N: the indices augment.EpochSampler gives in epoch e (e·N + i) serve view e mod V, and plain
    indices 0..N-1 (the test split) view 0."""

    def __init__(self, features, labels):
        self.features, self.labels = features, labels

    def __len__(self):
        return self.features.shape[1]

    def __getitem__(self, j):
        view, i = divmod(j, len(self))
        return torch.from_numpy(np.array(self.features[view % self.features.shape[0], i])), self.labels[i], i

@torch.inference_mode()
def encode_chunks(dataset, encode, views, chunk, todo, workers, store, desc="encoding", seed=0,
                  pin_memory=False):
    """Encodes the (view, chunk) pairs in `todo`; chunk c of a view is images [c*chunk, (c+1)*chunk).

    `store(view, chunk_index, features)` receives each chunk's (B, L, D) fp16 NumPy features in order. View v
    of image i is SeededViews' item v·N + i under `seed`; `pin_memory` as the run's loader has it (on CUDA).
    """
    n = len(dataset)
    batches = [range(v * n + c * chunk, v * n + min(n, (c + 1) * chunk)) for v, c in todo]
    loader = torch.utils.data.DataLoader(SeededViews(dataset, views, seed), batch_sampler=batches,
                                         num_workers=workers, pin_memory=pin_memory, collate_fn=collate,
                                         # not the process's: items seed themselves
                                         generator=torch.Generator())
    with tqdm(total=sum(map(len, batches)), desc=desc, unit="img", disable=None, leave=False) as bar:
        for (v, c), (images, _, _) in zip(todo, loader):
            store(v, c, encode(images).half().cpu().numpy())
            bar.update(len(images))


def feature_shape(dataset, encode):
    """(L, D) of one image of `dataset`, from one forward pass."""
    with torch.inference_mode():
        return tuple(encode(collate([SeededViews(dataset, 1)[0]])[0]).shape[1:])


def weights_fingerprint(model):
    """sha256 of every tensor in the state dict: names an unsaved (random) model, such as the demo's."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode() + t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def images_fingerprint(dataset):
    """sha256 of the image list (paths, or pixels of in-memory PIL images),
    None if the dataset has no list."""
    images = getattr(dataset, "images", None)
    if images is None:
        return None
    h = hashlib.sha256()
    for im in images:
        h.update(im.encode() + b"\0" if isinstance(im, str)
                 else f"{im.mode}{im.size}".encode() + im.tobytes())
    return h.hexdigest()


def transform_description(dataset):
    """The dataset's transform as its repr lists it (sizes, RandAugment's settings, ...),
    memory addresses cut."""
    transform = getattr(dataset, "transform", None)
    return None if transform is None else re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def cache_key(key, dataset, views, seed=0):
    """The caller's key (checkpoint sha256 or `weights_fingerprint`, data, resolution, split, view kind,
    device and precision) completed with what fixes the bytes: the image list, the transform, the number of
    views and the seed their augmentations are drawn under."""
    assert key.get("clip_sha256") or key.get("weights"), "a cache key names the CLIP's checkpoint or weights"
    full = {**key, "views": views, "seed": seed, "n_images": len(dataset),
            "images": images_fingerprint(dataset), "transform": transform_description(dataset),
            "format": CACHE_FORMAT}
    return json.loads(json.dumps(full, sort_keys=True))  # JSON-native values, as meta.json gives them back


def cache_folder(cache_dir, key):
    """DIR/<data>-<split>-<first 16 hex digits of sha256(key as sorted JSON)>."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{key.get('data', 'data')}-{key.get('split', 'split')}-{digest}")
    return os.path.join(cache_dir, name)


@contextlib.contextmanager
def build_lock(folder):
    """Holds an exclusive lock on folder/lock, so two runs never build one cache at once
    (POSIX; else no-op)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(os.path.join(folder, "lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        yield


def check_meta(folder, meta, key):
    """Raises CacheError naming the first field where the folder's key differs from the requested one."""
    saved = meta.get("key", {})
    for field in sorted(set(saved) | set(key)):
        if saved.get(field) != key.get(field):
            raise CacheError(f"the feature cache {folder} was built for {field}={saved.get(field)!r}, "
                             f"but this run needs {field}={key.get(field)!r}; delete that folder or pass "
                             f"another --cache-dir")


def open_cache(folder, key, shape_of, chunk):
    """(meta, done (K, chunks) uint8) of the cache in `folder`: checked if it exists, else created with the
    shape `shape_of()` (K, N, L, D) — a forward pass, skipped for an existing cache
    (its key fixes L and D)."""
    meta_path, features_path = os.path.join(folder, "meta.json"), os.path.join(folder, "features.npy")
    if os.path.isfile(meta_path):
        name = "meta.json"
        try:  # damaged files: cut short, overwritten, not ours
            with open(meta_path) as f:
                meta = json.load(f)
            name = "features.npy"
            stored = np.load(features_path, mmap_mode="r").shape
            name = "done.pt"
            done = torch.load(os.path.join(folder, name), weights_only=True)
        except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError) as e:
            raise CacheError(f"the feature cache {folder} is unreadable (its {name}: {type(e).__name__}); "
                             f"delete that folder") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("key"), dict)
                and isinstance(done, torch.Tensor)):
            raise CacheError(f"the feature cache {folder} is unreadable (its meta.json or done.pt is not "
                             f"clipmlr's); delete that folder")
        check_meta(folder, meta, key)
        consistent = (list(stored) == meta.get("shape")
                      and list(stored[:2]) == [key["views"], key["n_images"]]
                      and tuple(done.shape) == (stored[0], -(-stored[1] // meta.get("chunk", 1))))
        if not consistent:
            raise CacheError(f"the feature cache {folder} is inconsistent (features {tuple(stored)}, "
                             f"progress {tuple(done.shape)}, meta {meta.get('shape')}); delete that folder")
        return meta, done
    shape = shape_of()
    size = int(np.prod(shape)) * 2
    free = shutil.disk_usage(folder).free
    if free < size:
        raise CacheError(f"the feature cache needs {size / 1e9:.1f} GB in {folder} but {free / 1e9:.1f} GB "
                         f"are free; pass a smaller --cache-views or another --cache-dir")
    # a sparse file
    np.lib.format.open_memmap(features_path, mode="w+", dtype=np.float16, shape=shape).flush()
    done = torch.zeros(shape[0], -(-shape[1] // chunk), dtype=torch.uint8)  # (V, chunks)
    save_atomic(done, os.path.join(folder, "done.pt"))
    meta = {"key": key, "shape": list(shape), "dtype": "float16", "chunk": chunk, "complete": False}
    save_atomic(meta, meta_path)  # last: a folder without meta.json is an unfinished creation, made again
    return meta, done


def cached_features(dataset, encode, batch_size, workers, cache_dir, key, pin_memory=False):
    """(V, N, L, D) fp16 read-only memmap of the features in the cache folder for `key`,
    built or finished first.

    One process builds, holding the folder's lock: two independent runs on one cache folder never build it at
    once (the second waits, then finds it complete). Under torchrun rank 0 builds while the other ranks wait
    (a cache is built once and read by every later run, so one GPU building it costs little); an error of
    rank 0's (a damaged cache, an image that does not decode) is raised on every rank.
    """
    folder = cache_folder(cache_dir, key)
    error = None
    if distributed.rank() == 0:
        try:
            os.makedirs(folder, exist_ok=True)
            with build_lock(folder):
                meta, done = open_cache(folder, key, lambda: (key["views"], len(dataset),
                                                                *feature_shape(dataset, encode)), batch_size)
                if not meta["complete"]:
                    build(folder, meta, done, dataset, encode, workers, key, pin_memory)
        except (CacheError, DataError) as e:  # a damaged cache, an image that does not decode
            error = e
    error = distributed.first_error(error)  # the other ranks wait here for rank 0's build
    if error is not None:
        raise error
    return np.load(os.path.join(folder, "features.npy"), mmap_mode="r")


def build(folder, meta, done, dataset, encode, workers, key, pin_memory):
    """Encodes every (view, chunk) not yet done into folder/features.npy, then marks the cache complete."""
    chunk, shape = meta["chunk"], meta["shape"]  # the first attempt's chunk grid, whatever the batch now
    todo = [(v, c) for v in range(done.shape[0]) for c in range(done.shape[1]) if not done[v, c]]
    if len(todo) < done.numel():
        print(f"resuming the feature cache {folder}: {done.numel() - len(todo)} of {done.numel()} "
              f"chunks done")
    features_path = os.path.join(folder, "features.npy")
    offset = np.load(features_path, mmap_mode="r").offset  # bytes of the .npy header
    row = int(np.prod(shape[2:])) * 2  # bytes of one image's (L, D) fp16 features
    with open(features_path, "r+b") as f:
        def store(v, c, features):
            f.seek(offset + (v * shape[1] + c * chunk) * row)
            f.write(features.tobytes())
            f.flush()
            os.fsync(f.fileno())  # the features reach the disk before the record says so
            done[v, c] = 1
            save_atomic(done, os.path.join(folder, "done.pt"))

        encode_chunks(dataset, encode, key["views"], chunk, todo, workers, store,
                      desc=f"caching {key.get('split', '')} features", seed=key["seed"],
                      pin_memory=pin_memory)
    save_atomic({**meta, "complete": True}, os.path.join(folder, "meta.json"))


def encode_split(dataset, views, encode, batch_size, workers, cache_dir, key, seed=0, pin_memory=False):
    """A `Stored` dataset of `views` encodings of every image of `dataset`, kept in `cache_dir` (built first
    when missing or unfinished). View v of image i is augmented as SeededViews' item v·N + i under `seed`.

    `key` (a dict of JSON values: clip, clip_sha256 or weights, data, data_root, image_size, split, view,
    device, precision) names what the features depend on; the image list, the transform, `views` and `seed`
    are added to it here. `pin_memory`: as the run's own loader (True on CUDA).
    """
    features = cached_features(dataset, encode, batch_size, workers, cache_dir,
                               cache_key(key, dataset, views, seed), pin_memory)
    return Stored(features, dataset.labels)
