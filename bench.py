"""Benchmark of clipmlr's speed work (a benchmark, not a test: it prints figures and never asserts on time).

    python bench.py --quick                            # CPU, under a minute: the demo's miniature CLIP
    python bench.py                                    # CPU: RN101's architecture (a few minutes)
    python bench.py --device cuda --json bench.json    # GPU: RN101 at full size, plus a projected VOC run

What it measures, side by side in one run (the CLIPs have random weights: no real weights exist offline, and
speed does not depend on them):
  1. image encoder: dense features per second at 448 px (bf16 autocast and channels_last on CUDA)
  2. text encoder: forward + backward of C = 80 COCO prompts with 16 learned context tokens, run on all 77
     tokens vs on their true length (up to the last EOT), and the largest relative difference of the features
  3. one training step (forward, asymmetric loss, backward, SGD) of every head, on cached features vs with the
     image encoder in the loop (images already decoded and augmented; the encoder's forward is what differs)
  4. one epoch of the demo (`run.py --data demo`'s loop, PositiveCoOp), encoder in the loop vs cached features
  5. the input pipelines (--pipeline pil, tensor, device), images/s on one core, decoding included; on a GPU,
     --pipeline device there (the GPU's input path) alone, and the encoder fed by it as run.py feeds it
     (workers read bytes, the loader's pin-memory thread decodes and augments), beside the encoder alone
  6. predict (`python -m clipmlr.predict`): images/s over a folder of demo images
  7. peak memory; with RN101, the projected hours of the paper's VOC2007 and COCO2014 runs (50 epochs of
     PositiveCoOp; the test split encoded once), with the encoder in the loop and with the feature cache
     (K views), from the rates measured above: on a GPU the encoder fed by the device pipeline; on a CPU the
     encoder alone or the PIL pipeline's per-core rate times run.py's default workers, whichever is slower
On CUDA the image encoder runs under bf16 autocast with channels_last, as run.py does; the train
step is also timed with the head under bf16 autocast. Without --quick, a CPU run takes a few minutes.
"""
import argparse
import contextlib
import io
import json
import math
import os
import resource
import tempfile
import time

import torch
from PIL import Image

import run  # bench.py sits beside run.py, and times its train_one_epoch
from clipmlr.analysis.templates import COCO_CLASSES
from clipmlr import distributed
from clipmlr.cache import encode_split, weights_fingerprint
from clipmlr.cli import default_workers as cli_workers
from clipmlr.clip.model import CLIP
from clipmlr.augment import image_transform
from clipmlr.data import VOC_CLASSES, ImageDataset, check_decodable, read_image
from clipmlr.demo import DEMO_CLASSES, demo_split, tiny_clip
from clipmlr.heads import HEADS, Prompts, build_head, frozen_encoder, parameter_groups
from clipmlr.metrics import mean_average_precision
from clipmlr.pipelines import collate

COCO_IMAGES = 82_081 + 40_137  # train2014 + val2014 images with at least one object (what run.py reads)


def rn101():
    """CLIP RN101's architecture (OpenAI's hyper-parameters) with random weights, frozen, in eval mode."""
    model = CLIP(embed_dim=512, image_resolution=224, vision_layers=[3, 4, 23, 3], vision_width=64,
                 context_length=77, vocab_size=49408, transformer_width=512, transformer_heads=8,
                 transformer_layers=12)
    return model.eval().requires_grad_(False)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps, warmup=1):
    """Best wall time of fn() in ms over `reps` runs, after `warmup` runs (GPU work included). The minimum, as
    timeit reports: other processes only ever add time."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(1000 * (time.perf_counter() - t0))
    return min(times)


def peak_memory_mb(device):
    """Peak GPU memory allocated since the last reset (CUDA) or the process's peak resident set (CPU),
    in MB."""
    if device.type == "cuda":
        mb = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return mb
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def bench_image_encoder(model, size, batch, reps, device):
    """Images per second through encode_dense at `size` px, as the cache build runs it."""
    images = torch.randn(batch, 3, size, size)
    if device.type == "cuda":
        images = images.pin_memory()  # as the DataLoader hands them over
    encode = frozen_encoder(model, device)

    def run():
        with torch.inference_mode():
            encode(images)
    return {"images_per_s": batch / timed(run, device, reps) * 1000, "batch": batch, "size": size}


def bench_text_encoder(model, classnames, n_ctx, reps, device):
    """Forward + backward of the prompts' text features on all 77 tokens vs on the true length."""
    prompts = Prompts(model, classnames, n_ctx).to(device)
    short = prompts.embeddings()  # (C, T', W): Prompts keeps the tokens up to the last EOT only
    # (C, 77 - T', W) padding tokens
    pad = model.token_embedding(torch.zeros(len(classnames), model.context_length - short.shape[1],
                                            dtype=torch.long, device=device))

    def run(truncate):
        x = torch.cat([prompts.embeddings(), pad], dim=1)  # (C, 77, W), rebuilt each step as in training
        features = model.encode_embedded(x, prompts.eot, truncate=truncate)  # (C, D)
        features.square().sum().backward()
        prompts.ctx.grad = None
        return features.detach()

    full, true = run(False), run(True)
    return {"classes": len(classnames), "tokens_full": model.context_length, "tokens_true": short.shape[1],
            "ms_full": timed(lambda: run(False), device, reps, warmup=0),  # the runs above were the warm-up
            "ms_true": timed(lambda: run(True), device, reps, warmup=0),
            "max_rel_diff": ((full - true).abs().max() / full.abs().max()).item()}


def bench_train_steps(model, classnames, size, batch, reps, device, heads=None, in_loop=True):
    """ms per training step of every head (or `heads`): cached (B, L, D) fp16 features vs
    (B, 3, S, S) images + encoder (not timed when `in_loop` is False)."""
    images = torch.randn(batch, 3, size, size)
    encode = frozen_encoder(model, device)
    with torch.inference_mode():
        cached = encode(images[:1]).half().cpu()
    cached = cached.expand(batch, -1, -1).clone()  # (B, L, D) fp16, as a cached batch arrives
    if device.type == "cuda":
        images, cached = images.pin_memory(), cached.pin_memory()
    targets = torch.randint(-1, 2, (batch, len(classnames)), device=device)
    out = {}
    for name in heads or sorted(HEADS):
        torch.manual_seed(0)
        head = build_head(name, model, classnames)
        optimizer = torch.optim.SGD(parameter_groups(head, 0.002, 1.0, 0.01), momentum=0.9)

        # n steps of run.py's own loop (its train_one_epoch), one sync at its end
        def steps(batch, features_of, n):
            run.train_one_epoch(head, [(batch, targets, None)] * n, features_of, optimizer, 1.0, device,
                                quiet=True)

        def from_cache(batch):
            return batch.to(device, non_blocking=True).float()
        out[name] = {"ms_cached": timed(lambda: steps(cached, from_cache, reps), device, 1) / reps}
        if in_loop:  # the encoder is warmed up by now
            out[name]["ms_in_loop"] = timed(lambda: steps(images, encode, max(1, reps // 3)), device, 1, 0) \
                / max(1, reps // 3)
        if device.type == "cuda":  # the head's forward (text encoder included) under bf16 autocast too
            def under_bf16(n):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    steps(cached, from_cache, n)
            out[name]["ms_cached_bf16"] = timed(lambda: under_bf16(reps), device, 1) / reps
    return out


def bench_demo_epoch(n, size, views, batch, workers, device, epochs=1):
    """Seconds of one epoch of run.py's loop on the demo: encoder in the loop vs cached,
    and the cache build."""
    images, labels = demo_split(n, 0, size)
    plain = image_transform(size, train=False)
    model = tiny_clip(torch.stack([plain(im) for im in images]), resolution=size).to(device)
    train = ImageDataset(images, labels, image_transform(size, train=True))
    torch.manual_seed(0)
    head = build_head("positive", model, DEMO_CLASSES)
    optimizer = torch.optim.SGD(parameter_groups(head, 0.002, 1.0, 0.01), momentum=0.9)

    encode = frozen_encoder(model, device)

    def epoch(data, cached):  # run.py's train_one_epoch over a fresh loader (each epoch starts its workers)
        t0 = time.perf_counter()
        loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True,
                                             num_workers=0 if cached else workers,
                                             pin_memory=device.type == "cuda", collate_fn=collate)
        features_of = (lambda x: x.to(device, non_blocking=True).float()) if cached else encode
        run.train_one_epoch(head, loader, features_of, optimizer, 1.0, device, quiet=True)
        return time.perf_counter() - t0

    key = {"clip": "random-tiny", "clip_sha256": None, "weights": weights_fingerprint(model), "data": "demo",
           "image_size": size, "data_root": "bench", "split": "train", "view": "augmented",
           "device": device.type}
    build = dict(encode=encode, batch_size=batch, workers=workers)
    s_in_loop = min(epoch(train, False) for _ in range(epochs))  # each epoch starts its workers, as in run.py
    with tempfile.TemporaryDirectory() as cache_dir:
        t0 = time.perf_counter()
        encode_split(train, views, cache_dir=cache_dir, key=key, **build)
        s_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        # a later run: reads the key
        stored = encode_split(train, views, cache_dir=cache_dir, key=key, **build)
        s_open = time.perf_counter() - t0
        epoch(stored, True)  # warm-up
        s_cached = min(epoch(stored, True) for _ in range(3))
    return {"images": n, "size": size, "views": views, "batch": batch, "workers": workers,
            "s_in_loop": s_in_loop, "s_cached": s_cached, "s_build": s_build, "s_open_cache": s_open,
            "speedup": s_in_loop / s_cached}


def bench_pretrain(steps=3, batch=128, size=96):
    """The demo CLIP's pretraining (python -m clipmlr.pretrain): seconds per step of `batch` scenes at `size`
    px, scene generation included, and the whole default run projected from it."""
    import inspect
    from clipmlr import pretrain
    pretrain.pretrain(1, batch, size, progress=False)  # warm-up
    t0 = time.perf_counter()
    pretrain.pretrain(steps, batch, size, progress=False)
    per_step = (time.perf_counter() - t0) / steps
    default_steps = inspect.signature(pretrain.pretrain).parameters["steps"].default
    return {"s_per_step": per_step, "batch": batch, "size": size, "steps": default_steps,
            "s_total": per_step * default_steps}


def bench_demo_runs():
    """`python run.py --data demo` as a newcomer runs it (the demo's defaults, in-process): the first run (the
    feature cache built) and a later one (the cache reused), in seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for i in range(2):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                assert run.main(["--data", "demo", "--out", os.path.join(tmp, f"run{i}"),
                                 "--cache-dir", os.path.join(tmp, "cache")]) == 0
            times.append(time.perf_counter() - t0)
    return {"s_first": times[0], "s_later": times[1]}


def bench_map(n=40_504, classes=80, reps=3):
    """mAP of COCO val2014's size (40,504 images x 80 classes, 5% positives, 10% unknown):
    seconds per call."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(n, classes, generator=g)
    u = torch.rand(n, classes, generator=g)
    targets = torch.where(u < 0.05, 1, torch.where(u < 0.15, -1, 0))
    t0 = time.perf_counter()
    for _ in range(reps):
        mean_average_precision(scores, targets)
    return (time.perf_counter() - t0) / reps


def bench_decode_check(n=48, size=(640, 480)):
    """The up-front check that every image decodes (run.py without the cache), on COCO-sized JPEGs
    (640 x 480): ms per image in one process, beside a full decode, and the projection for COCO2014's images
    over this machine's cores."""
    from PIL import ImageFilter
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(n):
            noise = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g).numpy()
            path = os.path.join(folder, f"{i}.jpg")
            # a photo's size
            Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2)).save(path, quality=90)
            paths.append(path)
        t0 = time.perf_counter()
        check_decodable(paths, workers=0)
        ms_check = 1000 * (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for p in paths:
            read_image(p)
        ms_full = 1000 * (time.perf_counter() - t0) / n
    cores = os.cpu_count() or 1
    return {"ms_per_image": ms_check, "ms_full_decode": ms_full, "images": n, "cores": cores,
            "coco_seconds": COCO_IMAGES * ms_check / 1000 / cores}


def bench_predict(model, size, n, batch, workers, device):
    """images/s of `python -m clipmlr.predict` on a folder of n demo images (224 px PNGs): read, resize to the
    run's `size`, encode once, PositiveCoOp's head; batch by batch, as predict runs."""
    from clipmlr import predict
    images, _ = demo_split(n, 0, 224)
    torch.manual_seed(0)
    head = build_head("positive", model, DEMO_CLASSES)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i, im in enumerate(images):
            paths.append(os.path.join(folder, f"{i}.png"))
            im.save(paths[-1])
        list(predict.predict(head, model, paths[:batch], size, device, batch, 0))  # warm-up
        t0 = time.perf_counter()
        done = sum(1 for _ in predict.predict(head, model, paths, size, device, batch, workers))
        seconds = time.perf_counter() - t0
    return {"images": done, "size": size, "batch": batch, "workers": workers, "images_per_s": done / seconds}


def voc_sized_jpegs(folder, n):
    """n JPEG files of VOC's typical size (500 x 375, quality 90) of the demo's shapes; their paths."""
    images, _ = demo_split(n, 0, 500)
    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(folder, f"{i}.jpg"))
        im.crop((0, 0, 500, 375)).save(paths[-1], quality=90)
    return paths


def bench_pipelines(size, n=32, batch=8):
    """Images per second on one core of each input pipeline (read a VOC-sized 500 x 375 JPEG file, decode,
    resize to `size`, and for training Cutout + the authors' RandAugment, then normalise), the same images
    with the same draws (image j seeded by j, as SeededViews does): PIL images and uint8 tensors as a worker
    runs them, and --pipeline device on the CPU (read as bytes, then decoded and transformed `batch` images at
    a time)."""
    from clipmlr.augment import SeededViews
    from clipmlr.pipelines import collate, image_pipeline
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        paths = voc_sized_jpegs(folder, n)
        for pipeline in ("pil", "tensor", "device"):
            for train in (False, True):
                data = SeededViews(ImageDataset(paths, torch.zeros(n, 1),
                                                image_pipeline(size, train, pipeline=pipeline)), 1)

                def read(first, last):
                    if pipeline == "device":
                        for b in range(first, last, batch):
                            collate([data[j] for j in range(b, min(last, b + batch))])[0].to("cpu")
                    else:
                        for j in range(first, last):
                            data[j]
                read(0, batch)  # warm-up: first calls initialise libraries
                t0 = time.perf_counter()
                read(0, n)
                out[f"{pipeline}_{'augmented' if train else 'plain'}"] = n / (time.perf_counter() - t0)
    return out


def bench_device_pipeline(model, size, device, batch, workers, reps=3):
    """--pipeline device on a GPU. Alone: images/s of the training process's part, a batch of VOC-sized JPEGs
    (already read as bytes) decoded in one call (nvJPEG), resized, augmented (each image its own draws, seeded
    as in training) and normalised there. Fed: images/s of the encoder fed by it as run.py feeds it, a
    DataLoader with `workers` reading bytes and its pin-memory thread decoding and augmenting on a stream of
    its own while the encoder runs. Plain and augmented. (On a CPU bench_pipelines measures the pipeline
    beside the others.)"""
    from clipmlr.augment import SeededViews
    from clipmlr.pipelines import collate, image_pipeline
    encode = frozen_encoder(model, device)
    out = {"batch": batch, "device": str(device), "workers": workers}
    with tempfile.TemporaryDirectory() as folder:
        paths = voc_sized_jpegs(folder, batch)
        for train in (False, True):
            kind = "augmented" if train else "plain"
            data = SeededViews(ImageDataset(paths, torch.zeros(batch, 1),
                                            image_pipeline(size, train, pipeline="device")), 8)
            batches = iter([collate([data[j] for j in range(v * batch, (v + 1) * batch)])
                            for v in range(reps + 1)])
            ms = timed(lambda: next(batches)[0].to(device), device, reps)  # a fresh view each time
            out[kind] = batch / ms * 1000
            loader = torch.utils.data.DataLoader(data, batch_size=batch, num_workers=workers, pin_memory=True,
                                                 collate_fn=collate)
            with torch.inference_mode():
                seen, t0 = 0, None
                for images, _, _ in loader:
                    encode(images)
                    if t0 is None:  # the first batch starts the workers: not timed
                        sync(device)
                        t0 = time.perf_counter()
                    else:
                        seen += len(images)
                sync(device)
            out[f"fed_{kind}"] = seen / (time.perf_counter() - t0)
    return out


VOC_COCO = {"VOC2007": (5011, 4952), "COCO2014": (82_081, 40_137)}  # training and test images run.py reads


def projections(feed, head_ms, views, batch, epochs=50):
    """Projected hours of the paper's runs (50 epochs of PositiveCoOp) from measured rates, with the encoder
    in the loop (a fresh augmentation every epoch) and with the feature cache (K views encoded once; the test
    split is encoded once either way).

    `feed`: images/s of the encoder fed by the input pipeline, {"plain", "augmented"}; `head_ms[data]`: ms of
    the head's training step on a batch of features (the step on cached features), which follows the
    encoder's.
    """
    out = {}
    for data, (n_train, n_test) in VOC_COCO.items():
        steps = epochs * math.ceil(n_train / batch)
        test, head = n_test / feed["plain"], steps * head_ms[data] / 1000
        out[data] = {"hours_uncached": (epochs * n_train / feed["augmented"] + head + test) / 3600,
                     "hours_cached": (views * n_train / feed["augmented"] + head + test) / 3600}
    return {"runs": out, "views": views, "batch": batch, "feed": feed}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small settings: the miniature CLIP, under a minute on CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: 1 with --quick on CPU, where threads that wait for "
                        "each other on a busy machine make small ops ~10x slower; else torch's default)")
    p.add_argument("--workers", type=int, default=2, help="data-loading workers in the demo epoch")
    p.add_argument("--views", type=int, default=8,
                   help="cached views per training image (the projection's K)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None):
    args = parse_args(argv)
    device = distributed.use_device(args.device)  # cuda:N made current, as run.py does
    if args.threads or (args.quick and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    gpu, quick = device.type == "cuda", args.quick
    # image batch and repetitions, text repetitions, train-step batch and repetitions
    small = quick and not gpu
    batch, reps, text_reps, step_batch, step_reps = ((32, 10, 10, 32, 10) if gpu else (8, 3, 3, 8, 3) if quick
                                                     else (2, 2, 1, 32, 2))
    demo = (128, 224, 2, 32, 1) if small else (256, 224, 4, 32, 2)  # images, px, views, batch, in-loop epochs
    model = (tiny_clip(resolution=448) if small else rn101()).to(device)
    name = "miniature demo CLIP (random)" if small else "RN101 architecture (random weights)"
    if gpu:  # as run.py encodes on CUDA (and, like run.py, without cudnn.benchmark)
        model.visual.to(memory_format=torch.channels_last)
        torch.cuda.reset_peak_memory_stats(device)
    results = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if gpu else None,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "model": name, "quick": quick}
    print(f"bench on {device} ({results['gpu'] or f'{torch.get_num_threads()} CPU threads'}), {name}; "
          f"torch {torch.__version__}", flush=True)

    sections = [
        ("image_encoder", lambda: bench_image_encoder(model, 448, batch, reps, device)),
        ("text_encoder", lambda: bench_text_encoder(model, COCO_CLASSES, 16, text_reps, device)),
        ("train_step", lambda: bench_train_steps(model, VOC_CLASSES, 448, step_batch, step_reps, device)),
        ("demo_epoch", lambda: bench_demo_epoch(*demo[:3], demo[3], args.workers, device, demo[4])),
        ("pipelines", lambda: bench_pipelines(448)),
        ("device_pipeline",
         lambda: bench_device_pipeline(model, 448, device, 32, cli_workers()) if gpu else None),
        ("decode_check", bench_decode_check),
        ("predict", lambda: bench_predict(model, 224 if small else 448, 64 if small or gpu else 16,
                                          32 if gpu else 8, args.workers, device)),
        ("map_seconds_coco", bench_map),
        ("pretrain", lambda: bench_pretrain() if not gpu else None),
        ("demo_runs", lambda: bench_demo_runs() if not gpu else None),
    ]
    results["train_step_batch"], results["peak_mb"], results["seconds"] = step_batch, {}, {}
    for section, measure in sections:
        t0 = time.perf_counter()
        results[section] = measure()
        results["peak_mb"][section] = peak_memory_mb(device)
        results["seconds"][section] = time.perf_counter() - t0
        print(f"  {section}: {results['seconds'][section]:.1f} s", flush=True)
    if not small:  # the paper's runs, projected from the rates measured above
        t0 = time.perf_counter()
        coco = bench_train_steps(model, COCO_CLASSES, 448, step_batch, step_reps, device, ["positive"], False)
        head_ms = {"VOC2007": results["train_step"]["positive"]["ms_cached"],  # 20 classes
                   "COCO2014": coco["positive"]["ms_cached"]}  # 80 prompts
        encoder_img_s, workers = results["image_encoder"]["images_per_s"], cli_workers()
        if gpu:  # measured: the encoder fed by the device pipeline
            feed = {k: results["device_pipeline"][f"fed_{k}"] for k in ("plain", "augmented")}
            source = f"encoder fed by --pipeline device ({workers} workers)"
        else:  # the PIL pipeline's per-core rate times the default workers, beside the encoder:
            # the slower sets the pace
            feed = {k: min(encoder_img_s, results["pipelines"][f"pil_{k}"] * workers)
                    for k in ("plain", "augmented")}
            source = f"encoder alone, pil on {workers} workers beside it"
        results["projection"] = {**projections(feed, head_ms, args.views, step_batch), "source": source}
        results["seconds"]["projection"] = time.perf_counter() - t0
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"-> {args.json}")
    return results


def print_table(r):
    image, text, demo, peak = r["image_encoder"], r["text_encoder"], r["demo_epoch"], r["peak_mb"]
    rows = [
        (f"image encoder, {image['size']} px, batch {image['batch']}",
         f"{image['images_per_s']:.1f} images/s", f"peak {peak['image_encoder']:.0f} MB"),
        (f"text encoder fwd+bwd, {text['classes']} prompts x {text['tokens_full']} tokens",
         f"{text['ms_full']:.1f} ms", f"peak {peak['text_encoder']:.0f} MB"),
        (f"text encoder fwd+bwd, {text['classes']} prompts x {text['tokens_true']} tokens (true length)",
         f"{text['ms_true']:.1f} ms", f"{text['ms_full'] / text['ms_true']:.1f}x faster, max rel diff "
                                     f"{text['max_rel_diff']:.1e}"),
    ]
    batch = r["train_step_batch"]
    for name, s in r["train_step"].items():
        rows.append((f"train step {name}, batch {batch}: cached / encoder in loop",
                     f"{s['ms_cached']:.1f} / {s['ms_in_loop']:.1f} ms",
                     f"{s['ms_in_loop'] / s['ms_cached']:.1f}x faster cached"))
        if "ms_cached_bf16" in s:
            rows.append((f"train step {name}, cached, head under bf16 autocast",
                         f"{s['ms_cached_bf16']:.1f} ms",
                         f"{s['ms_cached'] / s['ms_cached_bf16']:.1f}x faster than fp32"))
    rows[-1] = (*rows[-1][:2], rows[-1][2] + f", peak {peak['train_step']:.0f} MB")
    rows += [
        (f"demo epoch ({demo['images']} images, {demo['size']} px): encoder in loop / cached",
         f"{demo['s_in_loop']:.2f} / {demo['s_cached']:.3f} s", f"{demo['speedup']:.1f}x faster cached"),
        (f"demo cache build ({demo['views']} views) / reopen",
         f"{demo['s_build']:.2f} / {demo['s_open_cache']:.3f} s",
         f"peak {peak['demo_epoch']:.0f} MB"),
        ("input pipeline, 500x375 JPEG -> 448 px, one core: PIL plain / augmented",
         f"{r['pipelines']['pil_plain']:.0f} / {r['pipelines']['pil_augmented']:.0f} images/s",
         "decode included"),
        ("input pipeline, same, uint8 tensors (--pipeline tensor): plain / augmented",
         f"{r['pipelines']['tensor_plain']:.0f} / {r['pipelines']['tensor_augmented']:.0f} images/s",
         "torchvision.io decode, tensor kernels"),
        ("input pipeline, same, --pipeline device on the CPU (batch 8): plain / augmented",
         f"{r['pipelines']['device_plain']:.0f} / {r['pipelines']['device_augmented']:.0f} images/s",
         "bytes read, then batched decode and the tensor kernels"),
        ("decoding check, 640x480 JPEG (one core): check / full decode",
         f"{r['decode_check']['ms_per_image']:.2f} / {r['decode_check']['ms_full_decode']:.2f} ms",
         f"COCO2014's {COCO_IMAGES:,} images: {r['decode_check']['coco_seconds']:.0f} s on "
         f"{r['decode_check']['cores']} cores"),
        ("mAP of 40,504 images x 80 classes (COCO val2014's size)", f"{r['map_seconds_coco']:.2f} s", ""),
    ]
    if r.get("pretrain"):
        p, d = r["pretrain"], r["demo_runs"]
        rows += [(f"demo CLIP pretraining: one step of {p['batch']} scenes at {p['size']} px",
                  f"{p['s_per_step']:.2f} s", f"{p['steps']} steps: {p['s_total'] / 60:.1f} min"),
                 ("python run.py --data demo: first run (cache built) / later run", f"{d['s_first']:.1f} / "
                  f"{d['s_later']:.1f} s", "the demo's defaults")]
    rows += [
        (f"predict: {r['predict']['images']} PNG images at {r['predict']['size']} px, "
         f"batch {r['predict']['batch']}",
         f"{r['predict']['images_per_s']:.1f} images/s", f"{r['predict']['workers']} workers, peak "
                                                         f"{peak['predict']:.0f} MB"),
    ]
    d = r["device_pipeline"]
    if d:
        rows.append((f"--pipeline device on {d['device']}, batch {d['batch']}, alone: plain / augmented",
                     f"{d['plain']:.0f} / {d['augmented']:.0f} images/s",
                     f"the encoder alone: {image['images_per_s']:.0f} images/s"))
        rows.append((f"encoder fed by it (DataLoader, {d['workers']} workers, pin-memory thread): "
                     f"plain / augmented",
                     f"{d['fed_plain']:.0f} / {d['fed_augmented']:.0f} images/s",
                     f"{d['fed_augmented'] / image['images_per_s']:.2f} of the encoder alone, augmented"))
    if "projection" in r:
        v = r["projection"]
        for data, p in v["runs"].items():
            rows.append((f"{data}, 50 epochs PositiveCoOp (batch {v['batch']}): no cache / "
                         f"cache K={v['views']}",
                         f"{p['hours_uncached']:.2f} / {p['hours_cached']:.2f} h", f"from: {v['source']}"))
    width = max(len(row[0]) for row in rows)
    memory = ("peak GPU memory allocated in the section" if r["gpu"]
              else "peak resident memory of the process so far")
    print(f"\n{r['model']} on {r['gpu'] or r['device']}; peak = {memory}\n")
    print(f"| {'measure':<{width}} | {'value':>22} | note")
    print(f"|{'-' * (width + 2)}|{'-' * 24}|------")
    for what, value, note in rows:
        print(f"| {what:<{width}} | {value:>22} | {note}")


if __name__ == "__main__":
    main()
