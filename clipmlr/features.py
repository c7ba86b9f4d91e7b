"""Dense CLIP features for a dataset: computed in the training loop, or once and stored (the encoder is frozen).

`encode_split(dataset, views=None, ...)` returns a dataset of (features or images, labels, index) with
`to_features(batch)` giving (B, L, D) features on the device: with `views=None` it runs the encoder on each
batch of (augmented) images; with `views=K` every image is encoded K times up front (K augmented views for
training, 1 plain view for testing) and epoch e reads view e mod K.
"""
import torch
from tqdm import tqdm


def encoder_context(device):
    """bf16 autocast on CUDA for the frozen encoder; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def encode_images(model, images, device):
    """(B, 3, S, S) -> (B, L, D) fp32 dense features (no autograd graph: the encoder is frozen)."""
    images = images.to(device, non_blocking=True)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with encoder_context(device):
        return model.encode_dense(images).float()


class InLoop(torch.utils.data.Dataset):
    """Images go through the encoder batch by batch, in the training loop."""

    def __init__(self, dataset, model, device, workers):
        self.dataset, self.model, self.device, self.workers = dataset, model, device, workers

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i]

    def set_epoch(self, epoch):
        pass

    def to_features(self, images):
        return encode_images(self.model, images, self.device)


class Stored(torch.utils.data.Dataset):
    """Features computed once: (K, N, L, D) fp16, view `epoch mod K` served in epoch `epoch`."""

    workers = 0  # reading a tensor needs no worker processes

    def __init__(self, features, labels, device):
        self.features, self.labels, self.device, self.view = features, labels, device, 0

    def __len__(self):
        return self.features.shape[1]

    def __getitem__(self, i):
        return self.features[self.view, i], self.labels[i], i

    def set_epoch(self, epoch):
        self.view = epoch % self.features.shape[0]

    def to_features(self, features):
        return features.to(self.device, non_blocking=True).float()


def encode_all(dataset, model, device, views, batch_size, workers, desc="encoding"):
    """(views, N, L, D) fp16 features of every image of `dataset`, `views` passes of its transform."""
    out = None
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    with tqdm(total=views * len(dataset), desc=desc, unit="img", disable=None, leave=False) as bar:
        for v in range(views):
            torch.manual_seed(v)  # the augmentation of view v is the same whenever it is rebuilt
            for images, _, index in loader:
                f = encode_images(model, images, device).half().cpu()
                if out is None:
                    out = torch.empty(views, len(dataset), *f.shape[1:], dtype=torch.float16)
                out[v, index] = f
                bar.update(len(index))
    return out


def encode_split(dataset, views, model, device, batch_size, workers, cache_dir=None, key=None):
    """In-loop encoding (views=None) or `views` stored views; `cache_dir`/`key` will keep them on disk."""
    if views is None:
        return InLoop(dataset, model, device, workers)
    return Stored(encode_all(dataset, model, device, views, batch_size, workers), dataset.labels, device)
