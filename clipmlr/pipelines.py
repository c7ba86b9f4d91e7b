"""How images get from disk to the device in batches (a layer: the paper's transforms are augment.py's, and
run on PIL images there). Three pipelines run them, chosen by run.py's --pipeline:

    pil      the authors' (augment.image_transform): each DataLoader worker decodes with PIL and transforms
    tensor   each worker decodes straight into a uint8 tensor (torchvision.io) and runs the same steps, with
             the same random draws, on torchvision's tensor kernels
    device   each worker only reads a file's bytes; the training process decodes the whole batch on the device
             (nvJPEG on CUDA) and runs the tensor steps there: the GPU's input path (not yet run on a GPU, so
             not a default).
             On CUDA this happens in the DataLoader's pin-memory thread, on a CUDA stream of its own, while
             the main stream encodes the batch before (RawBatch.pin_memory)

    transform = image_pipeline(size, train, randaugment, pipeline)    for ImageDataset
    loader = DataLoader(..., collate_fn=collate)                       a device batch arrives as one RawBatch
    images = batch.to(device)                                          a RawBatch: decoded and augmented there

Pixel values differ slightly between PIL and tensors (an antialiased tensor resize, bilinear shears), and
between the CPU and CUDA (nvJPEG and the GPU's kernels round differently); the policy and its draws are the
same.
"""
import contextlib
import sys
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from torchvision import transforms as T
from torchvision.io import ImageReadMode
from torchvision.transforms import functional as TF

from .augment import MEAN, RANDAUGMENT, STD, Cutout, active_seed, image_transform, seeded
from .data import DataError


def read_tensor(path):
    """The image at `path` decoded straight into a uint8 (3, H, W) RGB tensor (torchvision.io: libjpeg-turbo,
    libpng); DataError naming the file when it cannot be read or decoded."""
    return decode_tensor(byte_tensor(read_bytes(path)), path)


def read_bytes(path):
    """The bytes of the image file at `path`; DataError naming it when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read the image {path}: {e}") from None


def byte_tensor(data):
    """A file's bytes as the 1-D uint8 CPU tensor torchvision.io decodes (empty for an empty file)."""
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())


def decode_tensor(data, name):
    """A file's bytes (1-D uint8) decoded on the CPU into a uint8 (3, H, W) RGB tensor;
    DataError naming it."""
    try:
        return torchvision.io.decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as e:
        raise DataError(f"cannot read the image {name}: {e}") from None


class ToUint8:
    """A path (decoded by read_tensor), a PIL image (converted) or a uint8 (3, H, W) tensor ->
    uint8 tensor."""

    def __call__(self, image):
        if isinstance(image, str):
            return read_tensor(image)
        return image if isinstance(image, torch.Tensor) else TF.pil_to_tensor(image.convert("RGB"))

    def __repr__(self):
        return "ToUint8()"


class TensorPipeline(T.Compose):
    """The same steps on uint8 (3, H, W) tensors instead of PIL images (PIL input is converted first): images
    are decoded straight into tensors (torchvision.io), and every operation is torchvision's tensor kernel,
    the form that also runs on a GPU. The policy and its random draws are the PIL pipeline's; pixel values
    differ slightly (antialiased tensor resize, bilinear shears)."""

    reads_paths = True  # ImageDataset hands it paths: ToUint8 decodes them into tensors


class Raw(NamedTuple):
    """One image as a worker of the device pipeline hands it over: the file's bytes, or an in-memory image as
    a uint8 (3, H, W) array (plain Python/NumPy data: it crosses from the worker as a copy, not as one
    shared-memory file per image); the seed of the SeededViews item it was read for (None without
    augmentation), under which its augmentation is drawn later; its name for errors; and the pipeline that
    turns it into pixels."""
    data: "bytes | numpy.ndarray"
    seed: int
    name: str
    pipeline: "DevicePipeline"


class DevicePipeline:
    """The pipeline that runs on the training device (`pipeline="device"`, run.py's --pipeline device).

    A DataLoader worker only reads each file's bytes (a Raw). On the device, a whole batch is decoded in one
    call (nvJPEG on CUDA; PNGs and other formats on the CPU, then moved), and each image is resized, cut out
    and augmented there with the tensor pipeline's steps and, seeded by its Raw's seed, the same random draws;
    the batch is then normalised at once. `RawBatch.to(device)` does all this, so a loop that moves its batch
    to the device is unchanged; with pin_memory=True (on CUDA) the loader's pin-memory thread does it in the
    background. On the CPU the same code runs (the tests exercise it there) and matches the tensor pipeline
    bit for bit; on CUDA, nvJPEG and the GPU's kernels round slightly differently.
    """

    reads_paths = True

    def __init__(self, steps, train):
        self.steps, self.train = steps, train  # steps: uint8 (3, H, W) -> uint8 (3, S, S)

    def __call__(self, image):
        # the item's own seed, under which its augmentation is drawn later, on the device
        seed = active_seed()
        if self.train and seed is None:
            raise RuntimeError("the device pipeline augments each image later, under the seed of the item "
                               "it was read for: read the dataset through augment.SeededViews (as run.py and "
                               "the feature cache do), or use the pil or tensor pipeline, which draw as they "
                               "read")
        if isinstance(image, str):
            return Raw(read_bytes(image), seed, image, self)
        return Raw(ToUint8()(image).numpy(), seed, "an in-memory image", self)

    def __repr__(self):
        return f"DevicePipeline(decode on the device, then {self.steps}, then normalise)"


class RawBatch:
    """A batch of Raw images (from `collate`); `.to(device)` gives the normalised float (B, 3, S, S) batch
    there."""

    def __init__(self, raws):
        self.raws = list(raws)

    def __len__(self):
        return len(self.raws)

    def to(self, device, non_blocking=False, memory_format=torch.preserve_format):
        pipeline, device = self.raws[0].pipeline, torch.device(device)
        if device.type == "cuda" and device.index is None:  # one name per GPU: nvJPEG's decoder is per device
            device = torch.device("cuda", torch.cuda.current_device())
        out = []
        # the encoder's bf16 autocast must not touch the pixels
        with torch.autocast(device.type, enabled=False):
            for raw, image in zip(self.raws, decode_on(device, self.raws)):
                with seeded(raw.seed) if pipeline.train else contextlib.nullcontext():
                    out.append(pipeline.steps(image))
        batch = torch.stack(out).to(torch.float32).div_(255)  # (B, 3, S, S) in [0, 1], as ConvertImageDtype
        mean, std = normalisation(batch.device)
        return batch.sub_(mean).div_(std).contiguous(memory_format=memory_format)

    def pin_memory(self):
        """What the DataLoader's pin-memory thread calls for each batch (pin_memory=True, run.py's setting on
        CUDA): the batch is decoded and augmented in that background thread, on a CUDA stream of its own,
        while the training process's stream encodes the batch before it. A Ready batch comes back. (Each
        image's draws use the process's global generators inside `seeded`, which restores them; the training
        loop draws nothing from them while batches are in flight: its data order has a generator of its
        own.)"""
        if not torch.cuda.is_available():
            return Ready(self.to("cpu"), None)
        device = torch.device("cuda", torch.cuda.current_device())  # the thread is set to the loader's device
        if device not in SIDE_STREAMS:  # one stream, so that the allocator reuses the memory it frees
            SIDE_STREAMS[device] = torch.cuda.Stream(device)
        side = SIDE_STREAMS[device]
        with torch.cuda.stream(side):
            # the layout run.py encodes in on CUDA
            images = self.to(device, memory_format=torch.channels_last)
            done = torch.cuda.Event()
            done.record(side)
        return Ready(images, done)


class Ready:
    """A batch decoded and augmented by the pin-memory thread on its own CUDA stream; `.to(device)` makes the
    caller's stream wait for that work on the GPU (the host does not wait) and hands the images over."""

    def __init__(self, images, done):
        # (B, 3, S, S) float, and the side stream's event (None on a CPU)
        self.images, self.done = images, done

    def __len__(self):
        return len(self.images)

    def to(self, device, non_blocking=False, memory_format=torch.preserve_format):
        if self.done is not None:
            stream = torch.cuda.current_stream(self.images.device)
            stream.wait_event(self.done)
            # the allocator keeps the memory until this stream is done with it
            self.images.record_stream(stream)
        return self.images.to(device, non_blocking=non_blocking, memory_format=memory_format)


# device -> (mean, std) as (3, 1, 1) tensors there: copied once, since each copy to a GPU waits
CONSTANTS = {}
SIDE_STREAMS = {}  # CUDA device -> the stream the pin-memory thread decodes and augments on


def normalisation(device):
    """CLIP's MEAN and STD as float32 (3, 1, 1) tensors on `device` (made once per device)."""
    if device not in CONSTANTS:
        CONSTANTS[device] = tuple(torch.tensor(v, device=device)[:, None, None] for v in (MEAN, STD))
    return CONSTANTS[device]


# What torchvision's batched JPEG decoder says when it refuses the images themselves (its CUDA decoder,
# torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp); the batch is then decoded on the CPU. Any other
# failure (nvJPEG that cannot start, CUDA out of memory, a failed stream) is the GPU's and is raised.
IMAGE_REFUSALS = ("Failed to get image info", "Unknown chroma subsampling", "Failed to parse jpeg stream",
                  "Failed to decode jpeg stream", "Failed to decode batch", "Expected a non empty")
CPU_FALLBACKS = {"batches": 0, "images": 0}  # batches the device's decoder refused, in this process


def decode_on(device, raws):
    """The Raw images as uint8 (3, H, W) tensors on `device`: the JPEGs decoded in one call there (nvJPEG on
    CUDA), anything else, or JPEGs that call refuses, on the CPU and moved (counted, and announced on stderr);
    DataError naming a bad file."""
    files = [byte_tensor(r.data) if isinstance(r.data, bytes) else None for r in raws]
    images = [torch.from_numpy(r.data) if f is None else None for r, f in zip(raws, files)]
    jpegs = [i for i, r in enumerate(raws) if isinstance(r.data, bytes) and r.data[:3] == b"\xff\xd8\xff"]
    if jpegs:
        # nvJPEG writes on a stream of its own into memory this stream may still read
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()
        # (torchvision 0.29 deprecates its decoders for torchcodec: a DeprecationWarning, hidden by default)
        try:
            decoded = torchvision.io.decode_jpeg([files[i] for i in jpegs], mode=ImageReadMode.RGB,
                                                 device=device)
        except RuntimeError as e:  # the call decodes all or nothing
            if not any(refusal in str(e) for refusal in IMAGE_REFUSALS):
                raise  # the GPU itself failed (out of memory, no decoder, ...): not a matter of these images
            decoded = [None] * len(jpegs)  # decoded one by one on the CPU below
            announce_fallback(len(jpegs), device, e)
        for i, image in zip(jpegs, decoded):
            images[i] = image
    for i, raw in enumerate(raws):
        if images[i] is None:
            images[i] = decode_tensor(files[i], raw.name)
    return [image.to(device, non_blocking=True) for image in images]


def announce_fallback(n, device, error):
    """Counts a batch of `n` JPEGs that the device's decoder refused;
    says so the 1st, 2nd, 4th, 8th, ... time."""
    CPU_FALLBACKS["batches"] += 1
    CPU_FALLBACKS["images"] += n
    count = CPU_FALLBACKS["batches"]
    if count & (count - 1) == 0:
        reason = str(error).strip().splitlines()[0][:200]
        print(f"note: the JPEG decoder on {device} refused {count} batch(es) so far "
              f"({CPU_FALLBACKS['images']} images), decoded on one CPU thread instead; "
              f"latest reason: {reason}", file=sys.stderr)


def collate(batch):
    """torch's default_collate, except that the device pipeline's Raw images make one RawBatch."""
    if isinstance(batch[0][0], Raw):
        images, *rest = zip(*batch)
        return (RawBatch(images), *(torch.utils.data.default_collate(list(r)) for r in rest))
    return torch.utils.data.default_collate(batch)


def image_pipeline(size, train, randaugment="authors", pipeline="pil"):
    """augment.image_transform(size, train, randaugment) as the `pipeline` runs it: "pil" (that transform
    itself), "tensor" (the same steps on uint8 tensors in the workers) or "device" (DevicePipeline)."""
    if pipeline == "pil":
        return image_transform(size, train, randaugment)
    augment = [Cutout(0.5), RANDAUGMENT[randaugment]()] if train else []
    if pipeline == "device":
        return DevicePipeline(T.Compose([T.Resize((size, size), antialias=True), *augment]), train)
    if pipeline == "tensor":
        return TensorPipeline([ToUint8(), T.Resize((size, size), antialias=True), *augment,
                               T.ConvertImageDtype(torch.float32), T.Normalize(MEAN, STD)])
    raise ValueError(f"pipeline {pipeline!r}: expected 'pil', 'tensor' or 'device'")
