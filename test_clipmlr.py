"""The clipmlr test suite: CPU only, offline (nothing is downloaded; checkpoints, datasets and an HTTP
server on 127.0.0.1 are made here).

Quick check: `python -m pytest -q -m "not slow" test_clipmlr.py` (about 1.5 minutes on two cores); everything:
`python -m pytest -q test_clipmlr.py` (the `slow` ones add subprocesses, kill and resume, torchrun, a sweep).

Sections, in the README's reading order: shared helpers; 1 the method (aggregation, heads, loss, masking,
mAP); 2 the vendored CLIP (OpenAI's formats, features by hand, tokenizer, downloads); 3 run.py end to end;
4 data readers and augmentations; 5 failures (one line, exit 2, nothing left behind); then the layers: 6 the
feature cache, 7 resume, 8 torchrun, 9 pipelines, 10 folder data, 11 predict, 12 the analyses, 13 the demo's
CLIP; 14 the architecture. Expected values are computed independently of the code under test (by hand, from
the formula, or from the model's own weights with plain torch ops).
"""
import ast
import copy
import csv
import functools
import gzip
import hashlib
import http.server
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
import warnings
import xml.etree.ElementTree as ET
import zipfile
from io import BytesIO
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.datasets.voc as tv_voc
from PIL import Image, ImageDraw, ImageEnhance, ImageOps
from torch import nn
from torchvision import transforms as T
from torchvision.transforms import functional as TF

import bench  # beside run.py, as the tests are
import clipmlr.clip as clip
import run
from clipmlr import analysis, augment, cache as cache_features, cli, distributed, download, pipelines, predict
from clipmlr import pretrain
from clipmlr.aggregation import aggregate, prompt_logits
from clipmlr.analysis import sweep as sweep_module
from clipmlr.analysis.commands import zero_shot
from clipmlr.analysis.plots import figure_size
from clipmlr.analysis.similarity import (negation_similarities, negation_summary, similarity_maps,
                                         text_features)
from clipmlr.analysis.sweep import PAPER_AVERAGE, PAPER_TABLE1, PROPORTIONS, sweep_table
from clipmlr.analysis.switches import SWITCHES
from clipmlr.analysis.templates import COCO_CLASSES, negated, TEMPLATES
from clipmlr.augment import (apply_authors_op, authors_magnitude, image_transform, item_seed, MEAN, seeded,
                             SeededViews, STD)
from clipmlr.checkpoint import save_atomic
from clipmlr.clip import build_model, CLIP, tokenize
from clipmlr.clip.load import model_url, MODELS
from clipmlr.data import check_decodable, DataError, ImageDataset, load_coco, load_voc, mask_labels
from clipmlr.demo import (demo_clip_path, demo_split, draw_scene_shape, scene, SCENE_CLASSES, tiny_clip,
                          with_article)
from clipmlr.folder import load_folder
from clipmlr.heads import build_head, count_trainable, parameter_groups, Prompts
from clipmlr.loss import asymmetric_loss, loss_weight_rule
from clipmlr.metrics import (average_precision, format_metrics, margin_threshold, margins_of,
                             mean_average_precision, threshold_metrics, top_k_mask)
from clipmlr.nuswide import find_nuswide, load_nuswide, load_nuswide_splits
from clipmlr.pipelines import collate, DevicePipeline, image_pipeline, RawBatch, read_tensor, Ready

# `slow` marks the tests left out of the quick check (-m "not slow"); with no pytest.ini to register it in,
# its unknown-mark warning is silenced here, before the first use
warnings.filterwarnings("ignore", message=r"Unknown pytest\.mark\.slow\b",
                        category=pytest.PytestUnknownMarkWarning)
# torchvision 0.29 deprecates its decoders for torchcodec (not a dependency): hidden outside tests too
pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities:DeprecationWarning")


# ===========================================================================================================
# shared helpers: a tiny CLIP and its checkpoint files, tiny datasets, run.py's argument lists
# Used across the sections below; each builds what a test needs in memory or under tmp_path.
# ===========================================================================================================

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for the whole suite: its tensors are tiny, and on a busy 2-core machine two threads
    that wait for each other make every op ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ROOT = os.path.dirname(os.path.abspath(run.__file__))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(cache_features.__file__)))  # the repository root


def _clip(embed_dim=32, text_width=64, heads=1, resolution=64, seed=0, vision_layers=(1, 1, 1, 1),
          text_layers=1, random_norms=False):
    """The tests' tiny CLIP, frozen and in eval mode as `load` returns it: a ResNet of width 8 (4
    attention-pool heads, a 2x2 grid at 64 px) and a text transformer of `text_width`, its weights drawn under
    torch.manual_seed(seed). random_norms: also randomise what OpenAI's initialisation zeroes or sets to one
    (BatchNorm and LayerNorm affine and statistics, biases) and set logit_scale to log 20, which would hide
    mistakes otherwise. Frozen because PyTorch picks its matmul kernels partly on requires_grad: a frozen and
    an unfrozen copy of the same weights can differ in the last bit."""
    torch.manual_seed(seed)
    model = CLIP(embed_dim=embed_dim, image_resolution=resolution, vision_layers=list(vision_layers),
                 vision_width=8, context_length=77, vocab_size=49408, transformer_width=text_width,
                 transformer_heads=heads, transformer_layers=text_layers)
    if random_norms:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                elif isinstance(m, nn.LayerNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
                elif isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.05)
                elif isinstance(m, nn.MultiheadAttention):
                    m.in_proj_bias.normal_(0, 0.05)
            model.logit_scale.fill_(math.log(20.0))
    return model.requires_grad_(False).eval()


def _save_clip(path, model=None, kind="state dict", **config):
    """Saves `model` (by default `_clip(**config)`) at `path` and returns str(path): "state dict" as
    torch.save writes it, "wrapped" under a "state_dict" key, or OpenAI's TorchScript archive with fp16
    weights ("openai": as their convert_weights; "half": every floating tensor in fp16; see
    `_save_torchscript`)."""
    model = _clip(**config) if model is None else model
    if kind in ("openai", "half"):
        _save_torchscript(model, path, kind)
    else:
        state_dict = model.state_dict()
        torch.save({"state_dict": state_dict} if kind == "wrapped" else state_dict, path)
    return str(path)


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _strict_json(path):
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


DEMO = ["--data", "demo", "--demo-images", "128", "--cache-views", "1", "--workers", "0"]


# in-loop encoding (no cache) so that an epoch takes long enough to be killed in the middle of
SMALL = ["--head", "positive", "--data", "demo", "--demo-images", "48", "--image-size", "64", "--epochs", "6",
         "--batch-size", "8", "--no-cache-features", "--augment", "--workers", "0", "--eval-every", "2"]


DEMO_ARGS = ["--data", "demo", "--demo-images", "24", "--image-size", "64", "--workers", "0",
             "--cache-views", "1"]


def _jpeg(path, colour, size=(80, 60)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, "JPEG")


def _voc_xml(path, objects):
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = os.path.basename(path).replace(".xml", ".jpg")
    for name, difficult in objects:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "difficult").text = str(difficult)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ET.ElementTree(root).write(path)


VOC_TRAIN = {"000005": [("chair", 0), ("person", 1)], "000007": [("car", 0)],
             "000009": [("dog", 0), ("cat", 0)],
             "000012": [("car", 0), ("car", 1)]}
VOC_TEST = {"000001": [("dog", 0), ("person", 0)], "000002": [("train", 0)],
            "000004": [("car", 1), ("cat", 0)]}


def _make_voc(root):
    voc = os.path.join(root, "VOCdevkit", "VOC2007")
    for split, items in (("trainval", VOC_TRAIN), ("test", VOC_TEST)):
        for i, (name, objects) in enumerate(items.items()):
            _jpeg(os.path.join(voc, "JPEGImages", f"{name}.jpg"), (40 * i, 90, 200 - 30 * i))
            _voc_xml(os.path.join(voc, "Annotations", f"{name}.xml"), objects)
        os.makedirs(os.path.join(voc, "ImageSets", "Main"), exist_ok=True)
        with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("\n".join(items) + "\n")
    return voc


def _make_coco(root):
    categories = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    for split, n in (("train2014", 5), ("val2014", 3)):
        images = [{"id": 100 + i, "file_name": f"COCO_{split}_{i:012d}.jpg"} for i in range(n)]
        for i, im in enumerate(images):
            _jpeg(os.path.join(root, split, im["file_name"]), (50 * i, 100, 30))
        # image 100+n-1 has no annotation and must be dropped
        anns = [{"id": 1, "image_id": 100, "category_id": 1}, {"id": 2, "image_id": 100, "category_id": 18},
                {"id": 3, "image_id": 101, "category_id": 3}, {"id": 4, "image_id": 101, "category_id": 3}]
        anns += [{"id": 10 + i, "image_id": 100 + i, "category_id": 18} for i in range(2, n - 1)]
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": categories}, f)


def _tiny_voc_run(tmp_path, *extra):
    root = tmp_path / "voc"
    voc = _make_voc(str(root))
    argv = ["--head", "positive", "--data", "voc", "--data-root", str(root), "--clip",
            _save_clip(tmp_path / "t.pt"),
            "--image-size", "64", "--epochs", "2", "--batch-size", "2", "--cache-views", "1",
            "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *extra]
    return voc, argv


def _demo_chance(n_train, size):
    """mAP of a random ranking ≈ the mean prevalence of the classes in the demo's test split."""
    _, y = demo_split(max(1, n_train // 2), 0, size, offset=10**6)
    return 100 * y.float().mean(0)[y.sum(0) > 0].mean().item()


def _ap_sklearn_style(scores, labels):
    """Average precision as scikit-learn defines it, written out here: Σ_k (R_k − R_{k−1}) · P_k over
    the distinct score thresholds from the highest down (tied scores enter together)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    positives = (labels == 1).sum()
    ap, recall_before = 0.0, 0.0
    for threshold in sorted(set(scores.tolist()), reverse=True):
        above = scores >= threshold
        tp = int((labels[above] == 1).sum())
        precision, recall = tp / int(above.sum()), tp / positives
        ap += (recall - recall_before) * precision
        recall_before = recall
    return ap


def _ap_known(margins, labels):
    """Per-class AP over the known labels only, from the written-out definition (−1 dropped)."""
    out = []
    for c in range(labels.shape[1]):
        known = labels[:, c] >= 0
        y, s = labels[known, c], margins[known, c]
        out.append(_ap_sklearn_style(s, y) if (y == 1).any() else None)
    return out


def _map(scores, targets):
    """The mAP in percent alone (mean_average_precision gives it with the per-class APs)."""
    return mean_average_precision(scores, targets)[0]


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _run_here(capfd, *argv):
    """run.py's main(argv) in this process: (exit code, stdout, stderr), a SystemExit from argparse included;
    capfd also catches what the loader's worker processes print (a traceback there would show in stderr)."""
    capfd.readouterr()
    try:
        code = run.main(list(argv))
    except SystemExit as stop:
        code = stop.code
    out, err = capfd.readouterr()
    return code, out, err


def _run_cli(*argv, cwd=ROOT, timeout=300):
    """run.py in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *argv], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


# ===========================================================================================================
# 1. the method: aggregation, heads, loss, masking, mAP
# Hand-computed values on tiny tensors for the pure functions of the core, and the heads' shapes, gradients,
# parameter groups and counts; evaluation by margin and the loss's digits against float64 formulations.
# ===========================================================================================================

def test_aggregate_by_hand():
    scores = torch.tensor([[[1.0, 0.0], [3.0, 2.0]]])  # (B=1, L=2, K=2)
    out = aggregate(scores, scores)
    w = [math.exp(1) / (math.exp(1) + math.exp(3)), math.exp(3) / (math.exp(1) + math.exp(3))]
    v = [1 / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    assert out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx(5 * (w[0] * 1 + w[1] * 3), rel=1e-6)
    assert out[0, 1].item() == pytest.approx(5 * (v[0] * 0 + v[1] * 2), rel=1e-6)


def test_prompt_logits_by_hand():
    feats = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]  # L = 3 positions, D = 2
    pos, neg = [1.0, 1.0], [-1.0, 0.5]  # C = 1
    out = prompt_logits(torch.tensor([feats]), torch.tensor([pos]), torch.tensor([neg]))
    s_pos = [20 * _cos(f, pos) for f in feats]
    s_neg = [20 * _cos(f, neg) for f in feats]
    w = [math.exp(s) / sum(math.exp(t) for t in s_pos) for s in s_pos]  # presence weights, both sides
    assert out.shape == (1, 1, 2)
    assert out[0, 0, 0].item() == pytest.approx(5 * sum(a * b for a, b in zip(w, s_pos)), rel=1e-5)
    assert out[0, 0, 1].item() == pytest.approx(5 * sum(a * b for a, b in zip(w, s_neg)), rel=1e-5)


def test_absence_side_own_softmax_by_hand():
    """--absence-weights own: the absence side weighted by the softmax of its own similarities (the paper's
    reading), where the default (the authors' code) uses the presence side's."""
    feats = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]
    pos, neg = [1.0, 1.0], [-1.0, 0.5]
    s_pos = [20 * _cos(f, pos) for f in feats]
    s_neg = [20 * _cos(f, neg) for f in feats]
    own = [math.exp(s) / sum(math.exp(t) for t in s_neg) for s in s_neg]
    out = prompt_logits(torch.tensor([feats]), torch.tensor([pos]), torch.tensor([neg]),
                        absence_weights="own")
    assert out[0, 0, 1].item() == pytest.approx(5 * sum(a * b for a, b in zip(own, s_neg)), rel=1e-5)
    w = [math.exp(s) / sum(math.exp(t) for t in s_pos) for s in s_pos]
    assert out[0, 0, 0].item() == pytest.approx(5 * sum(a * b for a, b in zip(w, s_pos)), rel=1e-5)
    head = build_head("dual", _clip(), ["a", "b"], n_ctx=2, absence_weights="own")
    features = torch.randn(3, 5, 32)
    with torch.no_grad():
        presence, absence = head.class_embeddings()
        assert torch.equal(head(features), prompt_logits(features, presence, absence, "own"))


def test_baseline_head_by_hand():
    clip = _clip(embed_dim=2)
    head = build_head("baseline", clip, ["a"])  # C = 1 -> 2 channels: presence, absence
    with torch.no_grad():
        head.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        head.proj.bias.copy_(torch.tensor([0.5, 0.0]))
    feats = [[1.0, 2.0], [-1.0, 0.5]]
    out = head(torch.tensor([feats]))
    a_pos = [f[0] + 0.5 for f in feats]
    a_neg = [-f[1] for f in feats]
    def agg(a):
        return 5 * sum(math.exp(x) * x for x in a) / sum(math.exp(x) for x in a)
    assert out.shape == (1, 1, 2)
    assert out[0, 0, 0].item() == pytest.approx(agg(a_pos), rel=1e-6)
    assert out[0, 0, 1].item() == pytest.approx(agg(a_neg), rel=1e-6)


def test_prompts_equal_plain_text_when_context_is_placeholder_tokens():
    """With every learned vector set to the embedding of "x", a prompt is the text "X X ... X name."."""
    clip = _clip()
    names = ["cat", "dining table"]
    head = build_head("dual", clip, names, n_ctx=4)
    x_id = tokenize("x")[0, 1]
    with torch.no_grad():
        head.presence_prompts.ctx.copy_(clip.token_embedding.weight[x_id].expand(2, 4, -1))
        expected = clip.encode_text(tokenize([f"X X X X {n}." for n in names]), truncate=False)
        got = head.presence_prompts(clip)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_prompts_at_true_length_equal_77_tokens():
    model = _clip(embed_dim=64, text_layers=2)
    names = ["person", "traffic light", "hair drier", "cat"]
    prompts = Prompts(model, names, n_ctx=4)
    prompts.ctx.data.normal_(0, 0.5)  # far from the init, so a misplaced context vector would show
    seen = []
    hook = model.transformer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    short = prompts(model)  # (C, D)
    short.square().sum().backward()
    grad_short = prompts.ctx.grad.clone()
    # by hand: all 77 tokens of "X X X X <name>." with the context vectors written over the X's
    ids = tokenize([f"X X X X {n}." for n in names])  # (C, 77)
    prompts.ctx.grad = None
    x = model.token_embedding(ids).detach()  # (C, 77, W)
    x = torch.cat([x[:, :1], prompts.ctx, x[:, 5:]], dim=1)  # (C, 1 + 4 + 72, W)
    full = model.encode_embedded(x, ids.argmax(dim=-1), truncate=False)
    full.square().sum().backward()
    hook.remove()
    # the short run saw only the tokens up to the last EOT
    assert seen == [int(ids.argmax(dim=-1).max()) + 1, 77]
    assert ((short - full).abs().max() / full.abs().max()).item() < 1e-5
    assert ((grad_short - prompts.ctx.grad).abs().max() / prompts.ctx.grad.abs().max()).item() < 1e-5


def test_text_features_of_prompts_equal_the_truncating_path():
    """truncate=False on the prompts, already cut at their last EOT, gives the features of the full 77 tokens.
    """
    model = _clip()
    prompts = build_head("positive", model, ["cat", "hot air balloon"], n_ctx=3).presence_prompts
    full = torch.cat([prompts.embeddings(), model.token_embedding(torch.zeros(
        # (C, 77, W): padded as tokenize pads
        2, 77 - prompts.embeddings().shape[1], dtype=torch.long))], dim=1)
    torch.testing.assert_close(prompts(model), model.encode_embedded(full, prompts.eot, truncate=False),
                               rtol=1e-5, atol=1e-6)


def test_prompt_heads_make_no_host_sync_per_step(monkeypatch):
    """A training step computes every prompt's text features (Prompts.forward). They are already cut after
    their last end token, so nothing needs to read a tensor's value on the host: on a GPU each such read
    (int(tensor), .item(), .tolist(), bool(tensor)) waits for the GPU. Counted here on the CPU."""
    model = _clip()
    heads = {name: build_head(name, model, ["cat", "hot air balloon"], n_ctx=3)
             for name in ("dual", "positive", "negative")}
    reads = []
    for method in ("__int__", "__bool__", "__float__", "__index__", "item", "tolist"):
        real = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _real=real, _m=method, **k:
                            (reads.append(_m), _real(self, *a, **k))[1])
    for name, head in heads.items():
        embeddings = head.class_embeddings()
        assert all(e.shape == (2, model.embed_dim) for e in embeddings), name
    monkeypatch.undo()
    assert reads == []


@pytest.mark.parametrize("name", ["baseline", "dual", "positive", "negative"])
def test_head_shapes_and_gradients_reach_only_the_head(name):
    clip = _clip()
    head = build_head(name, clip, ["a", "b", "c"], n_ctx=2)
    feats = torch.randn(4, 1 + 2 * 2, clip.embed_dim)
    logits = head(feats)
    assert logits.shape == (4, 3, 2)
    asymmetric_loss(logits, torch.tensor([[1, 0, -1]] * 4)).backward()
    assert all(p.grad is None for p in clip.parameters())
    trainable = [p for p in head.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    assert count_trainable(head) == sum(p.numel() for p in trainable)
    assert not any(k.startswith(("visual", "transformer", "token_embedding")) for k in head.state_dict())


@pytest.mark.parametrize("name", ["positive", "negative"])
def test_heads_without_the_residual(name):
    clip = _clip(embed_dim=512, text_width=512)
    names = [f"class {i}" for i in range(20)]
    with_residual = build_head(name, clip, names)
    without = build_head(name, clip, names, residual=False)
    assert count_trainable(with_residual) == 184_320 and count_trainable(without) == (16 * 512 + 512) * 20
    prompts = without.presence_prompts if name == "positive" else without.absence_prompts
    with torch.no_grad():
        embeddings = without.class_embeddings()
        text = prompts(clip)
    assert torch.equal(embeddings[0 if name == "positive" else 1], text)  # the prompt's feature alone
    assert {g["name"]: len(g["params"]) for g in parameter_groups(without, 0.1, 1.0, 0.01)} == \
        {"prompt": 1, "embedding": 1}


# The paper's printed counts (Table 1: VOC Baseline 20k, Positive/NegativeCoOp 170k, DualCoOp 0.3M; COCO 80k,
# 730k, 1.3M; Table 3 the same as 0.17M and 0.73M) are these counts cut to 10k (DualCoOp's, from DualCoOp's
# paper, to 0.1M). No one setting of PositiveCoOp's residual gives both datasets' figures: COCO's 730k is
# 737,280, with the residual (696,320 without: 690k); VOC's 170k is 174,080, without it (184,320 with: 180k).
@pytest.mark.parametrize("n_classes,counts,printed,residual_printed", [
    (20, {"baseline": 20_520, "positive": 184_320, "dual": 327_680, "negative": 184_320},
     {"baseline": 20_000, "positive": 170_000, "dual": 300_000, "negative": 170_000}, False),
    (80, {"baseline": 82_080, "positive": 737_280, "dual": 1_310_720, "negative": 737_280},
     {"baseline": 80_000, "positive": 730_000, "dual": 1_300_000, "negative": 730_000}, True),
])
def test_trainable_parameter_counts_follow_the_design_formulas(n_classes, counts, printed, residual_printed):
    """DESIGN.md's counts with D = 512 and 16 context tokens of width 512, per class: baseline 1026 (a D -> 2
    linear map), positive / negative 9216 (16 x 512 context + a 512 residual + a 512 free embedding), dual
    16384 (2 x 16 x 512); positive / negative without the residual 8704."""
    clip = _clip(embed_dim=512, text_width=512)  # RN101's text width and embedding dim
    names = [f"class {i}" for i in range(n_classes)]
    per_class = {"baseline": 1026, "positive": 9216, "dual": 16384, "negative": 9216}
    assert counts == {name: k * n_classes for name, k in per_class.items()}
    got = {name: count_trainable(build_head(name, clip, names)) for name in counts}
    assert got == counts
    without = {name: count_trainable(build_head(name, clip, names, residual=False))
               for name in ("positive", "negative")}
    assert without == {"positive": 8704 * n_classes, "negative": 8704 * n_classes}

    def cut(n, step):
        return n // step * step

    assert cut(got["baseline"], 10_000) == printed["baseline"]
    assert cut(got["dual"], 100_000) == printed["dual"]
    for name in ("positive", "negative"):
        # COCO's figure: with the residual
        assert (cut(got[name], 10_000) == printed[name]) == residual_printed
        assert (cut(without[name], 10_000) == printed[name]) != residual_printed  # VOC's: without it


def test_shared_context_and_parameter_groups():
    clip = _clip()
    head = build_head("positive", clip, ["a", "b"], n_ctx=3, class_specific=False)
    assert head.presence_prompts.ctx.shape == (3, 64)
    groups = {g["name"]: (g["lr"], sum(p.numel() for p in g["params"]))
              for g in parameter_groups(head, 0.1, 2.0, 0.3)}
    assert groups == {"prompt": (0.1, 3 * 64), "embedding": (2.0, 2 * 2 * clip.embed_dim)}
    with pytest.raises(ValueError, match="unknown head 'pos'"):
        build_head("pos", clip, ["a"])


def test_a_parameter_in_no_group_is_an_error():
    class WithExtra(build_head("positive", _clip(), ["a"]).__class__):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = nn.Parameter(torch.zeros(3))  # declared in no group
    head = WithExtra(_clip(), ["a"], n_ctx=2)
    with pytest.raises(ValueError, match="'extra' in 0 groups"):
        parameter_groups(head, 0.1, 1.0, 0.01)
    for name in ("baseline", "dual", "positive", "negative"):  # every head declares every parameter once
        groups = parameter_groups(build_head(name, _clip(), ["a", "b"], n_ctx=2), 0.1, 1.0, 0.01)
        declared = list(build_head(name, _clip(), ["a"]).parameters())
        assert sum(len(g["params"]) for g in groups) == len(declared)


def test_margins_leave_the_head_in_the_mode_they_found_and_the_clip_frozen():
    """Evaluation does not switch a head into training mode; a head's training mode never reaches the frozen
    CLIP (its BatchNorm statistics stay put), whose weights are not the head's parameters or state."""
    model = _clip()
    head = build_head("positive", model, ["a", "b"], n_ctx=2)
    batches = [(torch.randn(3, 5, model.embed_dim), None, None)]
    for mode in (False, True):
        head.train(mode)
        margins_of(head, batches, lambda b: b)
        assert head.training is mode
    head.train()
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(k.startswith(("visual", "transformer", "token_embedding")) for k in head.state_dict())
    assert {id(p) for p in head.parameters()}.isdisjoint(id(p) for p in model.parameters())
    assert all(not p.requires_grad for p in model.parameters())


def _asl_by_hand(logits, targets, gp=1.0, gn=2.0, clip=0.05, eps=1e-6):
    total = 0.0
    for (l0, l1), y in zip(logits, targets):
        p = 1 / (1 + math.exp(l1 - l0))
        if y == 1:
            total += -((1 - p) ** gp) * math.log(max(p, eps))
        elif y == 0:
            qc = min(1 - p + clip, 1.0)
            total += -((1 - qc) ** gn) * math.log(max(qc, eps))
    return total


def test_asymmetric_loss_against_the_formula():
    logits = [(2.0, -1.0), (-0.5, 0.3), (0.1, 0.1), (60.0, -60.0), (-60.0, 60.0), (1.5, 3.0), (-40.0, 40.0)]
    targets = [1, 0, -1, 1, 0, 1, 1]
    got = asymmetric_loss(torch.tensor([logits]), torch.tensor([targets]))
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(_asl_by_hand(logits, targets), rel=1e-5)
    # an extreme entry gives finite gradients
    x = torch.tensor([[[60.0, -60.0], [-60.0, 60.0]]], requires_grad=True)
    asymmetric_loss(x, torch.tensor([[0, 1]])).backward()
    assert torch.isfinite(x.grad).all()


def test_asymmetric_loss_ignores_unknown_labels():
    torch.manual_seed(0)
    logits = torch.randn(5, 4, 2, requires_grad=True)
    targets = torch.randint(0, 2, (5, 4))
    known = asymmetric_loss(logits, targets)
    partial = targets.clone()
    partial[0] = -1
    rest = asymmetric_loss(logits[1:], targets[1:])
    assert asymmetric_loss(logits, partial).item() == pytest.approx(rest.item(), rel=1e-6)
    assert asymmetric_loss(logits, torch.full_like(targets, -1)).item() == 0.0
    asymmetric_loss(logits, partial).backward()
    assert logits.grad[0].abs().sum() == 0 and known.item() > rest.item()


def test_asymmetric_loss_focusing_weight_has_no_gradient():
    """d/dl of −(1−p)·log p with (1−p) held constant is −(1−p)·(1−p) for the presence logit."""
    x = torch.tensor([[[0.7, -0.2]]], requires_grad=True)
    asymmetric_loss(x, torch.tensor([[1]])).backward()
    p = 1 / (1 + math.exp(-0.9))
    assert x.grad[0, 0, 0].item() == pytest.approx(-(1 - p) * (1 - p), rel=1e-5)


def _asl_float64(logits, targets, gamma_pos=1.0, gamma_neg=2.0, clip=0.05, eps=1e-6):
    """The asymmetric loss written independently, in float64, with sigmoids of the margin in place of the
    softmax: p = σ(l0 − l1), q = σ(l1 − l0)."""
    logits = logits.double()
    d = logits[..., 0] - logits[..., 1]
    p, q = torch.sigmoid(d), torch.sigmoid(-d)
    qc = torch.clamp(q + clip, max=1.0)
    positive_term = -((1 - p).detach() ** gamma_pos) * torch.log(torch.clamp(p, min=eps))
    negative_term = -((1 - qc).detach() ** gamma_neg) * torch.log(torch.clamp(qc, min=eps))
    zero = torch.zeros_like(d)
    return torch.where(targets == 1, positive_term, torch.where(targets == 0, negative_term, zero)).sum()


def test_asymmetric_loss_gradients_match_a_float64_formulation():
    """Values and gradients to 1e-6 relative, saturated logits included; float64 input stays float64."""
    g = torch.Generator().manual_seed(0)
    moderate = torch.rand(64, 20, 2, generator=g) * 40 - 20  # margins up to ±40
    saturated = torch.rand(16, 20, 2, generator=g) * 200 - 100  # the range a trained head reaches
    # p near 1
    near_one = torch.stack([torch.rand(16, 20, generator=g) * 12 + 6, torch.zeros(16, 20)], dim=-1)
    logits = torch.cat([moderate, saturated, near_one])
    targets = torch.randint(-1, 2, logits.shape[:2], generator=g)
    reference = logits.double().requires_grad_()
    _asl_float64(reference, targets).backward()
    x = logits.clone().requires_grad_()
    value = asymmetric_loss(x, targets)
    value.backward()
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(_asl_float64(logits, targets).item(), rel=1e-6)
    scale = reference.grad.abs().max()
    assert ((x.grad.double() - reference.grad).abs().max() / scale).item() <= 1e-6
    # in float64 the loss computes in float64: it agrees with the reference to float64's digits
    x64 = logits.double().requires_grad_()
    value64 = asymmetric_loss(x64, targets)
    value64.backward()
    assert value64.dtype == torch.float64
    assert ((x64.grad - reference.grad).abs().max() / scale).item() <= 1e-12
    # half-precision logits are computed in float32, not below
    assert asymmetric_loss(logits.half(), targets).dtype == torch.float32


def test_map_hand_made_cases():
    y = np.array([[1], [0], [1], [0]])
    assert _map(np.array([[4.0], [1.0], [3.0], [2.0]]), y) == pytest.approx(100.0)
    # reversed ranking: positives at ranks 3 and 4 -> (1/3 + 2/4) / 2
    assert _map(np.array([[1.0], [4.0], [2.0], [3.0]]), y) == pytest.approx(100 * (1 / 3 + 1 / 2) / 2)
    # one positive at rank 2
    assert _map(np.array([[0.5], [0.9], [0.1]]), np.array([[1], [0], [0]])) == pytest.approx(50.0)
    # tied scores are ranked in input order: negative, negative, positive, positive below the 0.9 negative
    ties = _map(np.array([[0.5], [0.5], [0.9], [0.5]]), np.array([[0], [1], [0], [1]]))
    assert ties == pytest.approx(100 * (1 / 3 + 2 / 4) / 2)
    # an unknown label ranked first is ignored
    assert _map(np.array([[0.9], [0.5], [0.1]]), np.array([[-1], [1], [0]])) == pytest.approx(100.0)
    # a class without a positive is left out of the mean, and has AP NaN
    scores = torch.tensor([[0.9, 0.2], [0.1, 0.8]])
    targets = torch.tensor([[1, 0], [0, 0]])
    ap = average_precision(scores, targets)
    assert ap[0] == 1.0 and np.isnan(ap[1])
    assert _map(scores, targets) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="no class has a positive"):
        _map(scores, torch.zeros(2, 2))


def test_map_equals_brute_force():
    rng = np.random.default_rng(0)
    scores = rng.random((60, 7))
    targets = rng.integers(-1, 2, (60, 7))
    expected = []
    for c in range(7):
        known = [(s, t) for s, t in zip(scores[:, c], targets[:, c]) if t >= 0]
        precisions = []
        for s, t in known:
            if t == 1:
                above = [u for v, u in known if v >= s]
                precisions.append(sum(u == 1 for u in above) / len(above))
        expected.append(sum(precisions) / len(precisions))
    np.testing.assert_allclose(average_precision(scores, targets), expected, rtol=1e-12)
    assert _map(scores, targets) == pytest.approx(100 * np.mean(expected))


def _ap_by_counting(scores, labels):
    """AP of one class as test_map_equals_brute_force's loop defines it (the mean, over the positives, of the
    fraction of positives among the known images scored at or above each), counted with binary searches so
    that it runs at COCO's size. (N,) scores, (N,) labels in {1, 0, -1} -> AP, NaN for a class without a
    positive."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    known, positive = np.sort(scores[labels >= 0]), np.sort(scores[labels == 1])
    if len(positive) == 0:
        return float("nan")
    # known images scored >= each positive
    known_above = len(known) - np.searchsorted(known, positive, side="left")
    positive_above = len(positive) - np.searchsorted(positive, positive, side="left")
    return float(np.mean(positive_above / known_above))


def test_map_on_coco_sized_input_matches_closed_forms_and_counting():
    """40,504 x 80 (COCO val2014's size): six classes whose AP is known in closed form, among 74 random
    classes (5% positive, 10% unknown) checked by counting. Timing is measured in bench.py, not here."""
    n, rng = 40_504, np.random.default_rng(0)
    scores = rng.random((n, 80))  # float64: no two images of a class tie
    targets = (rng.random((n, 80)) < 0.05).astype(np.int64)
    targets[rng.random((n, 80)) < 0.1] = -1
    # (N, C): row_at_rank[k - 1, c] is the image ranked k in class c
    row_at_rank = np.argsort(-scores, axis=0)

    def label_ranks(c, ranks, value):  # ranks are 1-based
        targets[row_at_rank[np.asarray(ranks) - 1, c], c] = value

    targets[:, :6] = 0
    label_ranks(0, range(1, 2001), 1)  # the 2,000 best-scored images are the positives: AP 1
    label_ranks(1, [137], 1)  # one positive, at rank 137: AP 1/137
    label_ranks(2, range(2, 2001, 2), 1)  # positives at ranks 2, 4, ..., 2000: precision k / 2k = 1/2 at each
    # the 100 best-scored unknown, the next 50 positive: AP 1 (unknowns dropped)
    label_ranks(3, range(1, 101), -1)
    label_ranks(3, range(101, 151), 1)
    label_ranks(5, range(n - 9, n + 1), 1)  # the m = 10 positives ranked last: (1/m) sum_k k / (n - m + k)
    # 4: none
    closed = [1.0, 1 / 137, 0.5, 1.0, float("nan"), sum(k / (n - 10 + k) for k in range(1, 11)) / 10]
    expected = np.array(closed + [_ap_by_counting(scores[:, c], targets[:, c]) for c in range(6, 80)])
    # the counting helper itself: the closed forms, and scikit-learn's definition on a slice
    np.testing.assert_allclose([_ap_by_counting(scores[:, c], targets[:, c]) for c in range(6)], closed,
                               rtol=1e-12)
    for c in (6, 40, 79):
        known = targets[:3000, c] >= 0
        assert _ap_by_counting(scores[:3000, c], targets[:3000, c]) == \
            pytest.approx(_ap_sklearn_style(scores[:3000, c][known], targets[:3000, c][known]), rel=1e-12)

    ap = average_precision(torch.from_numpy(scores), torch.from_numpy(targets))
    np.testing.assert_allclose(ap, expected, rtol=1e-12, atol=0)  # NaN where expected is NaN
    assert _map(torch.from_numpy(scores), torch.from_numpy(targets)) == \
        pytest.approx(100 * np.nanmean(expected), rel=1e-12)


def test_evaluation_ranks_by_margin_whatever_the_order_of_the_test_images():
    """A head whose logits saturate the fp32 softmax (as trained heads do: logits reach ±100) scores the same
    mAP under any order of the test images, equal to scikit-learn's AP on the logit margins."""
    torch.manual_seed(0)
    clip = _clip(embed_dim=8)
    head = build_head("baseline", clip, ["a", "b", "c"])
    with torch.no_grad():
        head.proj.weight.mul_(400.0)  # logits of many tens: the softmax is exactly 1.0 or 0.0 for most images
    n = 60
    features = torch.randn(n, 5, 8)
    targets = torch.randint(0, 2, (n, 3))
    targets[0] = 1  # every class has a positive

    def loader(order):  # the test images in this order, as stored features in batches of 16
        data = cache_features.Stored(features[order].half().numpy()[None], targets[order])
        return torch.utils.data.DataLoader(data, batch_size=16, collate_fn=pipelines.collate)

    with torch.no_grad():
        logits = head(features.half().float())
    probabilities = torch.softmax(logits, dim=-1)[..., 0]
    assert ((probabilities == 1.0) | (probabilities == 0.0)).float().mean() > 0.5  # saturated: ties galore
    identity, reverse = torch.arange(n), torch.arange(n).flip(0)
    # ranked by the probability, the mAP would depend on the order of the images ...
    by_probability = [average_precision(probabilities[o], targets[o]) for o in (identity, reverse)]
    assert not np.allclose(*by_probability)
    # ... ranked by the margin it does not, and it is scikit-learn's AP of the margins
    margins = margins_of(head, loader(identity), lambda batch: batch.float())
    assert torch.allclose(margins, logits[..., 0] - logits[..., 1])
    assert margins.unique().numel() == margins.numel()  # no two margins tie
    expected = [_ap_sklearn_style(margins[:, c], targets[:, c]) for c in range(3)]
    for order in (identity, reverse, torch.randperm(n)):  # run.py's evaluate, one process: its shard is all
        scores = run.evaluate(head, loader(order), torch.arange(n), lambda batch: batch.float(),
                              targets[order])
        np.testing.assert_allclose(scores["ap"], expected, rtol=1e-12)
        assert scores["map"] == pytest.approx(100 * np.mean(expected), rel=1e-12)


def test_mask_labels_fraction_determinism_and_errors():
    targets = torch.randint(0, 2, (500, 40))
    mask = mask_labels(targets, 0.3, seed=1)
    kept = (mask >= 0).float().mean().item()
    n = targets.numel()
    assert abs(kept - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # within 4 binomial standard deviations
    assert torch.equal(mask[mask >= 0], targets[mask >= 0])  # kept labels are unchanged
    assert torch.equal(mask, mask_labels(targets, 0.3, seed=1))
    assert not torch.equal(mask, mask_labels(targets, 0.3, seed=2))
    assert torch.equal(mask_labels(targets, 1.0, seed=1), targets)
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            mask_labels(targets, bad, seed=0)


# -------------------------------------------------------- threshold metrics: ML-GCN's and ASL's conventions
# precision, recall and F1 (per class and overall, at a threshold and top-k) against plain-Python loops over
# the authors' formulas and hand-counted cases

METRIC_NAMES_ = ("CP", "CR", "CF1", "OP", "OR", "OF1")


def _approx_none(expected):
    """pytest.approx for a dict that may hold None."""
    return {k: None if v is None else pytest.approx(v, abs=1e-9) for k, v in expected.items()}


def _six(cp, cr, cf1, op, o_r, of1):
    return dict(zip(METRIC_NAMES_, (cp, cr, cf1, op, o_r, of1)))


# ---- reference: plain Python loops, probabilities, written from the authors' formulas ----

def _counts_by_loops(margins, targets, predicted):
    """predicted(i, c) -> lists Ng, Np, Nc over the known (>= 0) labels, counted one entry at a time."""
    n, c = len(margins), len(margins[0])
    ng, np_, nc = [0] * c, [0] * c, [0] * c
    for i in range(n):
        for j in range(c):
            if targets[i][j] < 0:
                continue
            pred = predicted(i, j)
            ng[j] += targets[i][j] == 1
            np_[j] += pred
            nc[j] += pred and targets[i][j] == 1
    return ng, np_, nc


def _hm(p, r):
    if p is None or r is None:
        return None
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def _mlgcn_by_loops(ng, np_, nc):
    c = len(ng)
    npc = [max(x, 1) for x in np_]  # util.py: Np[Np == 0] = 1
    cp = 100 * sum(nc[j] / npc[j] for j in range(c)) / c
    with_pos = [j for j in range(c) if ng[j] > 0]
    cr = 100 * sum(nc[j] / ng[j] for j in with_pos) / len(with_pos) if with_pos else None
    op = 100 * sum(nc) / sum(npc)
    o_r = 100 * sum(nc) / sum(ng) if sum(ng) else None
    return _six(cp, cr, _hm(cp, cr), op, o_r, _hm(op, o_r))


def _asl_by_loops(ng, np_, nc):
    c = len(ng)
    p = [nc[j] / np_[j] if nc[j] > 0 else 0.0 for j in range(c)]
    r = [nc[j] / ng[j] if nc[j] > 0 else 0.0 for j in range(c)]
    f = [2 * p[j] * r[j] / (p[j] + r[j]) if nc[j] > 0 else 0.0 for j in range(c)]
    op = 100 * sum(nc) / sum(np_) if sum(np_) else None
    o_r = 100 * sum(nc) / sum(ng) if sum(ng) else None
    return _six(100 * sum(p) / c, 100 * sum(r) / c, 100 * sum(f) / c, op, o_r, _hm(op, o_r))


def _sigmoid(m):
    return 1.0 / (1.0 + math.exp(-m))


def _metrics_by_loops(margins, targets, t, k):
    top = [sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in margins]  # ties: lower index
    at_least = lambda i, j: _sigmoid(margins[i][j]) >= t
    return {"mlgcn": {"at_threshold": _mlgcn_by_loops(*_counts_by_loops(margins, targets, at_least)),
                      "top_k": _mlgcn_by_loops(*_counts_by_loops(
                          margins, targets, lambda i, j: j in top[i] and at_least(i, j)))},
            "asl": {"at_threshold": _asl_by_loops(*_counts_by_loops(
                margins, targets, lambda i, j: _sigmoid(margins[i][j]) > t))}}


# ---- hand-made cases ----

def test_threshold_metrics_margin_threshold_and_bad_threshold():
    assert margin_threshold(0.5) == 0.0  # exact: a margin of 0 is a tie at t = 0.5
    assert margin_threshold(0.8) == pytest.approx(math.log(4.0))
    for bad in (0, 1, 1.5, -0.2, float("nan")):
        with pytest.raises(ValueError, match=str(bad)):
            threshold_metrics(np.zeros((2, 3)), np.zeros((2, 3)), threshold=bad)


def test_threshold_metrics_shape_and_top_k_errors():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        threshold_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        threshold_metrics(np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):  # the AP's message is unchanged
        average_precision(np.zeros((2, 3)), np.zeros((3, 2)))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="top_k"):
            threshold_metrics(np.zeros((2, 3)), np.zeros((2, 3)), top_k=bad)


def test_threshold_metrics_margin_exactly_at_threshold_is_predicted_by_mlgcn_not_by_asl():
    margins = [[0.0, 2.0], [-1.0, 0.0]]
    targets = [[1, 1], [0, 1]]
    m = threshold_metrics(margins, targets)
    # ML-GCN (>= 0): predicted (0,0), (0,1), (1,1): class 0 Ng=Np=Nc=1, class 1 Ng=Np=Nc=2 -> all 100
    assert m["mlgcn"]["at_threshold"] == _approx_none(_six(100, 100, 100, 100, 100, 100))
    # ASL (> 0): only (0,1). Class 0: P=R=F1=0; class 1: P=1/1, R=1/2, F1=2/3.
    # OP=1/1, OR=1/3, OF1=2·1·(1/3)/(4/3)
    assert m["asl"]["at_threshold"] == _approx_none(_six(50, 25, 100 / 3, 100, 100 / 3, 50))


def test_threshold_metrics_class_with_no_positive():
    margins = [[1.0, 1.0], [-1.0, -1.0]]
    targets = [[1, 0], [0, 0]]  # class 1 has no positive but is predicted once
    m = threshold_metrics(margins, targets)
    # ML-GCN: class 0 Ng=Np=Nc=1; class 1 Ng=0, Np=1, Nc=0: CP=(1+0)/2, CR over class 0 only = 1,
    # CF1 = 2·50·100/150; OP = 1/2, OR = 1/1
    assert m["mlgcn"]["at_threshold"] == _approx_none(_six(50, 100, 200 / 3, 50, 100, 200 / 3))
    # ASL: class 1 counts as P=R=F1=0 in all three means
    assert m["asl"]["at_threshold"] == _approx_none(_six(50, 50, 50, 50, 100, 200 / 3))


def test_threshold_metrics_no_class_has_a_positive_gives_none_not_nan():
    m = threshold_metrics([[1.0, -1.0]], [[0, 0]])
    assert m["mlgcn"]["at_threshold"] == _approx_none(_six(0, None, None, 0, None, None))
    assert m["asl"]["at_threshold"] == _approx_none(_six(0, 0, 0, 0, None, None))
    json.dumps(m, allow_nan=False)  # raises on NaN / inf


def test_threshold_metrics_class_never_predicted():
    margins = [[1.0, -1.0], [1.0, -1.0]]
    targets = [[1, 1], [0, 0]]
    m = threshold_metrics(margins, targets)
    # class 0: Ng=1, Np=2, Nc=1; class 1: Ng=1, Np=0 (ML-GCN takes 1), Nc=0
    # ML-GCN: CP=(1/2+0)/2=25, CR=(1+0)/2=50, CF1=2·25·50/75; OP=1/(2+1) (the clamped Np is summed), OR=1/2
    assert m["mlgcn"]["at_threshold"] == _approx_none(_six(25, 50, 100 / 3, 100 / 3, 50, 40))
    # ASL: OP = 1/2 (no clamp); class F1s 2/3 and 0 -> CF1 = 1/3
    assert m["asl"]["at_threshold"] == _approx_none(_six(25, 50, 100 / 3, 50, 50, 50))


def test_threshold_metrics_unknown_labels_are_left_out():
    margins = [[1.0, 1.0], [1.0, -1.0]]
    targets = [[1, -1], [-1, 1]]
    m = threshold_metrics(margins, targets)
    # known entries only: (0,0) positive predicted; (1,1) positive not predicted
    # class 0 Ng=Np=Nc=1; class 1 Ng=1, Np=0, Nc=0
    assert m["mlgcn"]["at_threshold"] == _approx_none(_six(50, 50, 50, 50, 50, 50))
    assert m["asl"]["at_threshold"] == _approx_none(_six(50, 50, 50, 100, 50, 200 / 3))
    # the margins at unknown entries change nothing at the threshold
    flipped = threshold_metrics([[1.0, -5.0], [-5.0, -1.0]], targets)
    assert flipped["mlgcn"]["at_threshold"] == m["mlgcn"]["at_threshold"]
    assert flipped["asl"]["at_threshold"] == m["asl"]["at_threshold"]


def test_threshold_metrics_unknown_classes_take_part_in_the_top_k_ranking():
    targets = [[-1, 1, 0]]
    right = threshold_metrics([[5.0, 3.0, 2.0]], targets, top_k=2)  # top-2 = {0, 1}: class 1 is found
    # class 1 Ng=Np=Nc=1; classes 0 and 2 Np 0->1: CP=1/3, CR=1 (only class 1 has a positive), OP=1/3, OR=1
    assert right["mlgcn"]["top_k"] == _approx_none(_six(100 / 3, 100, 50, 100 / 3, 100, 50))
    pushed = threshold_metrics([[5.0, 1.0, 2.0]], targets, top_k=2)  # top-2 = {0, 2}: class 1 pushed out
    # (ranked over known classes only, the top 2 would be {2, 1} and class 1 found). Class 2 Np=1, Nc=0
    assert pushed["mlgcn"]["top_k"] == _approx_none(_six(0, 0, 0, 0, 0, 0))
    assert pushed["mlgcn"]["at_threshold"]["CR"] == 100.0  # class 1 is over the threshold


def test_threshold_metrics_top3_ties_go_to_the_lower_class_index():
    assert top_k_mask(torch.tensor([[2.0, 1.0, 1.0, 1.0, -1.0]]), 3).tolist() == \
        [[True, True, True, False, False]]
    m = threshold_metrics([[2.0, 1.0, 1.0, 1.0, -1.0]], [[1, 0, 1, 1, 0]], top_k=3)
    # top-3 = classes 0, 1, 2 (class 3 loses the tie at 1.0 to 1 and 2); all three >= 0.
    # c0 Ng1 Np1 Nc1; c1 Ng0 Np1 Nc0; c2 Ng1 Np1 Nc1; c3 Ng1 Np0->1 Nc0; c4 Ng0 Np0->1 Nc0
    # CP = 2/5, CR over c0, c2, c3 = 2/3, CF1 = 2·40·(200/3)/(40+200/3) = 50; OP = 2/5, OR = 2/3
    assert m["mlgcn"]["top_k"] == _approx_none(_six(40, 200 / 3, 50, 40, 200 / 3, 50))
    # at the threshold alone, class 3 is predicted too: c3 Np=Nc=1
    assert m["mlgcn"]["at_threshold"] == _approx_none(_six(60, 100, 75, 60, 100, 75))


def test_threshold_metrics_top_k_also_needs_the_threshold():
    margins = [[0.5, 3.0, 1.0, -0.1],  # top-2 = {1, 2}; class 0 is over the threshold but not in the top 2
               [-0.5, -1.0, -2.0, -3.0]]  # top-2 = {0, 1}, both under the threshold: nothing predicted
    targets = [[1, 0, 1, 0], [1, 0, 0, 0]]
    m = threshold_metrics(margins, targets, top_k=2)
    # c0 Ng2 Np0->1 Nc0; c1 Ng0 Np1 Nc0; c2 Ng1 Np1 Nc1; c3 Ng0 Np0->1 Nc0
    # CP = 1/4, CR over c0, c2 = (0 + 1)/2, CF1 = 2·25·50/75;
    # OP = 1/4, OR = 1/3, OF1 = 2·25·(100/3)/(25+100/3)
    assert m["mlgcn"]["top_k"] == _approx_none(_six(25, 50, 100 / 3, 25, 100 / 3, 200 / 7))
    assert m["top_k"] == 2 and m["threshold"] == 0.5


def test_threshold_metrics_the_two_cf1_conventions_differ_by_far():
    # class 0: 10 positives, 1 predicted (right): P = 1, R = 0.1.
    # class 1: 1 positive, 10 predicted: P = 0.1, R = 1
    margins = [[1.0 if i == 0 else -1.0, 1.0] for i in range(10)]
    targets = [[1, 1 if i == 0 else 0] for i in range(10)]
    m = threshold_metrics(margins, targets)
    # ML-GCN: CP = CR = (1 + 0.1)/2 = 55 -> CF1 = 55. ASL: each class's F1 = 2·1·0.1/1.1 -> CF1 = 200/11
    assert m["mlgcn"]["at_threshold"] == _approx_none(_six(55, 55, 55, 200 / 11, 200 / 11, 200 / 11))
    assert m["asl"]["at_threshold"] == _approx_none(_six(55, 55, 200 / 11, 200 / 11, 200 / 11, 200 / 11))
    assert m["mlgcn"]["at_threshold"]["CF1"] - m["asl"]["at_threshold"]["CF1"] > 30


def test_threshold_metrics_other_threshold_is_applied_in_the_margin_domain():
    t = 0.8  # logit = log 4 ≈ 1.386
    margins = [[1.0, 2.0], [math.log(4.0) + 1e-9, 1.3]]
    targets = [[1, 1], [1, 0]]
    m = threshold_metrics(margins, targets, threshold=t)
    # predicted (p > 0.8 and p >= 0.8 agree here): (0,1) and (1,0). c0 Ng2 Np1 Nc1; c1 Ng1 Np1 Nc1
    expected = _six(100, 75, _hm(100, 75), 100, 200 / 3, 80)
    assert m["mlgcn"]["at_threshold"] == _approx_none(expected)
    assert m["asl"]["at_threshold"] == _approx_none(_six(100, 75, 100 * (2 / 3 + 1) / 2, 100, 200 / 3, 80))


def test_threshold_metrics_matches_the_loop_reference_on_random_data_with_ties_and_unknowns():
    rng = random.Random(0)
    for trial in range(30):
        n, c = rng.randint(1, 12), rng.randint(1, 7)
        margins = [[rng.choice([-1.0, -0.5, 0.0, 0.0, 0.5, 1.0, 2.0]) for _ in range(c)] for _ in range(n)]
        targets = [[rng.choice([-1, 0, 0, 1]) for _ in range(c)] for _ in range(n)]
        t, k = rng.choice([0.5, 0.3, 0.7]), rng.randint(1, 4)
        got = threshold_metrics(np.array(margins), np.array(targets), threshold=t, top_k=k)
        want = _metrics_by_loops(margins, targets, t, k)
        for convention, parts in want.items():
            for part, values in parts.items():
                assert got[convention][part] == _approx_none(values), (trial, convention, part)


def test_threshold_metrics_tensors_and_arrays_agree_and_output_is_json():
    rng = np.random.default_rng(1)
    margins = rng.normal(size=(20, 5)).astype(np.float32)
    targets = rng.integers(-1, 2, size=(20, 5))
    a = threshold_metrics(margins, targets)
    b = threshold_metrics(torch.from_numpy(margins), torch.from_numpy(targets))
    assert a == b
    assert all(isinstance(v, float) for v in a["asl"]["at_threshold"].values())
    json.dumps(a, allow_nan=False)


def test_threshold_metrics_format_metrics_names_both_conventions():
    m = threshold_metrics([[1.0, -1.0]], [[0, 0]])
    text = format_metrics(m)
    assert "ML-GCN (score >= 0.5, CF1 = harmonic mean of CP and CR)" in text
    assert "ASL (score > 0.5, CF1 = mean of per-class F1)" in text
    assert "top-3" in text and "—" in text  # None shows as a dash
    assert all(name in text.splitlines()[0] for name in METRIC_NAMES_)


# ===========================================================================================================
# 2. the vendored CLIP: OpenAI's checkpoint formats, features by hand, RN101's keys, tokenizer, downloads
# Parity of every CLIP component against plain-torch references written from the model's own weights; loading
# (TorchScript fp16, state dicts), the BPE tokenizer's published ids, and downloads from a local HTTP server.
# ===========================================================================================================

CLIP_DIR = os.path.dirname(os.path.abspath(clip.__file__))
VOCAB_FILE = os.path.join(CLIP_DIR, "bpe_simple_vocab_16e6.txt.gz")


SOT, EOT = 49406, 49407


# the CLIP section's miniature: layer1 has a second block (without shortcut conv), 2 text layers, 4
# attention-pool heads on a 2x2 grid at 64 px, every weight random
TINY = {"embed_dim": 64, "vision_layers": (2, 1, 1, 1), "text_layers": 2, "random_norms": True}


def _to_fp16_like_openai(model):
    """In place, what openai/CLIP's `convert_weights` does: conv/linear/attention weights and
    text_projection to fp16, everything else (norms, embeddings, logit_scale) left in fp32."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
        if isinstance(m, nn.MultiheadAttention):
            m.in_proj_weight.data = m.in_proj_weight.data.half()
            m.in_proj_bias.data = m.in_proj_bias.data.half()
    model.text_projection.data = model.text_projection.data.half()
    return model


class _TorchScriptCLIP(nn.Module):
    """Holds a CLIP's modules and parameters under OpenAI's key names, plus the three int buffers that
    OpenAI's archives carry; traced with a trivial forward, since only the state dict matters here."""

    def __init__(self, model):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.register_buffer("input_resolution", torch.tensor(model.visual.input_resolution))
        self.register_buffer("context_length", torch.tensor(model.context_length))
        self.register_buffer("vocab_size", torch.tensor(model.vocab_size))

    def forward(self, x):
        return x * self.logit_scale.exp()


def _save_torchscript(model, path, precision):
    """Saves `model` as OpenAI does: a TorchScript archive with fp16 weights ("openai": as their
    convert_weights; "half": every floating tensor in fp16). Returns the model those weights define."""
    half = copy.deepcopy(model)
    half = _to_fp16_like_openai(half) if precision == "openai" else half.half()
    wrapper = _TorchScriptCLIP(half)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, torch.ones(2, dtype=half.logit_scale.dtype))
    torch.jit.save(traced, str(path))
    return half.float().eval()  # the in-memory model after rounding its weights to fp16 and back


def _inputs(seed=1, size=64):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, size, size, generator=g)
    text = tokenize(["a photo of a cat", "a diagram"])
    return images, text


def _outputs(model, images, text):
    with torch.no_grad():
        return model.encode_image(images), model.encode_dense(images), model.encode_text(text)


def _assert_identical(got, want):
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        assert torch.equal(g, w), (g - w).abs().max()


@pytest.fixture(scope="module")
def tiny():
    return _clip(**TINY)


@pytest.fixture(scope="module")
def checkpoints(tiny, tmp_path_factory):
    """The miniature CLIP saved as an OpenAI TorchScript archive and as a plain state dict."""
    folder = tmp_path_factory.mktemp("checkpoints")
    archive = folder / "tiny_jit.pt"
    rounded = _save_torchscript(tiny, archive, "openai")
    plain = folder / "tiny_state_dict.pt"
    _save_clip(plain, tiny)
    return {"archive": archive, "rounded": rounded, "plain": plain}


# --- hand-written references, computed from the model's modules/weights with plain torch ops

def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def _bottleneck(x, block, stride, first):
    """openai/CLIP's Bottleneck with plain ops: 1x1, 3x3, (avg pool if strided), 1x1; the shortcut of a
    stage's first block is avg pool, 1x1 conv, BN (keys downsample.0 / downsample.1)."""
    out = F.relu(_bn(F.conv2d(x, block.conv1.weight), block.bn1))
    out = F.relu(_bn(F.conv2d(out, block.conv2.weight, padding=1), block.bn2))
    if stride > 1:
        out = F.avg_pool2d(out, stride)
    out = _bn(F.conv2d(out, block.conv3.weight), block.bn3)
    assert (block.downsample is not None) == first
    identity = x
    if first:
        shortcut = dict(block.downsample.named_children())
        identity = F.avg_pool2d(x, stride) if stride > 1 else x
        identity = _bn(F.conv2d(identity, shortcut["0"].weight), shortcut["1"])
    return F.relu(out + identity)


def _layer4_map(visual, images):
    """(B, 3, S, S) -> (B, 32*width, S/32, S/32) with plain ops on the model's weights: the 3-conv stem
    (3x3 convs, the first with stride 2), a 2x2 average pool, then stages of strides 1, 2, 2, 2."""
    x = F.relu(_bn(F.conv2d(images, visual.conv1.weight, stride=2, padding=1), visual.bn1))
    x = F.relu(_bn(F.conv2d(x, visual.conv2.weight, padding=1), visual.bn2))
    x = F.relu(_bn(F.conv2d(x, visual.conv3.weight, padding=1), visual.bn3))
    x = F.avg_pool2d(x, 2)
    for stage, stride in ((visual.layer1, 1), (visual.layer2, 2), (visual.layer3, 2), (visual.layer4, 2)):
        for i, block in enumerate(stage):
            x = _bottleneck(x, block, stride if i == 0 else 1, first=i == 0)
    return x


def _positions(pool, h, w):
    """The attention pool's positional embedding for an h x w grid: the trained grid resized bicubically."""
    pos = pool.positional_embedding
    side = int(math.isqrt(pos.shape[0] - 1))
    if (h, w) == (side, side):
        return pos
    c = pos.shape[1]
    grid = pos[1:].reshape(side, side, c).permute(2, 0, 1).unsqueeze(0)  # (1, C, side, side)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid[0].reshape(c, h * w).t()], dim=0)  # (1+hw, C)


def _attention_pool_openai(pool, fmap):
    """openai/CLIP's AttentionPool2d.forward, verbatim in substance: sequence-first multi-head attention."""
    x = fmap.flatten(start_dim=2).permute(2, 0, 1)  # (HW, B, C)
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :]
    out, _ = F.multi_head_attention_forward(
        query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
    return out[0]


def _attention_pool_manual(pool, fmap):
    """The same with an explicit softmax: the mean token queries every token, per head (any grid size)."""
    b, c, h, w = fmap.shape
    heads, d = pool.num_heads, c // pool.num_heads
    x = fmap.reshape(b, c, h * w).transpose(1, 2)
    x = torch.cat([x.mean(1, keepdim=True), x], 1) + _positions(pool, h, w)  # (B, L, C)
    q = F.linear(x[:, 0], pool.q_proj.weight, pool.q_proj.bias).reshape(b, heads, 1, d)
    k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias).reshape(b, -1, heads, d).transpose(1, 2)
    v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias).reshape(b, -1, heads, d).transpose(1, 2)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, heads, 1, L)
    out = (attn @ v).reshape(b, c)
    return F.linear(out, pool.c_proj.weight, pool.c_proj.bias)


def _text_manual(model, text):
    """The text tower by hand: embeddings, pre-LN causal blocks with QuickGELU, ln_final, EOT, projection."""
    b, t = text.shape
    x = model.token_embedding.weight[text] + model.positional_embedding[:t]
    width = x.shape[-1]
    mask = torch.full((t, t), float("-inf")).triu(1)
    for block in model.transformer.resblocks:
        heads = block.attn.num_heads
        d = width // heads
        h = F.layer_norm(x, (width,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
        q, k, v = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(b, t, heads, d).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1) @ v
        a = a.transpose(1, 2).reshape(b, t, width)
        x = x + F.linear(a, block.attn.out_proj.weight, block.attn.out_proj.bias)
        h = F.layer_norm(x, (width,), block.ln_2.weight, block.ln_2.bias, block.ln_2.eps)
        h = F.linear(h, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
        h = h * torch.sigmoid(1.702 * h)
        x = x + F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    x = F.layer_norm(x, (width,), model.ln_final.weight, model.ln_final.bias, model.ln_final.eps)
    eot = (text == EOT).int().argmax(dim=1)  # the first EOT of each row
    return x[torch.arange(b), eot] @ model.text_projection


# --- checkpoints in OpenAI's formats

@pytest.mark.parametrize("precision", ["openai", "half"])
def test_load_torchscript_fp16_archive(tiny, tmp_path, precision):
    path = tmp_path / "tiny.pt"
    rounded = _save_torchscript(tiny, path, precision)
    state_dict = clip.read_state_dict(str(path))
    assert state_dict["visual.conv1.weight"].dtype == torch.float16
    assert state_dict["transformer.resblocks.0.attn.in_proj_weight"].dtype == torch.float16
    assert state_dict["text_projection"].dtype == torch.float16
    assert int(state_dict["input_resolution"]) == 64
    assert int(state_dict["context_length"]) == 77
    assert int(state_dict["vocab_size"]) == 49408

    model, preprocess = clip.load(str(path))
    assert model.sha256 == _sha256(path)
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    # the fp16 weights, widened back, are exactly the in-memory model's weights rounded to fp16
    assert not torch.equal(rounded.visual.conv1.weight, tiny.visual.conv1.weight)
    assert torch.equal(model.visual.conv1.weight, tiny.visual.conv1.weight.half().float())
    images, text = _inputs()
    _assert_identical(_outputs(model, images, text), _outputs(rounded, images, text))


def test_load_returns_openais_preprocess(tiny, tmp_path):
    """`model, preprocess = clip.load(...)` as in openai/CLIP: preprocess resizes the short side to the
    model's input side (bicubic), centre-crops, and normalises by CLIP's statistics; here redone by hand with
    PIL."""
    _save_clip(tmp_path / "tiny.pth", tiny)
    model, preprocess = clip.load(str(tmp_path / "tiny.pth"))
    # 100 x 60
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (60, 100, 3), dtype=np.uint8))
    # 64: the short side 60 -> 64, the long one 100 -> int(64 * 100 / 60)
    side = model.visual.input_resolution
    resized = image.resize((int(side * 100 / 60), side), Image.BICUBIC)
    left = round((resized.width - side) / 2)
    crop = np.asarray(resized.crop((left, 0, left + side, side)), dtype=np.float32) / 255  # (S, S, 3)
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    expected = torch.from_numpy(((crop - mean) / std).transpose(2, 0, 1)).float()
    assert torch.allclose(preprocess(image), expected, atol=1e-6)
    assert preprocess(image.convert("L")).shape == (3, side, side)  # grey images become RGB


@pytest.mark.parametrize("wrapped", [False, True])
def test_load_plain_state_dict(tiny, tmp_path, wrapped):
    path = tmp_path / "tiny.pth"
    _save_clip(path, tiny, "wrapped" if wrapped else "state dict")
    model, _ = clip.load(str(path))
    assert model.sha256 == _sha256(path)
    assert all(not p.requires_grad for p in model.parameters())
    images, text = _inputs()
    _assert_identical(_outputs(model, images, text), _outputs(tiny, images, text))
    assert torch.equal(model.logit_scale, tiny.logit_scale)


def test_clip_build_model_infers_the_architecture(checkpoints):
    state_dict = clip.read_state_dict(str(checkpoints["archive"]))
    model = build_model(state_dict)
    ref = checkpoints["rounded"]
    assert model.visual.input_resolution == 64
    assert model.context_length == 77 and model.vocab_size == 49408
    assert model.embed_dim == 64
    assert [len(s) for s in (model.visual.layer1, model.visual.layer2, model.visual.layer3,
                             model.visual.layer4)] == [2, 1, 1, 1]
    assert model.visual.attnpool.num_heads == 8 * 32 // 64
    assert model.transformer.resblocks[0].attn.num_heads == 1
    assert len(model.transformer.resblocks) == 2
    got = model.state_dict()
    assert set(got) == set(ref.state_dict())  # the 3 extra keys are dropped
    for key, value in ref.state_dict().items():
        assert torch.equal(got[key], value), key


# --- the full RN101 (and RN50's parameter count)

def _rn(layers, embed_dim, width=64, resolution=224, text_width=512):
    return CLIP(embed_dim=embed_dim, image_resolution=resolution, vision_layers=layers, vision_width=width,
                context_length=77, vocab_size=49408, transformer_width=text_width,
                transformer_heads=text_width // 64, transformer_layers=12)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_clip_parameter_counts_match_openai():
    with torch.device("meta"):  # shapes only, no memory
        rn50 = _rn([3, 4, 6, 3], 1024)
        rn101 = _rn([3, 4, 23, 3], 512)
    # OpenAI's "Interacting with CLIP" notebook prints "Model parameters: 102,007,137" for RN50
    assert _count(rn50) == 102_007_137
    # open_clip docs/model_profile.csv: RN101 119.69M parameters in all, 56.26M in the image tower
    assert round(_count(rn101) / 1e6, 2) == 119.69
    assert round(_count(rn101.visual) / 1e6, 2) == 56.26


def _openai_rn101_shapes():
    """OpenAI's RN101.pt as data: every key of its state dict with its shape, written out from openai/CLIP's
    clip/model.py (ModifiedResNet(layers=(3, 4, 23, 3), width=64, input_resolution=224, heads=32,
    output_dim=512): 3-conv stem, Bottlenecks conv1/bn1 1x1, conv2/bn2 3x3, conv3/bn3 1x1 to 4x planes, the
    first block of each stage with downsample.0 (1x1 conv) / downsample.1 (BN) after a weightless AvgPool
    "-1"; AttentionPool2d with a (7*7 + 1, 2048) positional embedding, q/k/v_proj 2048 -> 2048, c_proj 2048 ->
    512; text Transformer of width 512, 12 ResidualAttentionBlocks (nn.MultiheadAttention in_proj/out_proj,
    ln_1, mlp.c_fc 512 -> 2048, mlp.c_proj, ln_2), ln_final, context 77, vocab 49408; and the TorchScript
    archive's three int entries). Written from that file, not read off clipmlr's modules."""
    shapes = {"positional_embedding": (77, 512), "text_projection": (512, 512), "logit_scale": (),
              "input_resolution": (), "context_length": (), "vocab_size": (),
              "visual.conv1.weight": (32, 3, 3, 3), "visual.conv2.weight": (32, 32, 3, 3),
              "visual.conv3.weight": (64, 32, 3, 3), "visual.attnpool.positional_embedding": (50, 2048),
              "token_embedding.weight": (49408, 512), "ln_final.weight": (512,), "ln_final.bias": (512,)}

    def bn(prefix, n):
        shapes.update({f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")})
        shapes[f"{prefix}.num_batches_tracked"] = ()

    def linear(prefix, n_out, n_in):
        shapes.update({f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)})

    bn("visual.bn1", 32), bn("visual.bn2", 32), bn("visual.bn3", 64)
    # (stage, blocks, planes, channels into its first block); every block puts out 4 * planes channels
    for stage, blocks, planes, first_in in ((1, 3, 64, 64), (2, 4, 128, 256), (3, 23, 256, 512),
                                            (4, 3, 512, 1024)):
        for i in range(blocks):
            block, n_in = f"visual.layer{stage}.{i}", first_in if i == 0 else 4 * planes
            shapes[f"{block}.conv1.weight"] = (planes, n_in, 1, 1)
            shapes[f"{block}.conv2.weight"] = (planes, planes, 3, 3)
            shapes[f"{block}.conv3.weight"] = (4 * planes, planes, 1, 1)
            bn(f"{block}.bn1", planes), bn(f"{block}.bn2", planes), bn(f"{block}.bn3", 4 * planes)
            if i == 0:
                shapes[f"{block}.downsample.0.weight"] = (4 * planes, n_in, 1, 1)
                bn(f"{block}.downsample.1", 4 * planes)
    for name in ("q_proj", "k_proj", "v_proj"):
        linear(f"visual.attnpool.{name}", 2048, 2048)
    linear("visual.attnpool.c_proj", 512, 2048)
    for i in range(12):
        block = f"transformer.resblocks.{i}"
        shapes.update({f"{block}.attn.in_proj_weight": (3 * 512, 512),
                       f"{block}.attn.in_proj_bias": (3 * 512,)})
        linear(f"{block}.attn.out_proj", 512, 512)
        linear(f"{block}.mlp.c_fc", 2048, 512)
        linear(f"{block}.mlp.c_proj", 512, 2048)
        shapes.update({f"{block}.{ln}.{k}": (512,) for ln in ("ln_1", "ln_2") for k in ("weight", "bias")})
    return shapes


def _openai_like_state_dict(shapes, seed=0):
    """Small random values in the dtypes OpenAI ships (their convert_weights: conv / linear / attention
    weights and biases and text_projection in fp16, norms, embeddings and logit_scale in fp32; int counters
    and sizes)."""
    g = torch.Generator().manual_seed(seed)
    ints = {"input_resolution": 224, "context_length": 77, "vocab_size": 49408}
    fp16 = re.compile(r"(conv\d|downsample\.0|_proj|c_fc|in_proj_weight|in_proj_bias)\b|^text_projection$")
    state_dict = {}
    for key, shape in shapes.items():
        if key in ints:
            state_dict[key] = torch.tensor(ints[key])
        elif key.endswith("num_batches_tracked"):
            state_dict[key] = torch.tensor(0)
        elif key.endswith(("running_var", "bn1.weight", "bn2.weight", "bn3.weight", "downsample.1.weight",
                           "ln_1.weight", "ln_2.weight", "ln_final.weight")):
            state_dict[key] = torch.empty(shape).uniform_(0.5, 1.5, generator=g)
        else:
            value = torch.empty(shape).normal_(0, 0.02, generator=g)
            state_dict[key] = value.half() if fp16.search(key) else value
    return state_dict


@pytest.mark.slow
def test_clip_loads_openais_rn101_keys_and_shapes():
    shapes = _openai_rn101_shapes()
    # the table against published counts (open_clip docs/model_profile.csv: RN101 119.69M, image tower 56.26M)
    learned = {k: math.prod(s) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var",
               "num_batches_tracked")) and k not in ("input_resolution", "context_length", "vocab_size")}
    assert round(sum(learned.values()) / 1e6, 2) == 119.69
    assert round(sum(n for k, n in learned.items() if k.startswith("visual.")) / 1e6, 2) == 56.26
    state_dict = _openai_like_state_dict(shapes)
    assert state_dict["visual.layer3.22.conv2.weight"].dtype == torch.float16
    assert state_dict["visual.layer3.22.bn2.running_var"].dtype == torch.float32

    model = build_model(state_dict)  # loads strictly: a missing, extra or misshapen key raises
    assert [len(s) for s in (model.visual.layer1, model.visual.layer2, model.visual.layer3,
                             model.visual.layer4)] == [3, 4, 23, 3]
    assert model.visual.conv3.out_channels == 64 and model.visual.input_resolution == 224
    assert model.visual.attnpool.num_heads == 32
    assert model.embed_dim == 512 and model.context_length == 77 and model.vocab_size == 49408
    assert model.transformer.resblocks[0].attn.num_heads == 8 and len(model.transformer.resblocks) == 12
    got = model.state_dict()
    dropped = {"input_resolution", "context_length", "vocab_size"}
    assert {k: tuple(v.shape) for k, v in got.items()} == \
        {k: s for k, s in shapes.items() if k not in dropped}
    for key, value in got.items():  # every tensor under its own name, widened to fp32
        want = state_dict[key].float() if state_dict[key].is_floating_point() else state_dict[key]
        assert value.dtype == want.dtype and torch.equal(value, want), key

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        image224 = torch.randn(1, 3, 224, 224, generator=g)
        image448 = torch.randn(1, 3, 448, 448, generator=g)
        assert model.encode_image(image224).shape == (1, 512)
        assert model.encode_dense(image224).shape == (1, 1 + 7 * 7, 512)
        dense448 = model.encode_dense(image448)
        assert dense448.shape == (1, 1 + 14 * 14, 512)
        assert torch.isfinite(dense448).all()
        assert model.encode_text(tokenize("a photo of a cat")).shape == (1, 512)


# --- image and text features against hand computations

@pytest.mark.parametrize("size", [(64, 64), (128, 128), (96, 96), (64, 128)])
def test_clip_encode_dense_matches_direct_computation(tiny, size):
    visual, pool = tiny.visual, tiny.visual.attnpool
    images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = tiny.encode_dense(images)
        fmap = _layer4_map(visual, images)  # (B, 256, h, w)
        b, c, h, w = fmap.shape
        assert (h, w) == (size[0] // 32, size[1] // 32)
        assert dense.shape == (b, 1 + h * w, 64)
        pos = _positions(pool, h, w)

        def project(x):
            return F.linear(F.linear(x, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight,
                            pool.c_proj.bias)

        torch.testing.assert_close(dense[:, 0], project(fmap.mean(dim=(2, 3)) + pos[0]), rtol=1e-5, atol=1e-5)
        for i in range(h):
            for j in range(w):
                want = project(fmap[:, :, i, j] + pos[1 + i * w + j])
                torch.testing.assert_close(dense[:, 1 + i * w + j], want, rtol=1e-5, atol=1e-5)


def test_in_place_encoder_is_bit_identical_and_differentiable(tiny):
    """The trunk's in-place ReLUs and residual sums give the very bits of the same modules run out of place,
    and gradients still flow through them (BatchNorm's backward needs its input, not its output)."""
    visual = copy.deepcopy(tiny.visual).train()  # training-mode BatchNorm: its backward is the demanding one

    def out_of_place(x):
        x = F.relu(visual.bn1(visual.conv1(x)))
        x = F.relu(visual.bn2(visual.conv2(x)))
        x = visual.avgpool(F.relu(visual.bn3(visual.conv3(x))))
        for stage in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            for b in stage:
                out = F.relu(b.bn1(b.conv1(x)))
                out = F.relu(b.bn2(b.conv2(out)))
                out = b.bn3(b.conv3(b.avgpool(out)))
                x = F.relu(out + (x if b.downsample is None else b.downsample(x)))
        return x

    images, _ = _inputs(size=64)
    for m in visual.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0  # the running statistics stay put, so both passes see the same
    grads = []
    for forward in (visual.trunk, out_of_place):
        x = images.clone().requires_grad_()
        y = forward(x)
        y.square().mean().backward()
        grads.append((y.detach(), x.grad))
    assert torch.equal(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-6, atol=1e-9)


def test_clip_encode_dense_grid_of_one(tiny):
    """At 32 px the grid is 1x1. Bicubic (a = -0.75, align_corners=False) from 2x2 to 1x1 samples the centre:
    taps at -1.5, -0.5, 0.5, 1.5 weigh -0.09375, 0.59375, 0.59375, -0.09375 and the border is replicated,
    so each of the 2x2 positions gets weight 1/2 * 1/2: the single position is the mean of the four."""
    pool = tiny.visual.attnpool
    images, _ = _inputs(size=32)
    with torch.no_grad():
        dense = tiny.encode_dense(images)
        fmap = _layer4_map(tiny.visual, images)[:, :, 0, 0]  # (B, 256)

        def project(x):
            return F.linear(F.linear(x, pool.v_proj.weight, pool.v_proj.bias), pool.c_proj.weight,
                            pool.c_proj.bias)

        want_mean = project(fmap + pool.positional_embedding[0])
        want_cell = project(fmap + pool.positional_embedding[1:].mean(0))
    assert dense.shape == (2, 2, 64)
    torch.testing.assert_close(dense[:, 0], want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dense[:, 1], want_cell, rtol=1e-5, atol=1e-5)


def test_clip_encode_image_matches_attention_pool_by_hand(tiny):
    images, _ = _inputs()
    with torch.no_grad():
        got = tiny.encode_image(images)
        fmap = _layer4_map(tiny.visual, images)
        openai = _attention_pool_openai(tiny.visual.attnpool, fmap)
        manual = _attention_pool_manual(tiny.visual.attnpool, fmap)
    assert got.shape == (2, 64)
    torch.testing.assert_close(openai, manual, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, openai, rtol=1e-5, atol=1e-5)


def test_clip_encode_image_larger_input(tiny):
    images, _ = _inputs(size=128)  # a 4x4 grid: the positional embedding is resized
    with torch.no_grad():
        got = tiny.encode_image(images)
        want = _attention_pool_manual(tiny.visual.attnpool, _layer4_map(tiny.visual, images))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads", [1, 2])
def test_clip_encode_text_matches_transformer_by_hand(heads):
    model = _clip(**TINY, seed=3, heads=heads)
    text = tokenize(["a photo of a cat", "a diagram", "a dog on a beach, at sunset"])
    with torch.no_grad():
        want = _text_manual(model, text)
        got = model.encode_text(text)
    assert got.shape == (3, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_clip_encode_text_truncation_is_exact(tiny):
    text = tokenize(["a photo of a cat", "a diagram", "the quick brown fox jumps over the lazy dog " * 3])
    with torch.no_grad():
        short = tiny.encode_text(text, truncate=True)
        full = tiny.encode_text(text, truncate=False)
    torch.testing.assert_close(short, full, rtol=1e-5, atol=1e-5)


def test_clip_forward_logits_by_hand(tiny):
    images, text = _inputs()
    with torch.no_grad():
        per_image, per_text = tiny(images, text)
        img = _attention_pool_manual(tiny.visual.attnpool, _layer4_map(tiny.visual, images))
        txt = _text_manual(tiny, text)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    want = 20.0 * img @ txt.t()  # logit_scale = log 20
    torch.testing.assert_close(per_image, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_text, want.t(), rtol=1e-4, atol=1e-4)


def test_text_encoder_in_float64_matches_float32():
    """The causal mask is built in the model's dtype: a float64 model gives float32's text features."""
    model = _clip()
    ids = tokenize(["a photo of a dog", "not a photo of a cat", "x"])
    with torch.no_grad():
        single = model.encode_text(ids, truncate=False).double()
        double = copy.deepcopy(model).double().encode_text(ids, truncate=False)
    assert double.dtype == torch.float64
    assert ((double - single).abs().max() / single.abs().max()).item() < 1e-5


# --- tokenizer

# ids published for OpenAI's tokenizer (its README / notebooks, the transformers and other ports' tests)
KNOWN_IDS = [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("a diagram", [320, 22697]),
    ("a dog", [320, 1929]),
    ("a cat", [320, 2368]),
    ("a photo of a waterfall", [320, 1125, 539, 320, 16403]),
    ("dog on a beach", [1929, 525, 320, 2117]),
    ("a painting of a cat", [320, 3086, 539, 320, 2368]),
    ("Hello world!", [3306, 1002, 256]),
    ("bozuman", [647, 4091, 786]),
    ("a dog barking outside", [320, 1929, 32676, 2782]),
    ("caf\u00e9", [15304]),
    ("cafe\u0301", [15304]),  # ftfy's NFC normalisation composes the accent
    ("a & amp ; b", [320, 261, 6259, 282, 321]),
    ("", []),
]


@pytest.mark.parametrize("text,ids", KNOWN_IDS)
def test_tokenize_known_ids(text, ids):
    tokens = tokenize(text)
    assert tokens.shape == (1, 77) and tokens.dtype == torch.long
    n = len(ids) + 2
    assert tokens[0, :n].tolist() == [SOT] + ids + [EOT]
    assert not tokens[0, n:].any()


def test_tokenize_ids_follow_the_vocabulary_file():
    with gzip.open(VOCAB_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    assert lines[0].startswith('"bpe_simple_vocab_16e6.txt#version')
    merges = lines[1:48895]
    assert 512 + len(merges) == SOT  # 256 bytes, 256 bytes + "</w>", one symbol per merge, then the specials

    def ids(text):
        row = tokenize(text)[0].tolist()
        return row[1:row.index(EOT)]

    # single printable ASCII characters: byte b is symbol b - 33 ("!" first), + 256 for the "</w>" form
    for ch in "!a0z~":
        assert ids(ch) == [256 + ord(ch) - ord("!")]
    # a whole word is one symbol: the merge (line id - 512 of the merges) that forms "word</w>"
    for word in ["photo", "cat", "dog", "diagram", "hello", "world", "person", "bicycle"]:
        [i] = ids(word)
        assert "".join(merges[i - 512].split()) == word + "</w>", word
    # a word piece not at the end of a word has no "</w>": "bozuman" = "bo" + "zu" + "man</w>"
    pieces = [merges[i - 512].replace(" ", "") for i in ids("bozuman")]
    assert pieces == ["bo", "zu", "man</w>"]


def test_tokenize_cleaning():
    def same(a, b):
        assert torch.equal(tokenize(a), tokenize(b)), (a, b)

    same("a &amp; b", "a & b")  # HTML entities
    same("a &amp;amp; b", "a & b")
    same("a &amp;amp;amp; b", "a & b")  # ftfy unescapes once, then html.unescape twice, as OpenAI's
    same("a &amp;amp;amp;amp; b", "a &amp; b")
    assert tokenize("a &amp; b")[0, :5].tolist() == [SOT, 320, 261, 321, EOT]  # "&</w>" = 256 + 38 - 33
    same("caf\u00c3\u00a9", "caf\u00e9")  # UTF-8 read as Latin-1 (mojibake), repaired by ftfy
    same("doesn\u00e2\u20ac\u2122t", "doesn't")  # mojibake of a curly apostrophe, repaired and uncurled
    same("  A   Photo\n\tOF a CAT  ", "a photo of a cat")  # whitespace collapsed, lower case
    same("A PHOTO OF A CAT", "a photo of a cat")


def test_tokenize_batch_and_padding():
    tokens = tokenize(["a dog", "a photo of a cat"], context_length=10)
    assert tokens.shape == (2, 10) and tokens.dtype == torch.long
    assert tokens.tolist() == [[SOT, 320, 1929, EOT, 0, 0, 0, 0, 0, 0],
                               [SOT, 320, 1125, 539, 320, 2368, EOT, 0, 0, 0]]


def test_tokenize_truncation():
    fits = "cat " * 75  # 75 + 2 = 77 tokens: fits exactly
    row = tokenize(fits)[0]
    assert row[0] == SOT and row[-1] == EOT and (row[1:-1] == 2368).all()

    too_long = "cat " * 76
    with pytest.raises(ValueError, match="cat cat cat"):
        tokenize(too_long)
    with pytest.raises(ValueError, match="cat cat cat"):
        tokenize(["a dog", too_long])
    row = tokenize(too_long, truncate=True)[0]
    assert row.shape == (77,)
    assert row[0] == SOT and row[-1] == EOT and (row[1:-1] == 2368).all()
    rows = tokenize(["a dog", "the " * 200], truncate=True)
    assert rows.shape == (2, 77) and rows[1, -1] == EOT and rows[0, :4].tolist() == [SOT, 320, 1929, EOT]


def test_tokenize_vocabulary_file_is_openais():
    assert os.path.getsize(VOCAB_FILE) == 1_356_917
    assert _sha256(VOCAB_FILE) == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


# --- downloads, against a local HTTP server

def _no_proxy(monkeypatch):
    """Requests to 127.0.0.1 must not go through a proxy from the environment."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.routes[path] = (body, declared Content-Length), then closes the connection."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path not in self.server.routes:
            self.send_error(404)
            return
        body, declared = self.server.routes[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    _no_proxy(monkeypatch)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.routes, srv.requests = {}, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join()


@pytest.fixture
def served(server, checkpoints, monkeypatch):
    """The miniature archive served at /tiny.pt and registered as model "tiny" with its sha256."""
    body = checkpoints["archive"].read_bytes()
    server.routes["/tiny.pt"] = (body, len(body))
    monkeypatch.setitem(MODELS, "tiny", hashlib.sha256(body).hexdigest())
    return server, body, server.url + "/tiny.pt"


def test_download_url_of_openai_models():
    assert {"RN50", "RN101"} <= set(clip.available_models())
    assert MODELS["RN101"] == "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599"
    assert MODELS["RN50"] == "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762"
    assert model_url("RN101") == ("https://openaipublic.azureedge.net/clip/models/"
                                  "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt")


def test_download_and_load_by_name(served, checkpoints, tmp_path):
    server, body, url = served
    root = tmp_path / "weights"
    model, _ = clip.load("tiny", download_root=str(root), url=url)
    assert server.requests == ["/tiny.pt"]
    assert model.sha256 == hashlib.sha256(body).hexdigest()
    assert sorted(os.listdir(root)) == ["tiny.pt"]  # no partial file left beside it
    assert (root / "tiny.pt").read_bytes() == body
    images, text = _inputs()
    _assert_identical(_outputs(model, images, text), _outputs(checkpoints["rounded"], images, text))
    # a verified file is used as it is, without a request
    assert clip.download("tiny", str(root), url=url, progress=False) == os.path.join(str(root), "tiny.pt")
    assert server.requests == ["/tiny.pt"]


def test_download_sha256_mismatch(served, tmp_path, monkeypatch):
    server, body, url = served
    wrong = hashlib.sha256(b"some other file").hexdigest()
    monkeypatch.setitem(MODELS, "tiny", wrong)
    root = tmp_path / "weights"
    with pytest.raises(RuntimeError) as e:
        clip.download("tiny", str(root), url=url, progress=False)
    assert wrong in str(e.value) and url in str(e.value)
    assert server.requests == ["/tiny.pt"]
    assert not (root / "tiny.pt").exists()
    assert not root.exists()  # the folder this download made is removed again: nothing empty left behind


def test_download_truncated_transfer(served, tmp_path):
    server, body, url = served
    server.routes["/tiny.pt"] = (body[: len(body) // 2], len(body))  # promises more than it sends, closes
    root = tmp_path / "weights"
    with pytest.raises(RuntimeError) as e:
        clip.download("tiny", str(root), url=url, progress=False)
    assert url in str(e.value)
    assert server.requests == ["/tiny.pt"]
    assert not (root / "tiny.pt").exists()
    assert not root.exists()  # the folder this download made is removed again: nothing empty left behind


def test_download_server_unreachable(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that was free a moment ago and has nobody listening now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _no_proxy(monkeypatch)
    sha = hashlib.sha256(b"unreachable").hexdigest()
    monkeypatch.setitem(MODELS, "tiny", sha)
    url = f"http://127.0.0.1:{port}/tiny.pt"
    root = tmp_path / "weights"
    with pytest.raises(RuntimeError) as e:
        clip.load("tiny", download_root=str(root), url=url)
    message = str(e.value)
    assert url in message
    assert sha in message
    assert os.path.join(str(root), "tiny.pt") in message  # tmp_path is absolute
    assert not (root / "tiny.pt").exists()


def test_download_reply_that_is_not_http(tmp_path, monkeypatch):
    """Something on the way (a captive portal, a broken proxy) answers with bytes that are not HTTP."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"garbage\r\n\r\n")
        conn.close()

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    _no_proxy(monkeypatch)
    sha = hashlib.sha256(b"garbage").hexdigest()
    monkeypatch.setitem(MODELS, "tiny", sha)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/tiny.pt"
    root = tmp_path / "weights"
    try:
        with pytest.raises(RuntimeError) as e:
            clip.download("tiny", str(root), url=url, progress=False)
    finally:
        thread.join(5)
        listener.close()
    assert url in str(e.value) and sha in str(e.value)
    assert not os.path.exists(root)  # the folder this download made is removed again


def test_download_replaces_corrupt_file(served, tmp_path):
    server, body, url = served
    root = tmp_path / "weights"
    root.mkdir()
    (root / "tiny.pt").write_bytes(body[:1000])  # an earlier download cut short
    path = clip.download("tiny", str(root), url=url, progress=False)
    assert server.requests == ["/tiny.pt"]
    assert path == os.path.join(str(root), "tiny.pt")
    assert (root / "tiny.pt").read_bytes() == body
    assert sorted(os.listdir(root)) == ["tiny.pt"]


# ===========================================================================================================
# 3. run.py end to end: the demo, VOC and COCO trees, the loop, its options and what it prints
# Whole runs through run.main (in-process) whose results are checked against independent computations; the
# loop step by step; the parsed options' defaults and where each comes from.
# ===========================================================================================================

@pytest.mark.parametrize("head", ["baseline", "dual", "positive", "negative"])
def test_run_demo_end_to_end(head, tmp_path):
    out = tmp_path / head
    assert run.main(["--head", head, *DEMO, "--epochs", "20", "--labels", "0.5", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["head"] == head and results["data"] == "demo" and results["labels"] == 0.5
    demo_sha = hashlib.sha256(open(demo_clip_path(), "rb").read()).hexdigest()
    assert results["seed"] == 0 and results["clip"] == {"name": "demo", "sha256": demo_sha}
    assert list(results["per_class_ap"]) == SCENE_CLASSES
    assert len(results["history"]) == 20 and results["history"][-1]["map"] == results["map"]
    saved = torch.load(out / "head.pt")
    # the demo CLIP (D = 64, text width 64), 12 classes, 16 context tokens: DESIGN.md's formulas at that size
    per_class = {"baseline": 2 * (64 + 1), "positive": 16 * 64 + 2 * 64, "negative": 16 * 64 + 2 * 64,
                 "dual": 2 * 16 * 64}
    assert results["trainable_params"] == 12 * per_class[head] == \
        sum(v.numel() for v in saved["state_dict"].values())
    assert (saved["head"], saved["classnames"], saved["n_ctx"], saved["image_size"]) == \
        (head, SCENE_CLASSES, 16, 128)
    assert saved["clip"]["name"] == "demo" and saved["clip"]["identity"] == demo_sha
    assert results["train_seconds"] > 0
    assert results["map"] > _demo_chance(128, 128) + 10, results["map"]
    # the label mask used: the demo's labels masked with the seed, whatever the head
    _, train_y = demo_split(128, 0, 128)
    assert torch.equal(torch.load(out / "mask.pt"), mask_labels(train_y, 0.5, seed=0))


@pytest.mark.parametrize("data", ["voc", "coco"])
def test_run_one_epoch_on_a_tiny_dataset(data, tmp_path):
    root = tmp_path / data
    (_make_voc if data == "voc" else _make_coco)(str(root))
    ckpt = _save_clip(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    # 12 more test images (random colours), so that the test APs rank enough images to show a wrong
    # margin or order
    rng = np.random.default_rng(0)
    pool = ["cat", "dog", "person", "train", "car"] if data == "voc" else ["person", "car", "dog"]
    extra = [sorted({pool[i % len(pool)], *rng.choice(pool, rng.integers(0, 2))}) for i in range(12)]

    def coloured(path):
        _jpeg(str(path), tuple(int(c) for c in rng.integers(0, 256, 3)))

    if data == "voc":  # VOC2007's 20 classes in the usual alphabetical order; test.txt's images in its order
        names = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                 "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                 "train", "tvmonitor"]
        voc = root / "VOCdevkit" / "VOC2007"
        ids = [*VOC_TEST, *(f"{100 + i:06d}" for i in range(12))]
        for i, objects in zip(ids[3:], extra):
            coloured(voc / "JPEGImages" / f"{i}.jpg")
            _voc_xml(str(voc / "Annotations" / f"{i}.xml"), [(o, 0) for o in objects])
        (voc / "ImageSets" / "Main" / "test.txt").write_text("\n".join(ids) + "\n")
        test_paths = [voc / "JPEGImages" / f"{i}.jpg" for i in ids]
        test_labels = np.zeros((15, 20), dtype=np.int64)
        test_labels[0, [11, 14]] = 1  # 000001: dog, person
        test_labels[1, 18] = 1  # 000002: train
        test_labels[2, 7] = 1  # 000004: cat (its car is difficult: absent by default)
    else:  # COCO's categories in id order (1, 3, 18); an image without annotation is dropped
        names, category_ids = ["person", "car", "dog"], {"person": 1, "car": 3, "dog": 18}
        images = [{"id": 300 + i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in range(13)]
        anns = [{"id": 1000 + 10 * i + k, "image_id": 300 + i, "category_id": category_ids[o]}
                for i, objects in enumerate(extra) for k, o in enumerate(objects)]  # image 312: none
        for im in images:
            coloured(root / "val2014" / im["file_name"])
        categories = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
        (root / "annotations" / "instances_val2014.json").write_text(
            json.dumps({"images": images, "annotations": anns, "categories": categories}))
        test_paths = [root / "val2014" / im["file_name"] for im in images[:12]]
        test_labels = np.zeros((12, 3), dtype=np.int64)
    for row, objects in zip(test_labels[-12:], extra):
        row[[names.index(o) for o in objects]] = 1
    known = sorted(set(pool))  # the classes with a positive test label
    assert all(0 < test_labels[:, names.index(c)].sum() < len(test_labels) for c in known)
    for cache in ("--no-cache-features", "--cache-features"):
        argv = ["--head", "positive", "--data", data, "--data-root", str(root), "--clip", ckpt,
                "--image-size", "64",
                "--epochs", "1", "--batch-size", "2", "--workers", "0", "--cache-views", "1", "--out",
                str(out / cache),
                "--cache-dir", str(tmp_path / "cache"), cache]
        assert run.main(argv) == 0
        results = json.loads((out / cache / "results.json").read_text())
        assert results["settings"]["cache_features"] == (cache == "--cache-features")
        assert results["clip"] == {"name": ckpt, "sha256": _sha256(ckpt)}
        assert (results["head"], results["data"], results["labels"]) == ("positive", data, 1.0)
        assert list(results["per_class_ap"]) == names  # the documented order
        # PositiveCoOp: C x 16 context vectors of the text width (64) + a D-dim (32) residual and
        # absence embedding
        assert results["trainable_params"] == len(names) * (16 * 64) + 2 * len(names) * 32
        # the test split scored again from head.pt: the plain eval transform, encode_dense, the head,
        # the margin
        model, _ = clip.load(ckpt)
        head = build_head("positive", model, names)
        head.load_state_dict(torch.load(out / cache / "head.pt")["state_dict"])
        transform = image_transform(64, train=False)
        images = torch.stack([transform(Image.open(p).convert("RGB")) for p in test_paths])
        # in the batches the run encoded them in (the cache: --batch-size; run.py's evaluate: 100): a
        # convolution's float sums depend on the batch, and these images' margins differ by as little as 3e-5
        batch = 2 if cache == "--cache-features" else 100
        with torch.no_grad():
            features = torch.cat([model.encode_dense(images[i:i + batch]) for i in range(0, len(images),
                                                                                         batch)])
            if cache == "--cache-features":
                features = features.half().float()  # the cache stores features in fp16 (cache.py)
            logits = head.eval()(features)
        expected = _ap_known((logits[..., 0] - logits[..., 1]).double().numpy(), test_labels)
        for name, want in zip(names, expected):
            got = results["per_class_ap"][name]
            assert (want is None and got is None) or got == pytest.approx(100 * want, abs=1e-4), (cache, name)
        assert sorted(c for c, a in zip(names, expected) if a is not None) == known
        known_aps = [a for a in expected if a is not None]
        assert results["map"] == pytest.approx(100 * np.mean(known_aps), abs=1e-4)
        assert len(results["history"]) == 1 and results["history"][0]["map"] == results["map"]
        # the threshold metrics of the same margins, counted by plain loops over the authors' formulas
        margins = (logits[..., 0] - logits[..., 1]).double().tolist()
        by_loops = _metrics_by_loops(margins, test_labels.tolist(), 0.5, 3)
        assert results["metrics"]["threshold"] == 0.5 and results["metrics"]["top_k"] == 3
        for convention, variants in by_loops.items():
            for variant, values in variants.items():
                assert results["metrics"][convention][variant] == _approx_none(values), (convention, variant)


def test_train_one_epoch_is_features_head_loss_step():
    """run.train_one_epoch, batch by batch: features -> head -> loss weight x asymmetric loss -> SGD step; it
    returns the mean loss. Redone here by hand: the float64 loss formula and p <- p - lr * grad."""
    torch.manual_seed(0)
    head = build_head("baseline", _clip(), ["a", "b", "c"])
    by_hand = build_head("baseline", _clip(), ["a", "b", "c"])
    by_hand.load_state_dict(head.state_dict())
    batches = [(torch.randn(4, 5, 32), torch.tensor([[1, 0, -1], [0, 0, 1], [1, 1, 0], [-1, 0, 0]]), None),
               (torch.randn(4, 5, 32), torch.tensor([[0, 1, 1], [1, -1, 0], [0, 0, 0], [1, 0, 1]]), None)]
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    mean = run.train_one_epoch(head, batches, lambda b: b * 2, optimizer, 0.5, torch.device("cpu"),
                               quiet=True)
    losses = []
    for features, targets, _ in batches:
        loss = 0.5 * _asl_float64(by_hand(features * 2), targets)
        grads = torch.autograd.grad(loss, list(by_hand.parameters()))
        with torch.no_grad():
            for p, g in zip(by_hand.parameters(), grads):
                p -= 0.1 * g
        losses.append(loss.item())
    assert mean == pytest.approx(sum(losses) / 2, rel=1e-5)
    for p, q in zip(head.parameters(), by_hand.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_loss_weight_rule_and_its_use(tmp_path):
    for fraction, weight in ((0.1, 0.15), (0.5, 0.03), (1.0, 0.015), (0.25, 0.06)):
        assert loss_weight_rule(fraction) == pytest.approx(weight)
    # the expected number of summed terms times the weight is the same at every fraction
    assert 0.1 * loss_weight_rule(0.1) == pytest.approx(0.5 * 0.03)
    out = tmp_path / "r"
    assert run.main([*SMALL, "--epochs", "1", "--labels", "0.2", "--out", str(out)]) == 0
    known = (torch.load(out / "mask.pt") >= 0).float().mean().item()
    assert _strict_json(out / "results.json")["loss_weight"] == pytest.approx(0.015 / known)
    assert run.main([*SMALL, "--epochs", "1", "--labels", "0.2", "--loss-weight", "0.5", "--out",
                     str(tmp_path / "f")]) == 0
    assert _strict_json(tmp_path / "f" / "results.json")["loss_weight"] == 0.5


def test_best_epoch_on_test_is_recorded_apart(tmp_path):
    out = tmp_path / "r"
    assert run.main([*SMALL, "--epochs", "3", "--eval-every", "1", "--out", str(out)]) == 0
    results = _strict_json(out / "results.json")
    maps = [h["map"] for h in results["history"]]
    best = results["best_epoch_selected_on_test"]
    assert best["map"] == max(maps) and maps[best["epoch"] - 1] == max(maps)
    assert "not the result" in best["note"]
    assert results["map"] == maps[-1]  # the result stays the last epoch


def test_results_json_is_strict_with_null_for_classes_without_positives(tmp_path):
    _, argv = _tiny_voc_run(tmp_path, "--workers", "0", "--epochs", "1")
    assert run.main(argv) == 0
    results = _strict_json(tmp_path / "out" / "results.json")
    # dog, person, train, car, cat (difficult car: absent)
    scored = {n for ids in VOC_TEST.values() for n, _ in ids}
    scored.discard("car")
    aps = results["per_class_ap"]
    assert {n for n, a in aps.items() if a is not None} == scored
    assert results["map"] == pytest.approx(np.mean([a for a in aps.values() if a is not None]))


def test_saved_files_honour_the_umask_and_json_is_strict(tmp_path):
    old = os.umask(0o027)
    try:
        save_atomic({"a": 1}, str(tmp_path / "x.pt"))
        save_atomic({"a": None}, str(tmp_path / "x.json"))
    finally:
        os.umask(old)
    assert (tmp_path / "x.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o640
    with pytest.raises(ValueError):
        save_atomic({"map": float("nan")}, str(tmp_path / "nan.json"))
    assert sorted(os.listdir(tmp_path)) == ["x.json", "x.pt"]


def test_start_up_says_what_it_is_doing(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_here(capfd, *DEMO, "--epochs", "1", "--out", str(tmp_path / "o"),
                               "--cache-dir", str(tmp_path / "c"))
    assert code == 0, err
    steps = ["generating the demo images", "loading CLIP demo: the miniature pretrained", "head: positive",
             "encoding the features", "epoch   1/1"]
    positions = [out.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), out
    voc, argv = _tiny_voc_run(tmp_path, "--workers", "0", "--no-cache-features", "--epochs", "1")
    code, out, err = _run_here(capfd, *argv)
    assert code == 0, err
    steps = ["reading the voc labels", "loading CLIP", "checking that all 7 images decode", "epoch   1/1"]
    positions = [out.find(s) for s in steps]
    assert -1 not in positions and positions == sorted(positions), out


def test_start_up_counts_and_finished_runs_are_worded_right(tmp_path, capsys):
    out = tmp_path / "r"
    argv = [*DEMO, "--demo-images", "8", "--image-size", "64", "--epochs", "1", "--out", str(out)]
    assert run.main(argv) == 0
    assert "; 0 loader workers, " in capsys.readouterr().out
    assert run.main([*argv[:-2], "--workers", "1", "--out", str(tmp_path / "w1")]) == 0
    assert "; 1 loader worker, " in capsys.readouterr().out
    assert run.main(argv) == 2  # a finished run is not resumed: it is done
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--resume" not in err


def test_training_is_the_same_with_any_number_of_workers(tmp_path, capfd, monkeypatch):
    """Each image's augmentation in epoch e is seeded by (e, image) alone, so persistent worker processes,
    their number, or none at all give the very same run (encoder in the loop, augmentation on)."""
    monkeypatch.chdir(tmp_path)
    results = []
    for workers in ("0", "2"):
        out = tmp_path / workers
        code, stdout, err = _run_here(capfd, *SMALL, "--epochs", "3", "--workers", workers, "--out", str(out))
        assert code == 0, err
        assert f"; {workers} loader workers, --pipeline pil" in stdout  # the CPU's default pipeline
        results.append(_strict_json(out / "results.json"))
    assert [h["loss"] for h in results[0]["history"]] == [h["loss"] for h in results[1]["history"]]
    assert results[0]["map"] == results[1]["map"]


# --- options and defaults

def test_defaults_are_the_documented_ones():
    args = cli.parse_args([])
    assert (args.absence_weights, args.no_residual, args.randaugment, args.loss_weight,
            args.shared_context) == ("presence", False, "authors", None, False)
    assert (args.warmup_lr, args.weight_decay, args.warmup_epochs, args.epochs, args.batch_size) == \
        (0.005, 0.0, 1, 50, 32)
    assert (args.lr_prompt, args.lr_embedding, args.lr_linear, args.momentum) == (0.002, 1.0, None, 0.9)
    assert cli.parse_args(["--head", "baseline"]).lr_linear == 0.01  # each head records its own groups' rates
    train = image_transform(448, train=True)
    assert "AuthorsRandAugment" in repr(train)
    assert "RandAugment(num_ops=2, magnitude=9" in repr(image_transform(448, True, randaugment="torchvision"))
    # the README's side-by-side table names each flag with the default above
    readme = open(os.path.join(REPO, "README.md")).read()
    table = readme[readme.index("## Paper, authors' code, clipmlr"):]
    for flag in ("--absence-weights own", "--no-residual", "--loss-weight", "--shared-context",
                 "--randaugment torchvision", "--warmup-lr", "--weight-decay", "--eval-every",
                 "--protocol paper"):
        assert flag in table, flag


def test_authors_learning_rates_from_one_option():
    """--lr LR gives the groups what the authors' train.py gives them from its --lr (PositiveCoOp's train.py:
    `prompt_group` lr * 0.01, `text_group` lr; the baseline's projector lr * 0.01), always 100x apart; the
    defaults stay the paper's Sec. 4 (0.002, 1.0, 0.01: 500x apart); the two ways cannot be mixed."""
    model = _clip()
    for lr in (0.5, 0.002):
        args = cli.parse_args(["--lr", str(lr)])
        assert (args.lr_prompt, args.lr_embedding, args.lr_linear) == (lr * 0.01, lr, None)  # no projector
        groups = {g["name"]: g["lr"] for g in parameter_groups(build_head("positive", model, ["a", "b"],
                                                                          n_ctx=2),
                                                              args.lr_prompt, args.lr_embedding,
                                                              args.lr_linear)}
        assert groups == {"prompt": lr / 100, "embedding": lr}
    paper = cli.parse_args([])
    assert (paper.lr_prompt, paper.lr_embedding, cli.parse_args(["--head", "baseline"]).lr_linear) == (0.002,
                                                                                                       1.0,
                                                                                                       0.01)
    assert cli.parse_args(["--head", "baseline", "--lr", "0.5"]).lr_linear == 0.005
    with pytest.raises(SystemExit):
        cli.parse_args(["--lr", "0.5", "--lr-embedding", "2"])
    # the settings a run records (and --resume compares) are the three rates, whichever way they were given
    assert cli.settings_of(cli.parse_args(["--lr", "0.2"]))["lr_prompt"] == 0.002
    assert "lr" not in cli.settings_of(paper)


def test_readme_says_where_every_default_comes_from():
    """The README's table names each default's origin (paper text / authors' code / authors' README /
    clipmlr), with the option that gives the authors' README example, and no row calls clipmlr's own rule the
    authors'."""
    readme = open(os.path.join(REPO, "README.md")).read()
    table = readme[readme.index("## Paper, authors' code, clipmlr"):]
    table = table[: table.index("\n## ", 5)]
    for words in ("learning rates", "--lr 0.5", "loss weight", "**clipmlr**", "opts.py", "52", "warm-up",
                  "--epochs 52 --loss-weight 0.03"):
        assert words in table, words
    assert "defaults (the authors' code)" not in readme
    assert "authors' code)" not in SWITCHES[0][0] and ["--lr", "0.2"] in [o for _, o in SWITCHES]


def test_default_workers_are_the_cores_this_process_may_use(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.parse_args([]).workers == 6
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert cli.parse_args([]).workers == 1  # 6 cores over 4 torchrun processes
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(96)), raising=False)
    monkeypatch.delenv("WORLD_SIZE")
    assert cli.parse_args([]).workers == 16 and cli.parse_args(["--workers", "0"]).workers == 0


@pytest.mark.parametrize("head", ["baseline", "dual", "positive", "negative"])
def test_a_runs_settings_give_back_its_options_for_every_head(head):
    """predict and the analyses rebuild a run's options from its recorded settings: for every head they parse
    (none of the options a head does not use is passed back to it) and give back the same settings."""
    args = cli.parse_args(["--head", head, "--lr", "0.3", "--labels", "0.4", "--seed", "2"])
    again = cli.parse_args(cli.settings_argv(cli.settings_of(args)))
    assert cli.settings_of(again) == cli.settings_of(args)
    assert again.lr_embedding == (0.3 if head in ("positive", "negative") else None)  # None: no such group


def test_a_sweep_passes_each_head_only_the_options_it_uses():
    argv = ["--data", "demo", "--no-residual", "--n-ctx", "8", "--absence-weights=own", "--lr-linear", "0.1",
            "--epochs", "2"]
    assert cli.head_argv(argv, "baseline") == ["--data", "demo", "--lr-linear", "0.1", "--epochs", "2"]
    assert cli.head_argv(argv, "dual") == ["--data", "demo", "--n-ctx", "8", "--absence-weights=own",
                                           "--epochs", "2"]
    assert cli.head_argv(argv, "positive") == [a for a in argv if a not in ("--lr-linear", "0.1")]
    for head in ("baseline", "dual", "positive", "negative"):
        assert cli.parse_args(cli.head_argv(argv, head) + ["--head", head]).head == head


# ===========================================================================================================
# 4. data readers and augmentations: VOC, COCO, downloads, RandAugment, seeds
# The readers' labels (difficult objects, category order), the dataset downloads through torchvision from a
# local server, the authors' RandAugment against the package's formulas, and what the seed changes.
# ===========================================================================================================

def test_voc_loader_reads_labels_and_difficult_objects(tmp_path):
    _make_voc(tmp_path)
    paths, labels, names = load_voc(str(tmp_path), "trainval")
    assert names[14] == "person" and names[10] == "diningtable" and len(names) == 20
    assert [os.path.basename(p) for p in paths] == ["000005.jpg", "000007.jpg", "000009.jpg", "000012.jpg"]
    assert labels.shape == (4, 20)
    assert labels[0].nonzero().flatten().tolist() == [8]  # chair; the difficult person counts as absent
    assert labels[2].nonzero().flatten().tolist() == [7, 11]  # cat, dog
    assert labels[3, 6] == 1  # a car that is also there as difficult stays present
    _, unknown, _ = load_voc(str(tmp_path), "trainval", difficult="unknown")
    assert unknown[0, 14] == -1 and unknown[0, 8] == 1 and unknown[3, 6] == 1
    _, present, _ = load_voc(str(tmp_path), "trainval", difficult="present")
    assert present[0, 14] == 1


def test_coco_loader_orders_categories_by_id_and_drops_empty_images(tmp_path):
    _make_coco(str(tmp_path))
    paths, labels, names = load_coco(str(tmp_path), "train2014")
    assert names == ["person", "car", "dog"]
    assert len(paths) == 4 and not any(p.endswith("000000000004.jpg") for p in paths)
    assert labels.tolist() == [[1, 0, 1], [0, 1, 0], [0, 0, 1], [0, 0, 1]]


def _archive(path, root, members, kind):
    """A .tar or .zip at `path` holding `members` (paths relative to `root`); returns its bytes."""
    if kind == "tar":
        with tarfile.open(path, "w") as t:
            for m in members:
                t.add(os.path.join(root, m), arcname=m)
    else:
        with zipfile.ZipFile(path, "w") as z:
            for m in members:
                z.write(os.path.join(root, m), arcname=m)
    with open(path, "rb") as f:
        return f.read()


def test_download_datasets_from_a_local_server(tmp_path, server, monkeypatch):
    """--download through the real code (torchvision's download, md5 check and extraction), served on
    127.0.0.1."""
    made = tmp_path / "made"
    _make_voc(str(made / "voc"))
    _make_coco(str(made / "coco"))
    members = [os.path.relpath(os.path.join(d, f), made / "voc") for d, _,
               fs in os.walk(made / "voc") for f in fs]
    body = _archive(tmp_path / "voc.tar", str(made / "voc"), members, "tar")
    server.routes["/voc.tar"] = (body, len(body))
    entry = {"url": server.url + "/voc.tar", "filename": "voc.tar", "md5": hashlib.md5(body).hexdigest(),
             "base_dir": "VOCdevkit/VOC2007"}
    monkeypatch.setitem(tv_voc.DATASET_YEAR_DICT, "2007", entry)
    monkeypatch.setitem(tv_voc.DATASET_YEAR_DICT, "2007-test", entry)
    urls = {}
    for archive, top in (("zips/train2014.zip", "train2014"), ("zips/val2014.zip", "val2014"),
                         ("annotations/annotations_trainval2014.zip", "annotations")):
        files = [os.path.join(top, f) for f in os.listdir(made / "coco" / top)]
        body = _archive(tmp_path / os.path.basename(archive), str(made / "coco"), files, "zip")
        server.routes["/" + archive] = (body, len(body))
        urls[archive] = hashlib.md5(body).hexdigest()
    monkeypatch.setattr(download, "COCO_BASE_URL", server.url)
    monkeypatch.setattr(download, "COCO_URLS", urls)
    ckpt = _save_clip(tmp_path / "tiny.pt")
    for name in ("voc", "coco"):
        root = tmp_path / "data" / name
        argv = ["--head", "baseline", "--data", name, "--data-root", str(root), "--download", "--clip", ckpt,
                "--image-size", "64", "--epochs", "1", "--workers", "0", "--no-cache-features"]
        assert run.main([*argv, "--out", str(tmp_path / name / "1")]) == 0
        n = len(server.requests)
        # what is there is not fetched again
        assert run.main([*argv, "--out", str(tmp_path / name / "2")]) == 0
        assert len(server.requests) == n
    assert len(load_voc(str(tmp_path / "data" / "voc"), "test")[0]) == len(VOC_TEST)
    assert load_coco(str(tmp_path / "data" / "coco"), "val2014")[2] == ["person", "car", "dog"]
    # a damaged archive (wrong md5) is refused with a clear error
    monkeypatch.setitem(urls, "zips/val2014.zip", "0" * 32)
    with pytest.raises(DataError, match="could not download .*val2014.zip"):
        download.download_coco(str(tmp_path / "data" / "coco2"))


def test_authors_randaugment_draws_the_packages_policy(monkeypatch):
    """Two (operation, level) draws, uniform over 15 operations x levels 1..9, each applied with p = 0.5."""
    calls = []
    monkeypatch.setattr(augment, "apply_authors_op",
                        lambda image, op, level: calls.append((op, level)) or image)
    policy, n = augment.AuthorsRandAugment(), 20000
    torch.manual_seed(0)
    applied = []
    for _ in range(n):
        before = len(calls)
        policy(None)
        applied.append(len(calls) - before)
    def five_sigma(p, count):  # five standard deviations of a frequency p estimated from `count` draws
        return 5 * math.sqrt(p * (1 - p) / count)
    counts = np.bincount(applied, minlength=3) / n
    np.testing.assert_allclose(counts, [0.25, 0.5, 0.25], atol=five_sigma(0.5, n))  # Binomial(2, 0.5)
    ops = np.array([augment.AUTHORS_OPS.index(op) for op, _ in calls])
    levels = np.array([level for _, level in calls])
    assert len(set(augment.AUTHORS_OPS)) == 15 and set(levels.tolist()) == set(range(1, 10))
    np.testing.assert_allclose(np.bincount(ops, minlength=15) / len(ops), 1 / 15,
                               atol=five_sigma(1 / 15, len(ops)))
    np.testing.assert_allclose(np.bincount(levels, minlength=10)[1:] / len(levels), 1 / 9,
                               atol=five_sigma(1 / 9, len(levels)))


def test_authors_randaugment_magnitudes_and_operations():
    """The package's scales (np.linspace over 10 points) and its PIL operations, written out independently."""
    scales = {"ShearX": np.linspace(0, 0.3, 10), "TranslateY": np.linspace(0, 150 / 331, 10),
              "Rotate": np.linspace(0, 30, 10), "Color": np.linspace(0.0, 0.9, 10),
              "Posterize": np.round(np.linspace(8, 4, 10), 0), "Solarize": np.linspace(256, 0, 10),
              "Cutout": np.round(np.linspace(0, 20, 10), 0)}
    for op, values in scales.items():
        for level in range(1, 10):
            assert authors_magnitude(op, level) == pytest.approx(values[level]), (op, level)
    assert authors_magnitude("Invert", 5) is None
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))  # noqa: E731
    assert same(apply_authors_op(image, "Invert", 3), ImageOps.invert(image))
    assert same(apply_authors_op(image, "Posterize", 9), ImageOps.posterize(image, 4))
    assert same(apply_authors_op(image, "Solarize", 6), ImageOps.solarize(image, 256 - 256 * 6 / 9))
    assert same(apply_authors_op(image, "Equalize", 1), ImageOps.equalize(image))
    torch.manual_seed(0)
    got = apply_authors_op(image, "Brightness", 9)  # 1 ± 0.9, the sign drawn at random
    assert any(same(got, ImageEnhance.Brightness(image).enhance(f)) for f in (1.9, 0.1))
    cut = np.asarray(apply_authors_op(image, "Cutout", 9))  # an 18 x 18 square (fewer at a border)
    painted = (cut != np.asarray(image)).any(axis=2) & (cut == np.array([125, 122, 113])).all(axis=2)
    assert 0 < painted.sum() <= 18 * 18
    for op in ("ShearX", "TranslateX", "Rotate", "Sharpness", "Contrast", "Color", "AutoContrast"):
        assert apply_authors_op(image, op, 5).size == image.size
        tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
        assert apply_authors_op(tensor, op, 5).shape == tensor.shape


def test_authors_geometric_operations_match_the_packages_pil_formulas():
    """Shear and rotation against the package's own PIL calls (affine matrix, bicubic, grey fill)."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    for level in (2, 9):
        m = 0.3 * level / 9
        got = np.asarray(apply_authors_op(image, "ShearX", level))
        want = [np.asarray(image.transform(image.size, Image.AFFINE, (1, s * m, 0, 0, 1, 0), Image.BICUBIC,
                                           fillcolor=(128, 128, 128))) for s in (1, -1)]
        assert any(np.abs(got.astype(int) - w).max() <= 1 for w in want), level
        got = np.asarray(apply_authors_op(image, "Rotate", level))
        rot = image.convert("RGBA").rotate(30 * level / 9)
        want = np.asarray(Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert("RGB"))
        assert np.abs(got.astype(int) - want).max() <= 1, level


def test_the_seed_varies_the_augmentations_and_nothing_else_changes_them():
    """Image i's augmentation in epoch e is seeded by (seed, e, i): other seeds give other views (for every
    image, not only some), the same seed the same views, whatever the order in which items are read; and the
    item seeds of two run seeds do not coincide (torch keeps only 32 bits of a seed, so seed + 2**32 must not
    be how they are told apart)."""
    images, labels = demo_split(6, 0, 64)
    data = ImageDataset(images, labels, image_transform(48, True))

    def views(seed, order):
        views = SeededViews(data, 2, seed)
        return {j: views[j][0] for j in order}
    a, b, again = views(0, range(12)), views(1, range(12)), views(0, reversed(range(12)))
    assert all(torch.equal(a[j], again[j]) for j in range(12))
    assert all(not torch.equal(a[j], b[j]) for j in range(12))
    seeds = {s: {item_seed(s, j) for j in range(5000)} for s in (0, 1, 2)}
    assert all(len(v) == 5000 for v in seeds.values())
    assert not (seeds[0] & seeds[1]) and not (seeds[1] & seeds[2])
    assert all(0 <= x < 2**32 for x in seeds[0])


def test_seeded_leaves_every_gpu_generator_alone(monkeypatch):
    """The device pipeline seeds each image's draws in the training process: only the CPU generator may be
    reseeded there (and it is restored); torch.manual_seed would reseed every GPU's for good."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    torch.manual_seed(5)
    assert calls == [5]  # the probe works: torch.manual_seed goes through it
    before = torch.rand(3)
    torch.manual_seed(5)
    with seeded(123):
        inside = torch.rand(3)
        assert torch.initial_seed() == 123
    assert calls == [5, 5] and torch.equal(torch.rand(3), before) and not torch.equal(inside, before)


def test_library_code_leaves_the_global_random_state_alone(demo, tmp_path):
    images, labels, model, _ = demo
    random.seed(123)
    torch.manual_seed(123)
    before = (random.getstate(), torch.random.get_rng_state())
    tiny_clip(resolution=SIZE, seed=3)
    demo_split(4, 0, SIZE)
    data = ImageDataset(images[:6], labels[:6], image_transform(SIZE, train=True))
    cache_features.encode_split(data, 2, enc(model), 4, 0, tmp_path / "a", key_for("train", "augmented"))
    cache_features.encode_split(data, 1, enc(model), 4, 2, tmp_path / "b", key_for("train", "augmented"))
    assert random.getstate() == before[0] and torch.equal(torch.random.get_rng_state(), before[1])


# ------------------------------------------------------------------------ NUS-WIDE in its official layout
# generated trees: backslash paths, CRLF lines, a missing image, an image without a label, the concept order

NUSWIDE_CONCEPTS = [
    "airport", "animal", "beach", "bear", "birds", "boats", "book", "bridge", "buildings", "cars", "castle",
    "cat", "cityscape", "clouds", "computer", "coral", "cow", "dancing", "dog", "earthquake", "elk", "fire",
    "fish", "flags", "flowers", "food", "fox", "frost", "garden", "glacier", "grass", "harbor", "horses",
    "house", "lake", "leaf", "map", "military", "moon", "mountain", "nighttime", "ocean", "person", "plane",
    "plants", "police", "protest", "railroad", "rainbow", "reflection", "road", "rocks", "running", "sand",
    "sign", "sky", "snow", "soccer", "sports", "statue", "street", "sun", "sunset", "surf", "swimmers",
    "tattoo", "temple", "tiger", "tower", "town", "toy", "train", "tree", "valley", "vehicle", "water",
    "waterfall", "wedding", "whales", "window", "zebra"]

# (list line, positive concepts, on disk). Train: one image with no label, one listed but missing.
NUSWIDE_TRAIN = [("actor\\0001_2124494179.jpg", {"airport", "zebra"}, True),
         ("actor\\0002_174174086.jpg", set(), True),
         ("beach\\0003_1000.jpg", {"beach"}, False),
         ("beach\\0004_1001.jpg", {"animal", "water"}, True)]
NUSWIDE_TEST = [("cat\\0001_2000.jpg", {"cat", "sky"}, True),
        ("cat\\0002_2001.jpg", set(), True)]


def _write_lines(path, lines, newline="\r\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        f.write("".join(line + newline for line in lines))


def _make_nuswide(root, train=NUSWIDE_TRAIN, test=NUSWIDE_TEST, concepts=NUSWIDE_CONCEPTS, release_zip=False,
                  newline="\r\n",
                 label_line="{} "):
    """A tiny NUS-WIDE in the official layout under `root`; returns the folder.

    release_zip=False: the flat layout (ROOT/Concepts81.txt, ROOT/TrainTestLabels/), as TaI-DPT reads it;
    True: as NUS-WIDE.zip unpacks (ROOT/ConceptsList/Concepts81.txt, ROOT/Groundtruth/TrainTestLabels/).
    Lists use backslash paths; lines end in `newline`; label lines are `label_line` formatted (e.g. "0 ").
    """
    _write_lines(os.path.join(root, "ConceptsList" if release_zip else "", "Concepts81.txt"), concepts,
                 newline)
    labels = os.path.join(root, *(("Groundtruth",) if release_zip else ()), "TrainTestLabels")
    for rows, list_name, suffix in ((train, "TrainImagelist.txt", "Train"),
                                    (test, "TestImagelist.txt", "Test")):
        _write_lines(os.path.join(root, "ImageList", list_name), [line for line, _, _ in rows], newline)
        for name in concepts:
            _write_lines(os.path.join(labels, f"Labels_{name}_{suffix}.txt"),
                  [label_line.format(int(name in positives)) for _, positives, _ in rows], newline)
        for line, _, present in rows:
            if present:
                path = os.path.join(root, "Flickr", *line.split("\\")[-2:])
                os.makedirs(os.path.dirname(path), exist_ok=True)
                open(path, "wb").close()
    return root


def _nuswide_expected(pairs):
    """(N, 81) labels written out by hand: one (row, concept index) per positive."""
    y = torch.zeros(max(r for r, _ in pairs) + 1, 81, dtype=torch.long)
    for r, c in pairs:
        y[r, c] = 1
    return y


def test_nuswide_train_with_missing_allowed(tmp_path):
    root = _make_nuswide(str(tmp_path))
    paths, labels, names, counts = load_nuswide(root, "train")
    assert names == NUSWIDE_CONCEPTS
    assert paths == [os.path.join(root, "Flickr", "actor", "0001_2124494179.jpg"),
                     os.path.join(root, "Flickr", "beach", "0004_1001.jpg")]
    # airport = 0, zebra = 80; animal = 1, water = 75 (alphabetical positions, counted by hand)
    assert torch.equal(labels, _nuswide_expected([(0, 0), (0, 80), (1, 1), (1, 75)]))
    assert labels.dtype == torch.long and labels.shape == (2, 81)
    assert counts == {"listed": 4, "missing": 1, "no_label": 1, "kept": 2}


def test_nuswide_missing_images_refused_without_the_flag(tmp_path):
    root = _make_nuswide(str(tmp_path))
    with pytest.raises(DataError) as e:
        load_nuswide_splits(root, say=lambda *a: None)
    message = str(e.value)
    assert "1 of 4 train images" in message
    assert os.path.join(root, "Flickr", "beach", "0003_1000.jpg") in message
    assert "--nuswide-skip-missing" in message
    assert "\n" not in message


def test_nuswide_missing_images_counted_before_the_no_label_drop(tmp_path):
    # the missing image has no label: it counts as missing, not as no_label
    train = NUSWIDE_TRAIN[:2] + [("beach\\0003_1000.jpg", set(), False), NUSWIDE_TRAIN[3]]
    root = _make_nuswide(str(tmp_path), train=train)
    _, _, _, counts = load_nuswide(root, "train")
    assert counts == {"listed": 4, "missing": 1, "no_label": 1, "kept": 2}


def test_nuswide_test_split_needs_no_flag(tmp_path):
    root = _make_nuswide(str(tmp_path))
    paths, labels, _, counts = load_nuswide(root, "test")
    assert paths == [os.path.join(root, "Flickr", "cat", "0001_2000.jpg")]
    assert torch.equal(labels, _nuswide_expected([(0, 11), (0, 55)]))  # cat = 11, sky = 55
    assert counts == {"listed": 2, "missing": 0, "no_label": 1, "kept": 1}


def test_nuswide_release_zip_layout_one_level_deeper_with_lf_and_absolute_paths(tmp_path):
    train = [(r"C:\ImageData\Flickr" + "\\" + line, pos, on) for line, pos, on in NUSWIDE_TRAIN]
    _make_nuswide(str(tmp_path / "NUS-WIDE"), train=train, release_zip=True, newline="\n", label_line="{}")
    assert find_nuswide(str(tmp_path)) == str(tmp_path / "NUS-WIDE")
    paths, labels, _, counts = load_nuswide(str(tmp_path), "train")
    assert paths[1] == os.path.join(str(tmp_path), "NUS-WIDE", "Flickr", "beach", "0004_1001.jpg")
    assert torch.equal(labels, _nuswide_expected([(0, 0), (0, 80), (1, 1), (1, 75)]))
    assert counts["kept"] == 2


def test_nuswide_class_order_is_the_concept_file_order(tmp_path):
    root = _make_nuswide(str(tmp_path), concepts=NUSWIDE_CONCEPTS[::-1])
    _, labels, names, _ = load_nuswide(root, "test")
    assert names == NUSWIDE_CONCEPTS[::-1]
    assert torch.equal(labels, _nuswide_expected([(0, 80 - 11), (0, 80 - 55)]))


def test_nuswide_find_nuswide_none_and_error(tmp_path):
    assert find_nuswide(str(tmp_path)) is None
    with pytest.raises(DataError, match="no NUS-WIDE in .*ImageList/"):
        load_nuswide(str(tmp_path), "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_nuswide(str(tmp_path), "val")


def _nuswide_label_file(root, concept="beach", split="Train"):
    return os.path.join(root, "TrainTestLabels", f"Labels_{concept}_{split}.txt")


def _nuswide_train_list(root):
    return os.path.join(root, "ImageList", "TrainImagelist.txt")


def _overwrite(path, text):
    with open(path, "w", newline="") as f:
        f.write(text)


@pytest.mark.parametrize("break_it, pattern", [
    (lambda r: os.remove(os.path.join(r, "Concepts81.txt")), r"Concepts81\.txt is missing"),
    (lambda r: _write_lines(os.path.join(r, "Concepts81.txt"), NUSWIDE_CONCEPTS[:80]),
     r"Concepts81\.txt lists 80 concepts"),
    (lambda r: _write_lines(os.path.join(r, "Concepts81.txt"), NUSWIDE_CONCEPTS[:80] + ["cat"]),
     r"Concepts81\.txt, line 81: the concept 'cat' is listed again \(first on line 12\)"),
    (lambda r: os.remove(_nuswide_train_list(r)), r"TrainImagelist\.txt is missing"),
    (lambda r: _overwrite(_nuswide_train_list(r), "actor\\a.jpg\r\n\r\nactor\\b.jpg\r\n"),
     r"TrainImagelist\.txt, line 2 is empty"),
    (lambda r: _overwrite(_nuswide_train_list(r), "actor\\a.jpg\r\nb.jpg\r\n"),
     r"TrainImagelist\.txt, line 2: 'b\.jpg' is not <folder>"),
    (lambda r: os.remove(_nuswide_label_file(r)), r"Labels_beach_Train\.txt is missing"),
    (lambda r: _overwrite(_nuswide_label_file(r), "0 \r\n0 \r\n1 \r\n"),
     r"Labels_beach_Train\.txt has 3 lines, but .*TrainImagelist\.txt lists 4 images .*truncated"),
    (lambda r: _overwrite(_nuswide_label_file(r), "0\n0\n1\n0\n1\n"),
     r"Labels_beach_Train\.txt has 5 lines, but .* lists 4 images .*longer than the list"),
    (lambda r: _overwrite(_nuswide_label_file(r), "0\n2\n1\n0\n"), r"Train\.txt, line 2: '2' is not 0 or 1"),
    (lambda r: _overwrite(_nuswide_label_file(r), "0\n0\n1 0\n0\n"),
     r"Train\.txt, line 3: '1 0' is not 0 or 1"),
    (lambda r: _overwrite(_nuswide_label_file(r), "0\n\n1\n0\n"), r"Train\.txt, line 2: the line is empty"),
    (lambda r: _overwrite(_nuswide_label_file(r), "0\n0\n1\n-1\n"),
     r"Train\.txt, line 4: '-1' is not 0 or 1"),
])
def test_nuswide_malformed_files(tmp_path, break_it, pattern):
    root = _make_nuswide(str(tmp_path))
    load_nuswide(root, "train")  # intact first: the error below is the edit's
    break_it(root)
    with pytest.raises(DataError, match=pattern) as e:
        load_nuswide(root, "train")
    assert "\n" not in str(e.value)


def test_nuswide_label_errors_come_before_image_checks(tmp_path):
    root = _make_nuswide(str(tmp_path))
    _overwrite(_nuswide_label_file(root), "0\n2\n1\n0\n")
    with pytest.raises(DataError, match="is not 0 or 1"):
        load_nuswide(root, "train")  # a missing image too, but the corrupt file is named first


def test_nuswide_no_flickr_folder_and_nothing_kept(tmp_path):
    root = _make_nuswide(str(tmp_path))
    os.rename(os.path.join(root, "Flickr"), os.path.join(root, "images"))
    with pytest.raises(DataError, match="no Flickr/ folder in"):
        load_nuswide(root, "train")
    os.makedirs(os.path.join(root, "Flickr"))
    with pytest.raises(DataError, match="none of the 4 train images .* is both on disk and labelled"):
        load_nuswide(root, "train")


def _nuswide_with_images(root):
    """A NUS-WIDE tree in the official layout with real JPEGs: 24 training images (6 without a positive, one
    missing), 12 test images (one missing)."""
    rng = np.random.default_rng(0)
    c = NUSWIDE_CONCEPTS
    train = [(f"f{i % 3}\\{i:04d}_1.jpg", {c[i % 5], c[7]} if i % 4 else set(), i != 5) for i in range(24)]
    test = [(f"g{i % 2}\\{i:04d}_2.jpg", {c[i % 5]}, i != 3) for i in range(12)]
    _make_nuswide(str(root), train=train, test=test)
    for line, _, present in train + test:
        if present:
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            _jpeg(str(root / "Flickr" / line.replace("\\", "/")), colour)
    return root


def test_nuswide_run_counts_refuses_missing_images_and_trains_with_the_flag(tmp_path, capsys):
    """--data nuswide as a user runs it: the counts per split at start-up, a one-line refusal naming both
    counts and the flag, then with --nuswide-skip-missing a run whose head predict scores again."""
    root = _nuswide_with_images(tmp_path / "nus")
    base = ["--data", "nuswide", "--data-root", str(root), "--clip", _save_clip(tmp_path / "tiny.pt"),
            "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--n-ctx", "2"]
    assert run.main([*base, "--out", str(tmp_path / "refused")]) == 2
    out, err = capsys.readouterr()
    # 24 listed: 1 missing; of the 23 on disk 6 have no positive (i = 0, 4, 8, 12, 16, 20; i = 5 is missing)
    assert "NUS-WIDE training images: 24 listed, 1 missing, 6 without a positive concept (dropped), 17 " \
        "used" in out
    assert "NUS-WIDE test images: 12 listed, 1 missing, 0 without a positive concept (dropped), 11 used" \
        in out
    assert err.count("\n") == 1 and "1 of 24 train images and 1 of 12 test images" in err
    assert "--nuswide-skip-missing" in err and not (tmp_path / "refused").exists()
    assert run.main([*base, "--nuswide-skip-missing", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["settings"]["nuswide_skip_missing"] is True
    assert list(results["per_class_ap"]) == NUSWIDE_CONCEPTS
    assert [name for name, ap in results["per_class_ap"].items() if ap is not None] == NUSWIDE_CONCEPTS[:5]
    capsys.readouterr()
    assert predict.main([str(tmp_path / "run"), "--evaluate", "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "ML-GCN (score >= 0.5" in printed and "ASL (score > 0.5" in printed
    assert "difference +0.0000" in printed


def test_metrics_options_are_checked_in_one_line(capsys):
    for argv, words in [(["--threshold", "1"], "--threshold 1.0 is a probability"),
                        (["--threshold", "nan"], "--threshold nan is a probability"),
                        (["--top-k", "0"], "--top-k 0 must be at least 1"),
                        (["--nuswide-skip-missing"], "--nuswide-skip-missing does nothing for --data demo")]:
        with pytest.raises(SystemExit) as e:
            cli.parse_args(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        predict.parse_args(["run", "--evaluate", "--threshold", "0"])
    assert "strictly between 0 and 1" in capsys.readouterr().err


# ===========================================================================================================
# 5. failures: one line, exit 2, nothing left behind Every error a user can cause (bad options, missing or
# broken data, checkpoints, folders) is one line naming the bad value, exit status 2, before the slow start-up
# where it can be, and leaves no partial file or folder.
# ===========================================================================================================

def test_a_test_split_without_a_positive_is_refused_before_the_clip_loads(monkeypatch, capsys, tmp_path):
    """With no known positive test label no AP exists: one line at start-up, not a traceback after
    training."""
    real = cli.load_data

    def no_positive(args, say=print):
        train, train_y, test, test_y, names = real(args, say)
        return train, train_y, test, torch.zeros_like(test_y), names

    def refuse(*a, **k):
        raise AssertionError("the CLIP was loaded before the refusal")
    monkeypatch.setattr(cli, "load_data", no_positive)
    monkeypatch.setattr(cli, "load_clip", refuse)
    assert run.main([*DEMO_ARGS, "--epochs", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "no test image of --data demo has a known positive label" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_user_errors_are_clipmlrs_own_types_and_bugs_are_not():
    from clipmlr.analysis.commands import AnalysisError
    for error in (DataError("x"), cache_features.CacheError("x"), cli.RunError("x"), clip.LoadError("x"),
                  clip.DownloadError("x"), clip.NoCheckpoint("x"), predict.PredictError("x"),
                  AnalysisError("x")):
        assert cli.is_user_error(error), type(error)
    for error in (ValueError("x"), AssertionError("x"), KeyError("x"), RuntimeError("x")):
        assert not cli.is_user_error(error), type(error)


def test_the_decoding_check_names_every_processs_bad_images(tmp_path):
    """Under torchrun each process decodes its share; the error names all of them and the total (`gather`
    stands in for distributed.gather_lists: here another process found one broken image)."""
    good = str(tmp_path / "good.jpg")
    _jpeg(good, (10, 20, 30))
    check_decodable([good], 0, 4, lambda bad: bad)  # nothing broken anywhere: no error
    with pytest.raises(DataError, match=r"^1 of 4 images do not decode; the first: .*other\.jpg"):
        check_decodable([good], 0, 4, lambda bad: bad + ["other.jpg: cannot identify image file"])
    assert distributed.gather_lists(["a", "b"]) == ["a", "b"]  # one process: its own


def test_gather_rows_puts_every_ranks_rows_in_index_order(monkeypatch):
    """distributed.gather_rows with two ranks whose shards arrive out of order (all_gather_object faked)."""
    rows = torch.arange(10.0).reshape(5, 2)  # row i = [2i, 2i + 1]
    parts = [(torch.tensor([3, 1]), rows[[3, 1]]), (torch.tensor([4, 0, 2]), rows[[4, 0, 2]])]
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed.dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None),
                                                                                                 parts))
    assert torch.equal(distributed.gather_rows(parts[0], 5), rows)
    with pytest.raises(AssertionError, match="exactly once"):
        distributed.gather_rows(parts[0], 6)


def test_a_cache_built_for_other_settings_is_named_not_called_unreadable(tmp_path, capsys):
    """A cache folder whose meta.json names another key (here: edited) is refused naming the field."""
    base = [*DEMO_ARGS, "--epochs", "1", "--cache-dir", str(tmp_path / "c")]
    assert run.main([*base, "--out", str(tmp_path / "a")]) == 0
    [folder] = [d for d in (tmp_path / "c").iterdir() if "-test-" in d.name]
    meta = json.loads((folder / "meta.json").read_text())
    meta["key"]["image_size"] = 999
    (folder / "meta.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert run.main([*base, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "was built for image_size=999, but this run needs image_size=64" in err and "unreadable" not in err



# --- options refused by the parser

def test_bad_input_is_one_clear_message(tmp_path, capfd, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv, words in [(["--labels", "0"], ["--labels 0", "(0, 1]"]),
                        (["--labels", "1.5"], ["1.5", "(0, 1]"]),
                        (["--head", "best"], ["best", "baseline"]), (["--epochs", "0"], ["--epochs 0"]),
                        (["--data", "voc", "--data-root", str(tmp_path / "nowhere")],
                         ["nowhere", "--download"]),
                        (["--data", "coco", "--data-root", str(tmp_path / "nowhere")],
                         ["nowhere", "--download"]),
                        (["--clip", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")],
                         ["missing.pt"]),
                        (["--clip", "RN102", "--out", str(tmp_path / "o2")], ["RN102", "RN101"]),
                        (["--image-size", "8"], ["--image-size 8", "32"])]:
        code, out, err = _run_here(capfd, *argv, "--workers", "0")
        assert code == 2, (argv, out, err)
        assert "Traceback" not in err, err
        for w in words:
            assert w in err, (w, err)


def test_bad_values_and_useless_options_are_one_line_before_anything_runs(capsys):
    """Values a run cannot use, and options that would do nothing for the head given (and be recorded as if
    they had), are refused by the parser: one line on stderr, exit status 2, no usage block."""
    cases = [(["--loss-weight", "-1"], "--loss-weight -1.0 must be a finite number > 0"),
             (["--eval-every", "-1"], "--eval-every -1 must be 0 or more"),
             (["--lr-prompt", "nan"], "--lr-prompt nan must be a finite number"),
             (["--lr", "inf"], "--lr inf must be a finite number > 0"),
             (["--momentum", "1"], "--momentum 1.0 must be below 1"),
             (["--seed", "-3"], "--seed -3 must be 0 or more"),
             (["--weight-decay=-1e-4"], "--weight-decay -0.0001 must be a finite number >= 0"),
             (["--head", "baseline", "--absence-weights", "own"],
              "--absence-weights does nothing for --head baseline"),
             (["--head", "baseline", "--shared-context"],
              "--shared-context does nothing for --head baseline"),
             (["--head", "baseline", "--lr-prompt", "0.1"], "--lr-prompt does nothing for --head baseline"),
             (["--head", "dual", "--no-residual"], "--no-residual does nothing for --head dual"),
             (["--head", "dual", "--lr-embedding", "2"], "--lr-embedding does nothing for --head dual"),
             (["--head", "positive", "--lr-linear", "2"], "--lr-linear does nothing for --head positive"),
             (["--lr", "1", "--lr-prompt", "0.1"], "give it or --lr-prompt, not both"),
             (["--bogus"], "unrecognized arguments: --bogus")]
    for argv, words in cases:
        with pytest.raises(SystemExit) as stop:
            run.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and words in err and "usage" not in err, (argv,
                                                                                                       err)
    # the same options are fine for the heads that use them
    assert cli.parse_args(["--head", "dual", "--absence-weights", "own", "--shared-context"]).head == "dual"
    assert cli.parse_args(["--head", "negative", "--no-residual", "--lr-embedding", "2"]).no_residual


def test_option_errors_under_torchrun_are_printed_once(monkeypatch, capsys):
    """Every torchrun process parses the same options: only rank 0 says what is wrong."""
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit):
        cli.parse_args(["--labels", "2"])
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit):
        cli.parse_args(["--labels", "2"])
    assert "--labels 2.0 is outside (0, 1]" in capsys.readouterr().err


def test_early_checks_come_before_the_clip_is_loaded(tmp_path, monkeypatch, capsys):
    """A prompt that cannot fit (--n-ctx), an --out that cannot be written although the permission bits say
    yes (/proc for root): one line, exit 2, before the slow start-up (loading the CLIP)."""
    def no_clip(*args, **kwargs):
        raise AssertionError("the CLIP was loaded before the check")
    monkeypatch.setattr(cli, "load_clip", no_clip)
    base = [*DEMO, "--demo-images", "8", "--image-size", "64", "--epochs", "1"]
    assert run.main([*base, "--n-ctx", "75", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    # the longest demo class, "hexagon", takes 3 tokens: SOS + 75 + 3 + "." + EOS = 80 > 77
    assert err.count("\n") == 1 and "--n-ctx 75" in err and "'hexagon' needs 80 tokens" in err
    assert "give --n-ctx 72 or less" in err
    assert "truncate" not in err and not (tmp_path / "a").exists()
    if os.path.isdir("/proc"):
        assert run.main([*base, "--out", "/proc/clipmlr-test"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--out /proc/clipmlr-test" in err and "not writable" in err


def test_more_bad_input_is_one_line(tmp_path, capsys):
    """A prompt longer than the text encoder's context, a damaged feature cache: one line, exit 2."""
    base = [*DEMO, "--demo-images", "16", "--image-size", "64", "--epochs", "1", "--cache-dir",
            str(tmp_path / "c")]
    assert run.main([*base, "--n-ctx", "80", "--out", str(tmp_path / "a")]) == 2
    assert "--n-ctx 80" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert run.main([*base, "--out", str(tmp_path / "b")]) == 0
    [folder] = [d for d in (tmp_path / "c").iterdir() if "-train-" in d.name]
    done = (folder / "done.pt").read_bytes()
    (folder / "done.pt").write_bytes(done[: len(done) // 2])  # cut short
    assert run.main([*base, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and "delete that folder" in err and str(folder) in err
    assert err.count("\n") == 1, err
    (folder / "done.pt").write_bytes(b"damaged")  # torch.load's message for this runs to paragraphs
    assert run.main([*base, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "its done.pt: UnpicklingError" in err and err.count("\n") == 1, err
    (tmp_path / "b" / "checkpoint.pt").write_bytes(b"damaged")  # likewise a damaged checkpoint
    assert run.main([*base, "--out", str(tmp_path / "b"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the checkpoint" in err and err.count("\n") == 1, err


# --- checkpoints

def test_load_unknown_name():
    with pytest.raises(ValueError) as e:
        clip.load("RN102")
    message = str(e.value)
    assert "RN102" in message
    assert all(name in message for name in ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64"])


def test_load_missing_path(tmp_path):
    missing = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        clip.load(str(missing))


@pytest.mark.parametrize("kind", ["archive", "plain"])
def test_load_truncated_checkpoint(checkpoints, tmp_path, kind):
    data = checkpoints[kind].read_bytes()
    path = tmp_path / "half.pt"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        clip.load(str(path))
    assert str(e.value).count(str(path)) == 1, str(e.value)  # named once


def test_load_vit_checkpoint_is_refused(tiny, tmp_path):
    state_dict = dict(tiny.state_dict())
    state_dict["visual.class_embedding"] = torch.zeros(768)
    state_dict["visual.proj"] = torch.zeros(768, 64)
    with pytest.raises(ValueError, match="ViT"):
        build_model(state_dict)
    path = tmp_path / "vit.pt"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match="ViT") as e:
        clip.load(str(path))
    assert str(path) in str(e.value)


# --- data

def test_no_network_download_is_a_clear_error(tmp_path, monkeypatch):
    """--download with no reachable server: one sentence naming the folder, no traceback."""
    monkeypatch.setitem(download.COCO_URLS, "zips/train2014.zip", "0" * 32)
    monkeypatch.setattr(download, "download_and_extract_archive",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("[Errno -3] no network")))
    with pytest.raises(DataError, match="could not download .*train2014.zip.*no network"):
        download.download_coco(str(tmp_path))


def _voc_tree(root, xml, image_bytes=None):
    voc = os.path.join(root, "VOCdevkit", "VOC2007")
    for d in ("JPEGImages", "Annotations", "ImageSets/Main"):
        os.makedirs(os.path.join(voc, d), exist_ok=True)
    for split in ("trainval", "test"):
        with open(os.path.join(voc, "ImageSets", "Main", f"{split}.txt"), "w") as f:
            f.write("000001\n")
    with open(os.path.join(voc, "Annotations", "000001.xml"), "w") as f:
        f.write(xml)
    if image_bytes is not None:
        with open(os.path.join(voc, "JPEGImages", "000001.jpg"), "wb") as f:
            f.write(image_bytes)
    return voc


GOOD_XML = "<annotation><object><name>dog</name><difficult>0</difficult></object></annotation>"


@pytest.mark.parametrize("xml,message", [
    ("<annotation><object><name>dog</name>", "cannot read the annotation .*000001.xml"),
    ("<annotation><object><difficult>0</difficult></object></annotation>", "000001.xml.*no <name>"),
    ("<annotation><object><name>unicorn</name></object></annotation>", "000001.xml.*unknown class 'unicorn'"),
    ("", "cannot read the annotation"),
])
def test_malformed_voc_annotations_are_named(tmp_path, xml, message):
    _voc_tree(str(tmp_path), xml, b"")
    with pytest.raises(DataError, match=message):
        load_voc(str(tmp_path), "trainval")


def test_missing_and_unreadable_images_are_named(tmp_path):
    voc = _voc_tree(str(tmp_path), GOOD_XML)
    with pytest.raises(DataError, match="missing, e.g. .*000001.jpg"):
        load_voc(str(tmp_path), "trainval")
    buf = BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buf, "JPEG")
    for content in (b"", buf.getvalue()[: len(buf.getvalue()) // 2], b"not an image at all"):
        with open(os.path.join(voc, "JPEGImages", "000001.jpg"), "wb") as f:
            f.write(content)
        paths, labels, _ = load_voc(str(tmp_path), "trainval")
        with pytest.raises(DataError, match="cannot read the image .*000001.jpg"):
            ImageDataset(paths, labels, image_transform(64, False))[0]
    # and through run.py: a clear message, exit code 2, no traceback in a worker
    code = run.main(["--data", "voc", "--data-root", str(tmp_path), "--clip",
                     _save_clip(tmp_path / "tiny.pt"), "--image-size", "64",
                     "--epochs", "1", "--workers", "1", "--out", str(tmp_path / "o")])
    assert code == 2


@pytest.mark.parametrize("content,message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"images": []}), "missing or malformed field"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "person"}],
                 "annotations": [{"id": 7, "image_id": 1, "category_id": 99}]}), "category id 99"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "person"}],
                 "annotations": [{"id": 7, "image_id": 5, "category_id": 1}]}), "names image 5"),
])
def test_malformed_coco_annotations_are_named(tmp_path, content, message):
    os.makedirs(tmp_path / "annotations")
    (tmp_path / "annotations" / "instances_train2014.json").write_text(content)
    with pytest.raises(DataError, match=message):
        load_coco(str(tmp_path), "train2014")


def _broken_jpeg(path):
    """A JPEG cut in half: its header is valid, only a decode finds it truncated."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


@pytest.mark.parametrize("cached,pipeline", [(False, "pil"), (True, "pil"),
                                            pytest.param(True, "device", marks=pytest.mark.slow)])
def test_unreadable_image_is_one_line_before_the_first_epoch(tmp_path, capfd, monkeypatch, cached, pipeline):
    """With worker processes, a truncated test image stops the run before training starts, with one line
    naming it, exit status 2, and no run folder (with --pipeline device it fails to decode in the main
    process)."""
    voc, argv = _tiny_voc_run(tmp_path, "--cache-features" if cached else "--no-cache-features",
                              "--workers", "2", "--pipeline", pipeline)
    _broken_jpeg(os.path.join(voc, "JPEGImages", "000002.jpg"))
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_here(capfd, *argv)
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "000002.jpg" in lines[0] and "Traceback" not in err, err
    assert "epoch   1" not in out
    assert not (tmp_path / "out").exists()


def test_decoding_check_names_every_kind_of_broken_image(tmp_path):
    good = tmp_path / "good.jpg"
    _jpeg(str(good), (10, 200, 30))
    check_decodable([str(good)] * 3, workers=0)
    buf = good.read_bytes()
    for name, content in (("empty.jpg", b""), ("text.jpg", b"not an image at all"),
                          ("cut.jpg", buf[: len(buf) // 2])):
        (tmp_path / name).write_bytes(content)
        for workers in (0, 2):
            message = f"1 of 3 images do not decode; the first: cannot read the image .*{name}"
            with pytest.raises(DataError, match=message):
                check_decodable([str(good), str(tmp_path / name), str(good)], workers=workers)


# --- output folders, bugs, partial files

@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
def test_unwritable_output_folder_fails_first(tmp_path, capfd, monkeypatch, option):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_here(capfd, *DEMO, "--epochs", "1", "--out", str(tmp_path / "o"),
                               "--cache-dir", str(tmp_path / "c"), option, str(tmp_path / "a-file" / "sub"))
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and option in err and "a-file" in err and "not a folder" in err
    assert "generating" not in out  # refused before any data was made or loaded
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only folder")
def test_read_only_output_folder_fails_first(tmp_path, capfd, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    monkeypatch.chdir(tmp_path)
    code, _, err = _run_here(capfd, *DEMO, "--epochs", "1", "--out", str(ro / "run"))
    assert code == 2 and "not writable" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the project's own errors become one line; a ValueError from a bug is not swallowed."""
    def broken(*args, **kwargs):
        raise ValueError("a bug, not bad input")
    monkeypatch.setattr(run, "build_head", broken)
    with pytest.raises(ValueError, match="a bug"):
        run.main([*DEMO, "--epochs", "1", "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")])


def test_failed_start_leaves_nothing(tmp_path, monkeypatch):
    """A checkpoint that cannot be read, found after the data loaded: no run folder, no mask.pt."""
    voc, argv = _tiny_voc_run(tmp_path, "--workers", "0")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    argv[argv.index("--clip") + 1] = str(bad)
    assert run.main(argv) == 2
    assert not (tmp_path / "out").exists()
    # --download without network: the data folder it would have made is not left behind either

    class NoNetwork:
        def __init__(self, root, **kwargs):
            os.makedirs(os.path.join(root, "VOCdevkit"), exist_ok=True)  # torchvision makes its folders first
            raise OSError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torchvision.datasets, "VOCDetection", NoNetwork)
    code = run.main(["--data", "voc", "--download", "--data-root", str(tmp_path / "data" / "voc2007"),
                     "--out", str(tmp_path / "out2"), "--workers", "0"])
    assert code == 2
    assert not (tmp_path / "data").exists()  # not even the empty data/ above data/voc2007/
    assert not (tmp_path / "out2").exists()


def test_save_atomic_never_leaves_a_partial_file(tmp_path):
    path = tmp_path / "x.pt"
    save_atomic({"a": 1}, str(path))

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        save_atomic({"a": Boom()}, str(path))
    assert torch.load(path) == {"a": 1} and os.listdir(tmp_path) == ["x.pt"]


# --- the other commands

def test_analysis_failures_are_one_line_and_early(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    for command in (["zeroshot"], ["negation"], ["maps", "--index", "0"]):
        assert analysis.main([*command, *DEMO_ARGS, "--out", str(tmp_path / "a-file" / "x")]) == 2
        err = capsys.readouterr().err
        assert "--out" in err and "not a folder" in err, (command, err)
    assert analysis.main(["zeroshot", *DEMO_ARGS, "--cache-features", "--cache-dir",
                          str(tmp_path / "a-file" / "c"),
                          "--out", str(tmp_path / "z")]) == 2
    assert "--cache-dir" in capsys.readouterr().err
    assert analysis.main(["zeroshot", *DEMO_ARGS, "--presence", "a photo", "--out", str(tmp_path / "z")]) == 2
    assert "exactly one {}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_sweep_rejects_bad_labels(capsys):
    assert analysis.main(["sweep", "--labels", "0.5", "1.5", *DEMO_ARGS]) == 2
    assert "--labels 1.5" in capsys.readouterr().err


def test_switches_refuse_the_options_they_set(capsys):
    assert analysis.main(["switches", *DEMO_ARGS, "--loss-weight", "0.03"]) == 2
    assert "--loss-weight" in capsys.readouterr().err


def test_pretrain_command_refuses_bad_options_in_one_line(capsys):
    for argv, words in ((["--steps", "0"], "--steps 0 must be at least 1"),
                        (["--image-size", "100"], "multiple of 32"),
                        (["--lr", "nan"], "--lr nan must be a finite number > 0")):
        with pytest.raises(SystemExit) as stop:
            pretrain.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1 and words in err, err


# ===========================================================================================================
# 6. the feature cache
# Dense features computed once and kept on disk: equal to direct encoding, keyed (checkpoint, resolution,
# transform, seed, device), refused when they do not match, and resumable after an interrupt or a kill.
# ===========================================================================================================

SIZE, N = 64, 16


CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo():
    """(PIL images, (N, C) labels, miniature CLIP, (N, L, D) plain-view features from encode_dense directly).
    """
    images, labels = demo_split(N, seed=0, size=SIZE)  # generated once for the module
    plain = image_transform(SIZE, train=False)
    batch = torch.stack([plain(im) for im in images])  # (N, 3, S, S)
    model = tiny_clip(batch, resolution=SIZE)
    with torch.no_grad():
        direct = model.encode_dense(batch)
    return images, labels, model, direct


def key_for(split="test", view="plain", sha="a" * 64, size=SIZE, model=None):
    key = {"clip": "test", "clip_sha256": sha, "data": "demo", "image_size": size, "data_root": "/nowhere",
           "split": split, "view": view}
    return key if model is None else {**key, "weights": cache_features.weights_fingerprint(model)}


def enc(model):
    """The frozen encoder as run.py calls it on the CPU: images -> fp32 dense features, no graph."""
    def encode(images):
        with torch.no_grad():
            return model.encode_dense(images).float()
    return encode


def dataset(demo, train=False):
    return ImageDataset(demo[0], demo[1], image_transform(SIZE, train=train))


def count_calls(model):
    """Wraps model.encode_dense in an instance attribute that counts its calls; returns the counter."""
    calls = {"n": 0}
    original = type(model).encode_dense.__get__(model)

    def counted(images):
        calls["n"] += 1
        return original(images)
    model.encode_dense = counted
    return calls


def test_cached_features_equal_direct_encoding(demo, tmp_path):
    *_, model, direct = demo
    stored = cache_features.encode_split(dataset(demo), 1, enc(model), batch_size=10, workers=0,
                                         cache_dir=tmp_path,
                            key=key_for())
    assert stored.features.shape == (1, N, *direct.shape[1:]) and stored.features.dtype == np.float16
    cached = torch.from_numpy(np.array(stored.features[0])).float()
    # fp16 storage
    torch.testing.assert_close(cached, direct, rtol=2e-3, atol=2e-3 * direct.abs().max().item())
    features, labels, index = stored[5]
    assert torch.equal(features, cached[5].half()) and torch.equal(labels, demo[1][5]) and index == 5
    # a second run reuses the disk cache without encoding anything
    calls = count_calls(model)
    again = cache_features.encode_split(dataset(demo), 1, enc(model), batch_size=10, workers=0,
                                        cache_dir=tmp_path,
                           key=key_for())
    del model.encode_dense
    assert calls["n"] == 0 and np.array_equal(again.features, stored.features)
    assert len(os.listdir(tmp_path)) == 1


def test_augmented_views_reproducible_and_served_by_epoch(demo, tmp_path):
    *_, model, direct = demo
    cached = cache_features.encode_split(dataset(demo, train=True), 3, enc(model), batch_size=8, workers=0,
                            cache_dir=tmp_path, key=key_for("train", "augmented"))
    # another build, in 2 worker processes: each view is a function of (view, image) alone
    again = cache_features.encode_split(dataset(demo, train=True), 3, enc(model), batch_size=8, workers=2,
                                        cache_dir=tmp_path / "again", key=key_for("train", "augmented"))
    assert np.array_equal(np.asarray(cached.features), np.asarray(again.features))
    views = torch.from_numpy(np.array(cached.features)).float()  # (K, N, L, D)
    for a, b in [(0, 1), (0, 2), (1, 2)]:
        assert (views[a] - views[b]).abs().amax(dim=(1, 2)).min() > 1e-2  # every image augmented differently
    assert (views[0] - direct).abs().amax(dim=(1, 2)).min() > 1e-2  # and unlike its plain view
    for epoch in (0, 4, 8):  # item epoch·N + i (augment.EpochSampler's) is view epoch mod 3 of image i
        features, label, index = cached[epoch * N + 7]
        assert torch.equal(features, views[epoch % 3, 7].half()) and index == 7 and torch.equal(label,
                                                                                                demo[1][7])


@pytest.mark.parametrize("field, value", [("clip_sha256", "b" * 64), ("image_size", 96)])
def test_cache_of_another_checkpoint_or_resolution_is_never_used(demo, tmp_path, field, value):
    *_, model, direct = demo
    cache_features.encode_split(dataset(demo), 1, enc(model), batch_size=10, workers=0, cache_dir=tmp_path,
                                key=key_for())
    other = {**key_for(), field: value}
    # another checkpoint gets its own folder: built afresh, not read from the first one
    calls = count_calls(model)
    cache_features.encode_split(dataset(demo), 1, enc(model), batch_size=10, workers=0, cache_dir=tmp_path,
                                key=other)
    del model.encode_dense
    assert calls["n"] > 0 and len(os.listdir(tmp_path)) == 2
    # a folder copied under the other key's name (or a hash collision) is refused, naming the field
    target = cache_features.cache_folder(tmp_path, cache_features.cache_key(other, dataset(demo), 1))
    source = cache_features.cache_folder(tmp_path, cache_features.cache_key(key_for(), dataset(demo), 1))
    shutil.rmtree(target)
    shutil.copytree(source, target)
    with pytest.raises(ValueError, match=f"{field}=.*delete that folder"):
        cache_features.encode_split(dataset(demo), 1, enc(model), batch_size=10, workers=0,
                                    cache_dir=tmp_path, key=other)


def test_cache_of_another_transform_is_never_used(demo, tmp_path):
    """The same caller key with another transform (say, augmentation switched on) gets its own folder."""
    *_, model, _ = demo
    plain = cache_features.encode_split(dataset(demo), 1, enc(model), 10, 0, cache_dir=tmp_path,
                                        key=key_for("train"))
    augmented = cache_features.encode_split(dataset(demo, train=True), 1, enc(model), 10, 0,
                                            cache_dir=tmp_path,
                               key=key_for("train"))
    assert len(os.listdir(tmp_path)) == 2 and not np.array_equal(plain.features, augmented.features)


def test_cache_refuses_to_fill_the_disk(demo, tmp_path, monkeypatch):
    *_, model, _ = demo
    monkeypatch.setattr(cache_features.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=10**12, used=10**12, free=1000))
    with pytest.raises(ValueError, match="cache-views"):
        cache_features.encode_split(dataset(demo), 1, enc(model), 10, 0, cache_dir=tmp_path, key=key_for())


def test_random_model_is_fingerprinted(demo, tmp_path):
    """Without a checkpoint sha256 (the demo's random CLIP) the key holds a hash of the weights."""
    *_, model, _ = demo
    other = tiny_clip(resolution=SIZE, seed=1)
    args = cli.parse_args(["--data", "demo"])
    keys = [cli.feature_key(args, {"name": "random-tiny", "sha256": None}, m) for m in (model, other)]
    assert keys[0]["weights"] != keys[1]["weights"]  # run.py's key names an unsaved model by its weights
    assert "weights" not in cli.feature_key(args, {"name": "x.pt", "sha256": "a" * 64}, model)
    with pytest.raises(AssertionError, match="names the CLIP"):  # a key that names no weights at all
        cache_features.cache_key(key_for(sha=None), dataset(demo), 1)
    mine, theirs = key_for(sha=None, model=model), key_for(sha=None, model=other)
    first = cache_features.encode_split(dataset(demo), 1, enc(model), 10, 0, cache_dir=tmp_path, key=mine)
    second = cache_features.encode_split(dataset(demo), 1, enc(other), 10, 0, cache_dir=tmp_path, key=theirs)
    assert len(os.listdir(tmp_path)) == 2 and not np.array_equal(first.features, second.features)
    target = cache_features.cache_folder(tmp_path, cache_features.cache_key(theirs, dataset(demo), 1))
    shutil.rmtree(target)
    mine_folder = cache_features.cache_folder(tmp_path, cache_features.cache_key(mine, dataset(demo), 1))
    shutil.copytree(mine_folder, target)
    with pytest.raises(ValueError, match="weights="):
        cache_features.encode_split(dataset(demo), 1, enc(other), 10, 0, cache_dir=tmp_path, key=theirs)


def test_augmented_feature_caches_are_kept_apart_by_seed(tmp_path):
    """The feature cache's augmented views are drawn under the run's seed, so the seed is part of their key: a
    run with another seed builds its own views, the same seed reuses them; plain views (test split, no
    augmentation) are shared by every seed."""
    base = [*DEMO, "--demo-images", "12", "--image-size", "64", "--epochs", "1", "--augment",
            "--cache-views", "2", "--cache-dir", str(tmp_path / "c")]
    for seed, out in ((0, "a"), (1, "b"), (0, "c")):
        assert run.main([*base, "--seed", str(seed), "--out", str(tmp_path / out)]) == 0
    folders = sorted(d.name for d in (tmp_path / "c").iterdir())
    train = [f for f in folders if "-train-" in f]
    assert len(train) == 2 and len([f for f in folders if "-test-" in f]) == 1
    keys = [json.loads((tmp_path / "c" / f / "meta.json").read_text())["key"] for f in train]
    assert sorted(k["seed"] for k in keys) == [0, 1]
    assert all(k["device"] == "cpu" and k["precision"] == "fp32" for k in keys)
    features = [np.load(tmp_path / "c" / f / "features.npy") for f in train]
    assert not np.array_equal(features[0], features[1])
    a, c = (json.loads((tmp_path / r / "results.json").read_text()) for r in ("a", "c"))
    assert a["map"] == c["map"]


def test_feature_key_names_the_device_type_and_precision(monkeypatch):
    """bf16 features from a GPU are never served to an fp32 CPU run: the key differs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = {"name": "x.pt", "sha256": "a" * 64}
    cpu, gpu = (cli.feature_key(cli.parse_args(["--device", d]), info, None) for d in ("cpu", "cuda:1"))
    assert (cpu["device"], cpu["precision"]) == ("cpu", "fp32")
    assert (gpu["device"], gpu["precision"]) == ("cuda", "bf16 autocast")


def test_cache_build_pins_memory_only_for_a_cuda_run(tmp_path, monkeypatch):
    """The build's loader pins memory as the run's own loader does: by the run's device, not by whether this
    machine has CUDA (a --device cpu run on a GPU machine must not pin, nor decode on the GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    real = torch.utils.data.DataLoader

    class Recording(real):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("pin_memory"))
            super().__init__(*args, **{**kwargs, "pin_memory": False})
    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    ds = ImageDataset(demo_split(4, 0, 64)[0], demo_split(4, 0, 64)[1], image_transform(64, False))
    encode = lambda images: torch.zeros(len(images), 5, 8)
    cache_features.encode_split(ds, 1, encode, 2, 0, str(tmp_path / "cpu"), key_for(), pin_memory=False)
    cache_features.encode_split(ds, 1, encode, 2, 0, str(tmp_path / "gpu"), key_for(), pin_memory=True)
    assert seen and seen[0] is False and seen[-1] is True


def test_interrupted_cache_build_resumes(demo, tmp_path):
    *_, model, _ = demo
    key = key_for("train", "augmented")
    reference = cache_features.encode_split(dataset(demo, True), 2, enc(model), 5, 0,
                                            cache_dir=tmp_path / "a", key=key)
    chunks = 2 * -(-N // 5)  # 2 views of 4 chunks (5 + 5 + 5 + 1 images)

    calls = count_calls(model)  # the first call is the shape probe, then one per chunk
    original = model.encode_dense

    def failing(images):
        if calls["n"] == 1 + 3:
            raise KeyboardInterrupt  # as if the build were stopped during its fourth chunk
        return original(images)
    model.encode_dense = failing
    with pytest.raises(KeyboardInterrupt):
        cache_features.encode_split(dataset(demo, True), 2, enc(model), 5, 0, cache_dir=tmp_path / "b",
                                    key=key)
    folder = cache_features.cache_folder(tmp_path / "b",
                                         cache_features.cache_key(key, dataset(demo, True), 2))
    assert torch.load(os.path.join(folder, "done.pt")).sum() == 3
    assert '"complete": false' in open(os.path.join(folder, "meta.json")).read()
    # resumed with another batch size: the first attempt's chunk grid is kept, finished chunks are not redone
    calls["n"] = 0
    model.encode_dense = original
    resumed = cache_features.encode_split(dataset(demo, True), 2, enc(model), 7, 0, cache_dir=tmp_path / "b",
                                          key=key)
    del model.encode_dense
    assert calls["n"] == chunks - 3
    assert np.array_equal(np.asarray(resumed.features), np.asarray(reference.features))
    assert '"complete": true' in open(os.path.join(folder, "meta.json")).read()


@pytest.mark.slow
def test_killed_cache_build_resumes(demo, tmp_path):
    """A build in another process, SIGKILLed after two chunks, resumes here to the uninterrupted bytes."""
    images, labels, model, _ = demo
    np.save(tmp_path / "images.npy", np.stack([np.asarray(im) for im in images]))
    torch.save(labels, tmp_path / "labels.pt")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    script = textwrap.dedent(f"""
        import sys, time, numpy as np, torch
        from PIL import Image
        sys.path.insert(0, {REPO!r})
        from clipmlr import cache as cache_features
        from clipmlr.data import ImageDataset
        from clipmlr.augment import image_transform
        from clipmlr.demo import tiny_clip
        model = tiny_clip(resolution={SIZE})
        model.load_state_dict(torch.load({str(tmp_path / "clip.pt")!r}))
        slow = model.encode_dense
        def encode(x):
            time.sleep(0.3)
            return slow(x)
        model.encode_dense = encode
        images = [Image.fromarray(a) for a in np.load({str(tmp_path / "images.npy")!r})]
        labels = torch.load({str(tmp_path / "labels.pt")!r})
        data = ImageDataset(images, labels, image_transform({SIZE}, True))
        cache_features.encode_split(data, 2, lambda x: model.encode_dense(x).float(), 4, 0,
                                    cache_dir={str(tmp_path / "b")!r}, key={key_for("train", "augmented")!r})
    """)
    images = [Image.fromarray(np.asarray(im)) for im in images]  # what the child sees
    data = ImageDataset(images, labels, image_transform(SIZE, True))
    folder = cache_features.cache_folder(tmp_path / "b",
                                         cache_features.cache_key(key_for("train", "augmented"), data, 2))
    child = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if torch.load(os.path.join(folder, "done.pt")).sum() >= 2:
                    break
            except (OSError, RuntimeError, EOFError):
                pass
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    done = int(torch.load(os.path.join(folder, "done.pt")).sum())
    assert 2 <= done < 8, f"the child finished {done} of 8 chunks before it was killed"
    calls = count_calls(model)
    resumed = cache_features.encode_split(data, 2, enc(model), 4, 0, cache_dir=tmp_path / "b",
                                          key=key_for("train", "augmented"))
    del model.encode_dense
    assert calls["n"] == 8 - done
    reference = cache_features.encode_split(data, 2, enc(model), 4, 0, cache_dir=tmp_path / "uninterrupted",
                                            key=key_for("train", "augmented"))
    assert np.array_equal(np.asarray(resumed.features), np.asarray(reference.features))


# ===========================================================================================================
# 7. resume and checkpoints: killed, interrupted, non-finite, other settings
# A run stopped anywhere resumes to the uninterrupted result; what cannot be resumed is refused in words.
# ===========================================================================================================

@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    # both runs in subprocesses, so that they compute with the same number of threads
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *SMALL, "--out", str(straight)],
                   cwd=str(tmp_path),
                   check=True, capture_output=True, timeout=300)
    expected = json.loads((straight / "results.json").read_text())

    out = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), *SMALL, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    ckpt = out / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and torch.load(ckpt, weights_only=False)["epoch"] >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    log = proc.communicate()[0]
    assert ckpt.exists(), log
    killed_at = torch.load(ckpt, weights_only=False)["epoch"]
    assert 2 <= killed_at < 6, f"the run was not killed mid-way (checkpoint after epoch {killed_at})"
    assert not (out / "results.json").exists()
    assert run.main([*SMALL, "--out", str(out)]) == 2  # a new run into the same folder is refused ...
    code, _, err = _run_cli(*SMALL, "--out", str(out), "--resume", cwd=str(tmp_path))  # ... resuming is not
    assert code == 0, err
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["map"] == expected["map"]  # bit for bit: every epoch re-seeds from (seed, epoch)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in expected["history"]]
    a, b = torch.load(out / "head.pt")["state_dict"], torch.load(straight / "head.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    argv = [*SMALL, "--epochs", "1", "--out", out]
    assert run.main(argv) == 0
    assert run.main(argv) == 2  # same folder without --resume: a finished run is not overwritten
    assert "already holds a finished run" in capsys.readouterr().err
    for change, word in ((["--labels", "0.5"], "labels"), (["--seed", "3"], "seed"),
                         (["--head", "dual"], "head")):
        assert run.main([*argv, "--resume", *change]) == 2
        err = capsys.readouterr().err
        assert "different settings" in err and word in err, err
    # --resume where nothing was saved yet (a run stopped in its first epoch) starts at epoch 1, saying so
    assert run.main([*argv, "--out", str(tmp_path / "none"), "--resume"]) == 0
    assert "no checkpoint in" in capsys.readouterr().out and (tmp_path / "none" / "results.json").exists()


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    argv = [*SMALL, "--head", "baseline", "--epochs", "3", "--batch-size", "48", "--out", str(out)]
    calls = []
    real_loss = run.asymmetric_loss

    def loss_that_explodes_in_epoch_2(logits, targets):  # one batch per epoch: call 2 is epoch 2
        calls.append(1)
        return real_loss(logits, targets) * (float("nan") if len(calls) >= 2 else 1.0)
    monkeypatch.setattr(run, "asymmetric_loss", loss_that_explodes_in_epoch_2)
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "loss became nan in epoch 2" in err and "checkpoint.pt" in err, err
    assert not (out / "results.json").exists()
    kept = torch.load(out / "checkpoint.pt", weights_only=False)
    assert kept["epoch"] == 1 and all(torch.isfinite(v).all() for v in kept["head"].values())
    # in the first epoch there is no checkpoint yet, and the message does not name one
    calls.extend([1] * 5)
    assert run.main([*argv[:-1], str(tmp_path / "first")]) == 2
    err = capsys.readouterr().err
    assert "loss became nan in epoch 1" in err and "no checkpoint" in err and "checkpoint.pt" not in err, err


def test_stale_temporary_files_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "r"
    argv = [*SMALL, "--epochs", "1", "--out", str(out)]
    assert run.main(argv) == 0
    stale = out / "checkpoint.pt.4242-0badcafe.tmp"
    stale.write_bytes(b"half a checkpoint")  # as a kill during a write leaves it
    assert run.main([*argv, "--resume"]) == 0
    assert not stale.exists() and sorted(os.listdir(out)) == ["checkpoint.pt", "head.pt", "mask.pt",
                                                              "results.json"]


def test_interrupt_in_the_first_epoch_then_resume_works(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    argv = [*SMALL, "--epochs", "2", "--out", str(out)]

    def interrupted(logits, targets):
        raise KeyboardInterrupt
    real = run.asymmetric_loss
    monkeypatch.setattr(run, "asymmetric_loss", interrupted)
    assert run.main(argv) == 130
    err = capsys.readouterr().err
    assert "the same command plus --resume" in err
    monkeypatch.setattr(run, "asymmetric_loss", real)
    assert run.main([*argv, "--resume"]) == 0  # what the message said works
    assert "no checkpoint in" in capsys.readouterr().out
    assert len(_strict_json(out / "results.json")["history"]) == 2


def test_resume_after_a_stop_during_the_cache_build_keeps_the_cache(tmp_path, monkeypatch, capsys):
    out, cache_dir = tmp_path / "r", tmp_path / "cache"
    argv = [*DEMO, "--demo-images", "48", "--image-size", "64", "--batch-size", "8", "--epochs", "1",
            "--out", str(out), "--cache-dir", str(cache_dir)]
    calls = {"n": 0}
    real = cache_features.SeededViews.__getitem__

    def stop_after_some(self, j):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real(self, j)
    monkeypatch.setattr(cache_features.SeededViews, "__getitem__", stop_after_some)
    assert run.main(argv) == 130
    assert not out.exists()  # nothing written into the run's folder yet
    capsys.readouterr()
    monkeypatch.setattr(cache_features.SeededViews, "__getitem__", real)
    assert run.main([*argv, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "no checkpoint in" in printed and "resuming the feature cache" in printed
    assert (out / "results.json").exists()


# ===========================================================================================================
# 8. torchrun
# Two gloo processes on the CPU give the one-process run; devices are made current as asked.
# ===========================================================================================================

def _torchrun(tmp_path, *argv):
    """run.py under torchrun with two CPU processes: (exit code, stdout, stderr); leaves no worker behind."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "run.py"), *argv]
    p = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, stdout, stderr


@pytest.mark.slow
def test_torchrun_user_errors_are_one_line_on_every_rank(tmp_path):
    """Under torchrun a broken image in rank 1's share, or a damaged cache that rank 0 opens, stops both ranks
    with the same one-line error (not a traceback of the lost connection on the other rank), and --out is
    not written."""
    _make_folder(str(tmp_path / "data"))
    _broken_jpeg(str(tmp_path / "data" / "photos" / "test5.jpg"))  # the last image: rank 1's share
    base = ["--data", "folder", "--data-root", str(tmp_path / "data"), "--clip",
            _save_clip(tmp_path / "c.pt"), "--image-size", "64", "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--n-ctx", "2"]
    code, _, err = _torchrun(tmp_path, *base, "--no-cache-features", "--out", str(tmp_path / "broken"))
    assert code != 0 and err.count("error: 1 of 16 images do not decode") == 2, err[-3000:]
    # (torchrun's own launcher then reports its failed children, with a traceback of its own: not ours)
    ours = re.search(rf'File "{re.escape(ROOT)}/(run\.py|clipmlr/)', err)  # a frame of run.py or clipmlr
    assert not ours and "Gloo" not in err, err[-3000:]
    assert not (tmp_path / "broken").exists()
    (tmp_path / "data" / "photos" / "test5.jpg").unlink()
    _jpeg(str(tmp_path / "data" / "photos" / "test5.jpg"), (1, 2, 3), size=(40, 30))
    assert run.main([*base, "--cache-features", "--cache-dir", str(tmp_path / "cache"),
                     "--out", str(tmp_path / "one")]) == 0
    for folder in (tmp_path / "cache").iterdir():
        (folder / "done.pt").write_bytes(b"damaged")
    code, _, err = _torchrun(tmp_path, *base, "--cache-features", "--cache-dir", str(tmp_path / "cache"),
                             "--out", str(tmp_path / "damaged"))
    assert code != 0 and err.count("is unreadable") == 2, err[-3000:]
    ours = re.search(rf'File "{re.escape(ROOT)}/(run\.py|clipmlr/)', err)  # a frame of run.py or clipmlr
    assert not ours and "Gloo" not in err, err[-3000:]
    assert not (tmp_path / "damaged").exists()


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path):
    base = ["--head", "positive", "--data", "demo", "--demo-images", "64", "--epochs", "4",
            "--batch-size", "8", "--workers", "0"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "run.py"), *base, "--out", str(tmp_path / "two"), "--cache-dir",
           str(tmp_path / "c2")]
    p = subprocess.Popen(cmd, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=600)
    finally:  # never leave workers behind, whatever happened
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert stdout.count("mAP") == 2  # printed by rank 0 only: the last epoch and the summary
    assert run.main([*base, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")]) == 0
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["processes"] == 2 and os.listdir(tmp_path / "two").count("results.json") == 1
    # the cache rank 0 built while rank 1 waited equals the one built alone
    for split in ("train", "test"):
        [a] = [d for d in os.listdir(tmp_path / "c1") if f"-{split}-" in d]
        [b] = [d for d in os.listdir(tmp_path / "c2") if f"-{split}-" in d]
        assert a == b  # the same key
        fa, fb = (np.load(tmp_path / c / a / "features.npy") for c in ("c1", "c2"))
        np.testing.assert_allclose(fa.astype(np.float32), fb.astype(np.float32), atol=2e-3, rtol=2e-3)
        assert json.loads((tmp_path / "c2" / b / "meta.json").read_text())["complete"]
    # the same global batches (cached features, the same permutation): equal up to float summation order
    assert abs(two["map"] - one["map"]) < 0.01, (one["map"], two["map"])
    for a, b in zip(one["history"], two["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)


def test_use_device_makes_an_indexed_cuda_device_current(demo_run, monkeypatch, capsys):
    """distributed.use_device, which run.py (one process) and predict both call; CUDA is faked here."""
    used, real = [], distributed.use_device
    monkeypatch.setattr(distributed, "use_device", lambda name: used.append(name) or real(name))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.setup("cpu") == (0, 1, torch.device("cpu")) and used == ["cpu"]
    assert predict.main([demo_run[0], demo_run[1][0], "--device", "cpu", "--workers", "0"]) == 0
    assert used == ["cpu", "cpu"]
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
    assert real("cpu") == torch.device("cpu") and made_current == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert real("cuda:1") == torch.device("cuda", 1) and made_current == [torch.device("cuda", 1)]
    made_current.clear()
    assert real("cuda") == torch.device("cuda", 3)
    assert set(made_current) <= {torch.device("cuda", 3)}  # already current: made current again at most


# ===========================================================================================================
# 9. pipelines: where images are decoded and augmented (--pipeline pil / tensor / device)
# The tensor and device pipelines draw the PIL pipeline's augmentations, batch for batch, and train the same.
# ===========================================================================================================

def test_tensor_pipeline_draws_the_same_policy_and_is_deterministic(tmp_path, monkeypatch):
    """--pipeline tensor: uint8 tensors decoded by torchvision.io, the same random draws as the PIL pipeline
    under the same seed (operations, levels, Cutout), images of the right shape, dtype and range."""
    path = str(tmp_path / "x.jpg")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (75, 100, 3), dtype=np.uint8)).save(path, quality=95)
    calls = {"pil": [], "tensor": []}
    real = augment.apply_authors_op
    for pipeline in ("pil", "tensor"):
        transform = image_pipeline(64, True, pipeline=pipeline)
        read = read_tensor if pipeline == "tensor" else lambda p: Image.open(p).convert("RGB")

        def recording(image, op, level, pipeline=pipeline):
            calls[pipeline].append((op, level, type(image).__name__))
            return real(image, op, level)
        monkeypatch.setattr(augment, "apply_authors_op", recording)
        outputs = []
        for j in range(40):
            with augment.seeded(j):
                outputs.append(transform(read(path)))
        assert all(x.shape == (3, 64, 64) and x.dtype == torch.float32 for x in outputs)
        lo = (0 - max(augment.MEAN)) / min(augment.STD)
        hi = (1 - min(augment.MEAN)) / min(augment.STD)
        assert all(lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4 for x in outputs)
        with augment.seeded(7):
            assert torch.equal(transform(read(path)), outputs[7])  # deterministic under the same seed
    assert [c[:2] for c in calls["pil"]] == [c[:2] for c in calls["tensor"]] and len(calls["pil"]) > 20
    assert {c[2] for c in calls["tensor"]} == {"Tensor"} and {c[2] for c in calls["pil"]} == {"Image"}


def test_tensor_pipeline_trains_the_same_with_any_workers(tmp_path):
    _, argv = _tiny_voc_run(tmp_path, "--no-cache-features", "--pipeline", "tensor", "--epochs", "2")
    losses = []
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        argv[argv.index("--out") + 1] = str(out)
        assert run.main([*argv, "--workers", workers]) == 0
        result = _strict_json(out / "results.json")
        assert result["settings"]["pipeline"] == "tensor"
        losses.append([h["loss"] for h in result["history"]] + [result["map"]])
    assert losses[0] == losses[1]


def test_device_pipeline_gives_the_tensor_pipelines_batches_bit_for_bit(tmp_path):
    """--pipeline device: workers hand over bytes, the batch is decoded and augmented on the device (here the
    CPU). JPEG (colour and grey), PNG and in-memory images, plain and augmented, 0 and 2 workers: the batches
    equal the tensor pipeline's (itself tested for the PIL pipeline's draws), labels and indices included."""
    images, labels = demo_split(9, 0, 120)
    paths = []
    for i, im in enumerate(images):
        path = str(tmp_path / f"{i}.{'png' if i % 3 == 0 else 'jpg'}")
        (im.convert("L") if i % 4 == 1 else im).crop((0, 0, 120 - 7 * i, 90 + 5 * i)).save(path)
        paths.append(path)
    for train in (False, True):
        for data in (paths, images):
            tensor = SeededViews(ImageDataset(data, labels, image_pipeline(48, train, pipeline="tensor")), 2)
            device = SeededViews(ImageDataset(data, labels, image_pipeline(48, train, pipeline="device")), 2)
            for workers in (0, 2):
                want = list(torch.utils.data.DataLoader(tensor, batch_size=4, num_workers=workers))
                got = list(torch.utils.data.DataLoader(device, batch_size=4, num_workers=workers,
                                                       collate_fn=collate))
                assert len(got) == len(want) == 5
                for (a, ya, ia), (raw, yb, ib) in zip(want, got):
                    assert isinstance(raw, RawBatch) and len(raw) == len(ia)
                    b = raw.to("cpu", memory_format=torch.channels_last)
                    assert b.dtype == torch.float32 and b.is_contiguous(memory_format=torch.channels_last)
                    assert torch.equal(a, b), (train, workers, (a - b).abs().max())
                    assert torch.equal(ya, yb) and torch.equal(ia, ib)
    assert not torch.equal(want[0][0], want[2][0][:4])  # epoch 2's views are not epoch 1's


def test_device_pipeline_runs_in_the_loaders_pin_memory_step():
    """On CUDA (pin_memory=True) the DataLoader's pin-memory thread hands each batch to torch's pin_memory(),
    which calls RawBatch.pin_memory(): the batch is decoded and augmented there, in the background, and a
    Ready batch goes on to the loop. Through that same torch function here (CPU): the very batch .to() would
    make."""
    from torch.utils.data._utils.pin_memory import pin_memory
    images, labels = demo_split(6, 0, 100)
    data = SeededViews(ImageDataset(images, labels, image_pipeline(32, True, pipeline="device")), 2)
    batch = collate([data[j] for j in range(6, 12)])
    # (labels and indices are pinned as any tensor: not on a machine without GPU)
    ready = pin_memory(batch[0])
    assert isinstance(ready, Ready) and len(ready) == 6
    want = batch[0].to("cpu")
    got = ready.to("cpu", non_blocking=True, memory_format=torch.channels_last)  # as run.py's encode asks
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)


def test_device_pipeline_falls_back_to_the_cpu_for_images_not_for_a_failing_gpu(tmp_path, monkeypatch,
                                                                                capsys):
    """The batched JPEG decode (nvJPEG on CUDA) decodes all or nothing: when it refuses an image
    (torchvision's words for that, from its CUDA decoder's source), every image of the batch is decoded on the
    CPU instead, to the same pixels, counted and announced on stderr; when the device itself fails (out of
    memory, a decoder that cannot start, also when torchvision wraps those in its own RuntimeError), that
    error goes up unchanged instead of being hidden behind a slow fallback."""
    images, _ = demo_split(3, 0, 80)
    for i, im in enumerate(images):
        im.save(tmp_path / f"{i}.jpg", quality=90)
    transform = pipelines.image_pipeline(32, False, pipeline="device")
    batch = pipelines.collate([(transform(str(tmp_path / f"{i}.jpg")), 0, i) for i in range(3)])[0]
    want = batch.to("cpu")
    real = torchvision.io.decode_jpeg
    monkeypatch.setattr(pipelines, "CPU_FALLBACKS", {"batches": 0, "images": 0})
    for refusal in ("Failed to get image info: 2",
                    "Error while decoding JPEG images: Failed to decode batch: 6"):
        def refuses(*args, refusal=refusal, **kwargs):
            raise RuntimeError(refusal)
        monkeypatch.setattr(torchvision.io, "decode_jpeg", refuses)
        assert torch.equal(batch.to("cpu"), want)  # the CPU's decoder, image by image
    assert pipelines.CPU_FALLBACKS == {"batches": 2, "images": 6}
    notes = capsys.readouterr().err.strip().splitlines()
    assert len(notes) == 2 and "refused 1 batch(es) so far (3 images)" in notes[0] and "Failed to get image" \
        in notes[0] and "refused 2 batch(es) so far (6 images)" in notes[1]
    for failure in (torch.OutOfMemoryError("CUDA out of memory"),
                    RuntimeError("CUDA error: an illegal access"),
                    RuntimeError("Error while decoding JPEG images: CUDA out of memory. "
                                 "Tried to allocate 2 MiB"),
                    RuntimeError("Failed to initialize nvjpeg with hardware backend: 5")):
        def fails(*args, failure=failure, **kwargs):
            raise failure
        monkeypatch.setattr(torchvision.io, "decode_jpeg", fails)
        with pytest.raises(type(failure), match=str(failure)[:20]):
            batch.to("cpu")
    assert pipelines.CPU_FALLBACKS["batches"] == 2
    monkeypatch.setattr(torchvision.io, "decode_jpeg", real)


def test_device_pipeline_augments_each_item_under_its_own_seed_or_refuses():
    """The device pipeline draws an image's augmentation later, on the device, under the seed of the item it
    was read for. Read through SeededViews, six copies of one image get six different views (as with the pil
    and tensor pipelines, which draw as they read); read through a plain dataset there is no item seed, and
    augmenting is refused in words instead of giving every image the same augmentation."""
    images, labels = demo_split(1, 0, 64)
    copies = ImageDataset(images * 6, labels.repeat(6, 1),
                          pipelines.image_pipeline(48, True, pipeline="device"))
    views = SeededViews(copies, 1)
    batch = pipelines.collate([views[j] for j in range(6)])[0].to("cpu")  # (6, 3, 48, 48)
    assert len({tuple(b.flatten()[::97].tolist()) for b in batch}) == 6
    for kind in ("pil", "tensor"):
        plain = ImageDataset(images * 6, labels.repeat(6, 1),
                             pipelines.image_pipeline(48, True, pipeline=kind))
        assert len({tuple(plain[j][0].flatten()[::97].tolist()) for j in range(6)}) > 1
    with pytest.raises(RuntimeError, match="SeededViews"):
        copies[0]
    plain = ImageDataset(images, labels, pipelines.image_pipeline(48, False, pipeline="device"))
    # no augmentation: no seed needed
    assert pipelines.collate([plain[0]])[0].to("cpu").shape == (1, 3, 48, 48)


def test_device_pipeline_pixels_ignore_the_encoders_autocast():
    """run.py moves a batch to the device inside the encoder's bf16 autocast; the device pipeline's
    convolutions (Sharpness) and resampling must still run in fp32: the same batch as outside autocast (CPU
    autocast here)."""
    images, _ = demo_split(4, 0, 120)
    steps = T.Compose([T.Resize((48, 48), antialias=True),
                       functools.partial(TF.adjust_sharpness, sharpness_factor=1.9),
                       functools.partial(TF.rotate, angle=13.0, fill=128)])
    batch = collate([(DevicePipeline(steps, train=False)(im), 0, i) for i, im in enumerate(images)])[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = batch.to("cpu")
    want = torch.stack([(steps(TF.pil_to_tensor(im)).float() / 255 - torch.tensor(MEAN)[:, None, None])
                        / torch.tensor(STD)[:, None, None] for im in images])
    assert torch.allclose(under, want, atol=1e-5), (under - want).abs().max()


def test_device_pipeline_trains_and_resumes_like_the_tensor_pipeline(tmp_path, monkeypatch, capsys):
    """A run with --pipeline device (CPU, 2 workers, augmentation on, no cache) gives the tensor pipeline's
    run exactly; stopped in epoch 2 and resumed, it still does."""
    _, argv = _tiny_voc_run(tmp_path, "--no-cache-features", "--augment", "--epochs", "3", "--workers", "2")
    out = argv.index("--out") + 1
    results = {}
    for pipeline in ("tensor", "device"):
        argv[out] = str(tmp_path / pipeline)
        assert run.main([*argv, "--pipeline", pipeline]) == 0
        results[pipeline] = _strict_json(tmp_path / pipeline / "results.json")
    summary = {p: ([h["loss"] for h in r["history"]], r["map"]) for p, r in results.items()}
    assert summary["device"] == summary["tensor"] and results["device"]["settings"]["pipeline"] == "device"
    assert predict.main([str(tmp_path / "device"), "--evaluate"]) == 0  # scores the test split as the run did

    calls = {"n": 0}
    real = run.asymmetric_loss

    def stopped_in_epoch_2(logits, targets):  # 4 training images, batch 2: two steps an epoch
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(logits, targets)
    monkeypatch.setattr(run, "asymmetric_loss", stopped_in_epoch_2)
    argv[out] = str(tmp_path / "stopped")
    assert run.main([*argv, "--pipeline", "device"]) == 130
    monkeypatch.setattr(run, "asymmetric_loss", real)
    assert run.main([*argv, "--pipeline", "device", "--resume"]) == 0
    assert "resuming" in capsys.readouterr().out
    resumed = _strict_json(tmp_path / "stopped" / "results.json")
    assert ([h["loss"] for h in resumed["history"]], resumed["map"]) == summary["device"]


def test_pipeline_auto_is_pil_until_the_device_pipeline_has_run_on_a_gpu(monkeypatch):
    """No path that has never run on its hardware is a default: auto is the authors' PIL pipeline on the CPU
    and on CUDA; the device pipeline is there when asked for."""
    assert cli.parse_args(["--device", "cpu"]).pipeline == "pil"
    assert cli.parse_args(["--device", "cpu", "--pipeline", "device"]).pipeline == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    # --device auto finds CUDA
    assert cli.parse_args([]).device == "cuda" and cli.parse_args([]).pipeline == "pil"
    assert cli.parse_args(["--pipeline", "device"]).pipeline == "device"


# ===========================================================================================================
# 10. your own images: --data folder
# train.csv / test.csv with unknown cells; every malformed cell named by file, row and column.
# ===========================================================================================================

FOLDER_CLASSES = ["cat", "dog", "hot air balloon"]


def _make_folder(root, n_train=10, n_test=6):
    """A folder dataset: coloured JPEGs, train.csv with unknown cells (-1 and empty), test.csv with one
    unknown."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "photos"), exist_ok=True)
    rows = {}
    for split, n in (("train", n_train), ("test", n_test)):
        lines = ["image," + ",".join(FOLDER_CLASSES)]
        for i in range(n):
            name = f"photos/{split}{i}.jpg"
            _jpeg(os.path.join(root, name), tuple(int(c) for c in rng.integers(0, 255, 3)), size=(40, 30))
            labels = [str(int(v)) for v in rng.integers(0, 2, 3)]
            labels[i % 3] = "1"  # every class present somewhere
            if split == "train" and i % 4 == 1:
                labels[(i + 1) % 3] = "" if i % 8 == 1 else "-1"
            lines.append(",".join([name] + labels))
            rows[name] = labels
        if split == "test":
            lines[1] = lines[1].rsplit(",", 1)[0] + ",-1"  # test0's last class unknown
        with open(os.path.join(root, f"{split}.csv"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return rows


def test_folder_dataset_reads_partial_labels(tmp_path):
    _make_folder(str(tmp_path))
    paths, labels, names = load_folder(str(tmp_path), "train")
    assert names == FOLDER_CLASSES and len(paths) == 10 and paths[0] == os.path.join(str(tmp_path),
                                                                                     "photos/train0.jpg")
    rows = [l.split(",") for l in (tmp_path / "train.csv").read_text().splitlines()[1:]]
    expected = [[{"1": 1, "0": 0, "-1": -1, "": -1}[c] for c in r[1:]] for r in rows]
    assert labels.tolist() == expected and (labels == -1).sum() == 3
    test_paths, test_labels, _ = load_folder(str(tmp_path), "test", names)
    assert test_labels[0, 2] == -1


def _set_cell(text, row, column, value):
    """The CSV `text` with the cell at 1-based (row, column) replaced by `value` (row 1 is the header)."""
    lines = text.splitlines()
    cells = lines[row - 1].split(",")
    cells[column - 1] = value
    lines[row - 1] = ",".join(cells)
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.replace("image,cat", "picture,cat"), r"train.csv, row 1: the header must be image"),
    (lambda t: t.replace("photos/train3.jpg,", "photos/train3.jpg,2,"),
     r"train.csv, row 5: 5 cells, but the header has 4"),
    (lambda t: _set_cell(t, 4, 3, "yes"),
     r"train.csv, row 4, column 3 \(dog\): 'yes' is not 1, 0, -1 or empty"),
    (lambda t: t + t.splitlines()[3] + "\n",
     r"train.csv, row 12: the image photos/train2.jpg is listed again \(first in row 4\)"),
    (lambda t: t.replace("photos/train0.jpg", "photos/nowhere.jpg"),
     r"train.csv, row 2, column 1: no image .*nowhere.jpg"),
])
def test_folder_dataset_errors_name_file_row_and_column(tmp_path, edit, message):
    _make_folder(str(tmp_path))
    csv_path = tmp_path / "train.csv"
    text = csv_path.read_text()
    load_folder(str(tmp_path), "train")  # the file as made loads; each case's edit alone breaks it
    edited = edit(text)
    assert edited != text
    csv_path.write_text(edited)
    with pytest.raises(DataError, match=message):
        load_folder(str(tmp_path), "train")


def test_folder_dataset_class_checks(tmp_path):
    _make_folder(str(tmp_path))
    text = (tmp_path / "train.csv").read_text().splitlines()
    unknown = [text[0]] + [",".join(l.split(",")[:3] + ["-1"]) for l in text[1:]]
    (tmp_path / "train.csv").write_text("\n".join(unknown) + "\n")
    with pytest.raises(DataError, match=r"\['hot air balloon'\] have no known label"):
        load_folder(str(tmp_path), "train")
    _make_folder(str(tmp_path))
    with pytest.raises(DataError, match="test.csv, row 1: the classes .* are not train.csv's"):
        load_folder(str(tmp_path), "test", ["cat", "hot air balloon", "dog"])


def test_folder_dataset_more_checks(tmp_path):
    _make_folder(str(tmp_path))
    lines = (tmp_path / "train.csv").read_text().splitlines()
    # a blank line: rows keep the file's line numbers
    cells = lines[3].split(",")
    cells[2] = "maybe"
    blank_line = lines[:1] + [""] + lines[1:3] + [",".join(cells)] + lines[4:]
    (tmp_path / "train.csv").write_text("\n".join(blank_line) + "\n")
    with pytest.raises(DataError, match=r"row 5, column 3 \(dog\): 'maybe'"):
        load_folder(str(tmp_path), "train")
    # an empty image cell, a missing image: named by row and column
    for image, message in (("", "row 3, column 1: the image path is empty"),
                           ("photos/gone.jpg", r"row 3, column 1: no image .*gone.jpg")):
        cells = lines[2].split(",")
        cells[0] = image
        (tmp_path / "train.csv").write_text("\n".join(lines[:2] + [",".join(cells)] + lines[3:]) + "\n")
        with pytest.raises(DataError, match=message):
            load_folder(str(tmp_path), "train")
    # not UTF-8 (a cp1252 export)
    (tmp_path / "train.csv").write_bytes("image,caf\xe9\n".encode("cp1252"))
    with pytest.raises(DataError, match="not UTF-8 text"):
        load_folder(str(tmp_path), "train")
    # pandas' 1.0 / 0.0 cells are read as 1 / 0
    (tmp_path / "train.csv").write_text("\n".join([lines[0]] + [l.replace(",1",
                                                                          ",1.0") for l in lines[1:]]) + "\n")
    assert (load_folder(str(tmp_path), "train")[1] == 1).sum() > 0
    # a test split with no known positive anywhere cannot be scored: refused at once, not after training
    test = (tmp_path / "test.csv").read_text().splitlines()
    no_positive = [test[0]] + [l.split(",")[0] + ",0,0,-1" for l in test[1:]]
    (tmp_path / "test.csv").write_text("\n".join(no_positive) + "\n")
    with pytest.raises(DataError, match="test.csv: no class has a known positive"):
        load_folder(str(tmp_path), "test", FOLDER_CLASSES)


@pytest.mark.slow
def test_run_on_a_folder_with_cache_resume_and_sweep(tmp_path, capsys):
    _make_folder(str(tmp_path / "mine"))
    ckpt = _save_clip(tmp_path / "tiny.pt")
    base = ["--data", "folder", "--data-root", str(tmp_path / "mine"), "--clip", ckpt, "--image-size", "64",
            "--batch-size", "4", "--workers", "0", "--cache-views", "1", "--cache-dir",
            str(tmp_path / "cache")]
    out = tmp_path / "run"
    assert run.main([*base, "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "10 training images (90.0% of labels known)" in printed  # 3 of 30 cells unknown in train.csv
    mask = torch.load(out / "mask.pt")
    assert (mask == -1).sum() == 3  # --labels 1.0: the CSV's unknowns stay unknown, nothing more is masked
    # resume with more epochs is refused (other settings); the same settings resume cleanly
    assert run.main([*base, "--epochs", "1", "--out", str(out), "--resume"]) == 0
    assert run.main([*base, "--epochs", "2", "--cache-features", "--out", str(tmp_path / "cached")]) == 0
    results = _strict_json(tmp_path / "cached" / "results.json")
    assert list(results["per_class_ap"]) == FOLDER_CLASSES
    # the sweep and zero-shot take the same options
    assert analysis.main(["sweep", "--heads", "baseline", "--labels", "0.5", "--no-zero-shot", *base,
                          "--epochs", "1",
                          "--out", str(tmp_path / "sweep")]) == 0
    assert "folder" in (tmp_path / "sweep" / "table.md").read_text()
    assert analysis.main(["zeroshot", *base, "--out", str(tmp_path / "z")]) == 0


# ===========================================================================================================
# 11. predict: a trained head tags new images, or scores its run's test split again
# Its margins give the run's APs; its checks come before the slow start-up; it says what it is doing.
# ===========================================================================================================

def _save_demo_test_images(folder, n_train, size):
    """The demo's test images as PNG files (lossless), in the order of the run's test split."""
    images, labels = demo_split(max(1, n_train // 2), 0, size, offset=10**6)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(os.path.join(folder, f"{i:04d}.png"))
        im.save(paths[-1])
    return paths, labels


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """(folder, its 12 test images as PNGs) of one finished demo run, shared by the predict tests below; a
    test that edits the run's files works on a copy (`_copy_run`)."""
    root = tmp_path_factory.mktemp("predict")
    out = root / "run"
    assert run.main([*DEMO_ARGS, "--epochs", "1", "--out", str(out), "--cache-dir", str(root / "cache")]) == 0
    paths, _ = _save_demo_test_images(str(root / "images"), 24, 64)
    return str(out), paths


def _copy_run(demo_run, tmp_path):
    shutil.copytree(demo_run[0], tmp_path / "run")
    return str(tmp_path / "run")


@pytest.fixture
def no_start_up(monkeypatch):
    """Makes predict's slow start-up (the demo's data, the CLIP) an error, recorded: a test using it shows
    that predict refused before it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("predict reached the slow start-up (data, CLIP) before refusing")
    monkeypatch.setattr(cli, "load_clip", refuse)
    monkeypatch.setattr(cli, "load_data", refuse)
    return calls


@pytest.mark.parametrize("data", ["demo", "voc"])
def test_predict_reproduces_the_runs_test_ap(tmp_path, data):
    """The margins predict gives for the test images, ranked per class, give results.json's per-class AP; and
    --evaluate gives its mAP exactly."""
    out = tmp_path / "run"
    if data == "demo":
        argv = [*DEMO_ARGS, "--no-cache-features", "--epochs", "2", "--out", str(out)]
        paths, labels = _save_demo_test_images(str(tmp_path / "images"), 24, 64)
    else:
        voc, argv = _tiny_voc_run(tmp_path, "--workers", "0", "--epochs", "2", "--no-cache-features")
        argv[argv.index("--out") + 1] = str(out)
        paths, labels, _ = load_voc(str(tmp_path / "voc"), "test")
    assert run.main(argv) == 0
    results = _strict_json(out / "results.json")
    head, model, record, _, _ = predict.load_run(str(out), workers=0)
    got = dict(predict.predict(head, model, paths, record["image_size"], torch.device("cpu"), batch_size=5))
    margins = torch.stack([got[p] for p in paths])
    expected = _ap_known(margins.double().numpy(), labels.numpy())
    for name, want, ours in zip(record["classnames"], expected, results["per_class_ap"].values()):
        assert (want is None and ours is None) or ours == pytest.approx(100 * want, abs=1e-9), name
    assert predict.main([str(out), "--evaluate", "--workers", "0"]) == 0


def test_predict_prints_writes_json_and_skips_unreadable(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.main([*DEMO_ARGS, "--epochs", "1", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    paths, _ = _save_demo_test_images(str(tmp_path / "images" / "sub"), 24, 64)
    (tmp_path / "images" / "broken.jpg").write_bytes(b"not an image")
    capsys.readouterr()
    assert predict.main([str(out), str(tmp_path / "images"), "--top-k", "2", "--json",
                         str(tmp_path / "p.json"),
                         "--workers", "0"]) == 0
    captured = capsys.readouterr()
    lines = [l for l in captured.out.splitlines() if l.startswith(str(tmp_path))]
    assert len(lines) == 12 and all(len(l.split(": ", 1)[1].split(", ")) == 2 for l in lines)
    assert "broken.jpg" in captured.err and "12 images tagged, 1 unreadable" in captured.out
    written = _strict_json(tmp_path / "p.json")
    assert set(written["probabilities"]) == set(paths)
    assert list(written["unreadable"]) == [str(tmp_path / "images" / "broken.jpg")]
    for p in paths:  # every class, a probability and its margin: p = sigmoid(margin)
        for name, m in written["margins"][p].items():
            assert written["probabilities"][p][name] == pytest.approx(1 / (1 + math.exp(-m)), abs=1e-6)
    assert predict.main([str(out), str(tmp_path / "nowhere.jpg")]) == 2
    assert predict.main([str(tmp_path / "no-run"), str(paths[0])]) == 2
    assert "results.json" in capsys.readouterr().err


def test_predict_reads_images_batch_by_batch(tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run.main([*DEMO_ARGS, "--epochs", "1", "--out", str(out), "--cache-dir", str(tmp_path / "c")]) == 0
    paths, _ = _save_demo_test_images(str(tmp_path / "images"), 24, 64)
    reads = []
    real = predict.read_image
    monkeypatch.setattr(predict, "read_image", lambda p: reads.append(p) or real(p))
    head, model, record, _, _ = predict.load_run(str(out), workers=0)
    results = predict.predict(head, model, paths * 10, record["image_size"], torch.device("cpu"),
                              batch_size=8)
    next(results)
    assert len(reads) == 8  # one batch read, not all 120 images
    assert len(list(results)) == 119


@pytest.mark.parametrize("order", ["options first", "images first", "mixed"])
def test_predict_takes_options_before_or_after_the_images(demo_run, tmp_path, capsys, order):
    out, paths = demo_run
    json_file = str(tmp_path / "p.json")
    argv = {"options first": [out, "--json", json_file, "--top-k", "1", "--workers", "0", *paths[:2]],
            "images first": [out, *paths[:2], "--json", json_file, "--top-k", "1", "--workers", "0"],
            "mixed": [out, paths[0], "--json", json_file, paths[1], "--top-k", "1", "--workers", "0"]}[order]
    capsys.readouterr()
    assert predict.main(argv) == 0
    tagged = [l.split(": ")[0] for l in capsys.readouterr().out.splitlines() if l.split(": ")[0] in paths]
    assert tagged == paths[:2] and list(json.loads(open(json_file).read())["probabilities"]) == paths[:2]


def test_predict_evaluate_compares_within_a_tolerance(demo_run, tmp_path, capsys):
    """--evaluate passes within --tolerance mAP points of results.json's map, prints the difference, and
    exits 1 only outside it; the run's own map (read from its file) is what the same process computes
    again."""
    out = _copy_run(demo_run, tmp_path)
    path = os.path.join(out, "results.json")
    results = json.loads(open(path).read())
    want = results["map"]

    def evaluate_against(recorded, *options):
        with open(path, "w") as f:
            json.dump({**results, "map": recorded}, f)
        capsys.readouterr()
        status = predict.main([out, "--evaluate", "--workers", "0", *options])
        return status, capsys.readouterr().out
    status, printed = evaluate_against(want)
    assert status == 0 and (f"mAP {want:.4f} on demo's test split; results.json: {want:.4f}; "
                            f"difference +0.0000, within the tolerance 0.01") in printed
    status, printed = evaluate_against(want - 0.005)
    assert status == 0 and "difference +0.0050, within the tolerance 0.01" in printed
    status, printed = evaluate_against(want + 0.05)
    assert status == 1
    assert f"results.json: {want + 0.05:.4f}; difference -0.0500, outside the tolerance 0.01" in printed
    status, printed = evaluate_against(want + 0.05, "--tolerance", "0.1")
    assert status == 0 and "difference -0.0500, within the tolerance 0.1" in printed


def test_predict_evaluate_finds_a_moved_cache_and_says_when_it_encodes_again(demo_run, tmp_path, capsys):
    """--evaluate reads the run's cache where --cache-dir says it is now (nothing encoded again: no new cache
    folder), refuses a --cache-dir it cannot use in one line, and says so when the run's device type differs
    from this one (cached features are keyed by device type and precision)."""
    out = _copy_run(demo_run, tmp_path)
    results = json.loads(open(os.path.join(out, "results.json")).read())
    shutil.copytree(results["cache_dir"], tmp_path / "moved")
    before = sorted(os.listdir(tmp_path / "moved"))
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**results, "cache_dir": str(tmp_path / "gone")}, f)
    capsys.readouterr()
    assert predict.main([out, "--evaluate", "--workers", "0", "--cache-dir", str(tmp_path / "moved")]) == 0
    printed = capsys.readouterr().out
    assert "difference +0.0000" in printed and "note:" not in printed
    assert sorted(os.listdir(tmp_path / "moved")) == before and not (tmp_path / "gone").exists()
    (tmp_path / "afile").write_text("")
    status = predict.main([out, "--evaluate", "--workers", "0", "--cache-dir", str(tmp_path / "afile" / "c")])
    err = capsys.readouterr().err
    assert status == 2 and "--cache-dir" in err and err.count("\n") == 1, err
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({**results, "device": "cuda:0"}, f)
    assert predict.main([out, "--evaluate", "--workers", "0"]) == 0
    assert "note: the run encoded its features on cuda, this is cpu" in capsys.readouterr().out


def test_predict_says_what_it_is_doing(demo_run, capsys):
    """Progress on stdout before the slow steps (the run's head, classes and CLIP as run.py saved them), and
    a count with the right plural."""
    out, paths = demo_run
    capsys.readouterr()
    assert predict.main([out, *paths, "--workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"run {out}: positive head, 12 classes, CLIP demo; loading the CLIP on cpu",
                         "12 images to tag"] and lines[-1] == "12 images tagged"
    assert predict.main([out, paths[0], "--workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "1 image to tag" and lines[-1] == "1 image tagged"
    assert predict.main([out, "--evaluate", "--workers", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "scoring demo's test split again" and lines[-1].startswith("mAP ")


def test_predict_failures_and_moves(tmp_path, capsys, monkeypatch):
    _, argv = _tiny_voc_run(tmp_path, "--workers", "0", "--epochs", "1")
    argv[argv.index("--clip") + 1] = "t.pt"  # a path relative to where run.py ran
    monkeypatch.chdir(tmp_path)
    assert run.main(argv) == 0
    out = str(tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # predict finds the run's CLIP from any working directory
    assert predict.main([out, "--evaluate", "--workers", "0"]) == 0
    with pytest.raises(SystemExit) as e:  # a folder as --json: a usage error, before anything is loaded
        predict.main([out, str(tmp_path / "voc"), "--json", str(elsewhere), "--workers", "0"])
    assert e.value.code == 2 and "is a folder" in capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    (tmp_path / "out" / "results.json").write_text(json.dumps({**results, "map": results["map"] + 1}))
    assert predict.main([out, "--evaluate", "--workers", "0"]) == 1  # disagrees with results.json: not 0
    (tmp_path / "out" / "head.pt").write_bytes(b"garbage")
    capsys.readouterr()
    assert predict.main([out, "--evaluate", "--workers", "0"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_a_head_refuses_another_clip(tmp_path, capsys):
    voc, argv = _tiny_voc_run(tmp_path, "--workers", "0", "--epochs", "1")
    assert run.main(argv) == 0
    _save_clip(tmp_path / "other.pt", seed=1)
    assert predict.main([str(tmp_path / "out"), "--evaluate", "--clip", str(tmp_path / "other.pt")]) == 2
    err = capsys.readouterr().err
    trained = _sha256(str(tmp_path / "t.pt"))
    assert trained in err and _sha256(str(tmp_path / "other.pt")) in err and "--clip" in err


@pytest.mark.parametrize("name,kind", [("head.pt", "text"), ("head.pt", "JSON text"),
                                       ("head.pt", "state dict"), ("results.json", "text"),
                                       ("results.json", "a JSON list")])
def test_predict_a_run_file_of_another_kind_is_one_line(demo_run, tmp_path, capsys, no_start_up, name, kind):
    out = _copy_run(demo_run, tmp_path)
    path = os.path.join(out, name)
    if kind == "state dict":  # a torch file, but no head's description in it
        torch.save({"weight": torch.zeros(2, 3)}, path)
    else:
        with open(path, "w") as f:
            f.write({"text": "this is a text file\n", "JSON text": '{"a": 1}', "a JSON list": "[1, 2]"}[kind])
    capsys.readouterr()
    assert predict.main([out, "--evaluate"]) == 2
    err = capsys.readouterr().err
    what = "a head saved by run.py" if name == "head.pt" else "a results.json written by run.py"
    assert len(err.splitlines()) == 1 and f"{path} is not {what}" in err and "train the run again" in err, err
    assert no_start_up == []


@pytest.mark.parametrize("case", ["no results.json", "no head.pt", "missing images", "empty folder",
                                  "folder of other files", "--json under a file", "--json not writable",
                                  "--json replacing a file in a folder not writable"])
def test_predict_checks_what_it_can_before_the_slow_start_up(demo_run, tmp_path, capsys, no_start_up, case):
    """Every check that needs no CLIP comes before it is loaded: one line naming the bad value, exit 2."""
    out, paths = demo_run
    json_file = None
    if case in ("no results.json", "no head.pt"):
        out = _copy_run(demo_run, tmp_path)
        os.remove(os.path.join(out, case[3:]))
        argv, expected = [out, paths[0]], [f"{out} holds no {case[3:]}", "--out folder of a finished"]
    elif case == "missing images":
        argv = [out, paths[0], str(tmp_path / "nowhere.jpg"), str(tmp_path / "gone")]
        expected = [f"{tmp_path / 'nowhere.jpg'}, {tmp_path / 'gone'}: no such image or folder"]
    elif case in ("empty folder", "folder of other files"):
        (tmp_path / "folder").mkdir()
        if case == "folder of other files":
            (tmp_path / "folder" / "notes.txt").write_text("not an image")
        argv = [out, paths[0], str(tmp_path / "folder")]
        expected = [f"{tmp_path / 'folder'}: no image (", ".jpg", ".png", ".webp"]
    elif case == "--json under a file":
        (tmp_path / "a-file").write_text("x")
        json_file = str(tmp_path / "a-file" / "p.json")
        argv = [out, paths[0], "--json", json_file]
        expected = [f"--json {json_file}: ", f"{tmp_path / 'a-file'} is a file, not a folder"]
    elif case == "--json not writable":  # /proc takes no new file, even from root (the tests may run as root)
        json_file = "/proc/clipmlr-predict-test/p.json"
        argv = [out, paths[0], "--json", json_file]
        expected = [f"--json {json_file}: ", "the folder /proc is not writable"]
    else:  # a file that exists, in a folder where it cannot be replaced
        argv = [out, paths[0], "--json", "/proc/version"]
        expected = ["--json /proc/version: the folder /proc is not writable, so the file cannot be replaced"]
    capsys.readouterr()
    assert predict.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and all(e in err for e in expected), err
    assert no_start_up == [] and not (json_file and os.path.exists(json_file))


def test_predict_help_gives_each_default_once_and_bad_options_are_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        predict.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines to the terminal's width
    assert e.value.code == 0 and "(default: None)" not in text and "(default: the run's) (default" not in text
    assert "--threshold THRESHOLD print the classes whose probability passes this (with --evaluate: the " \
        "threshold of the precision/recall metrics) (default: 0.5)" in text
    assert "in mAP points" in text and "(default: 0.01)" in text
    bad = [(["run", "a.jpg", "--threshold", "2"], "--threshold 2"), (["run", "--nope"], "--nope"),
           (["run"], "--evaluate"), (["run", "--evaluate", "--tolerance", "-1"], "--tolerance -1"),
           (["run", "--evaluate", "--tolerance", "nan"], "--tolerance nan")]
    for argv, named in bad:
        with pytest.raises(SystemExit) as e:
            predict.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and named in err, (argv, err)


# ===========================================================================================================
# 12. analyses: the sweep (Table 1), switches, zero-shot, negation (Table 2), maps (Fig. 1)
# Each table cell against the run or the direct computation it reports.
# ===========================================================================================================

def _demo_clip():
    """The demo's miniature CLIP exactly as the analysis commands (and run.py) load it for DEMO_ARGS."""
    args = cli.parse_args(DEMO_ARGS)
    data = cli.load_data(args)
    return cli.load_clip(args)[0], data


def _unit_text(model, prompts):
    with torch.no_grad():
        return F.normalize(model.encode_text(tokenize(prompts)), dim=-1)


def _table_rows(markdown):
    """The rows of the first Markdown table in `markdown`, as lists of cell strings (header first)."""
    lines = [l for l in markdown.splitlines() if l.startswith("|") and not l.startswith("|---")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines]


def test_templates_are_the_papers():
    assert len(TEMPLATES) == 85 and len(set(TEMPLATES)) == 85
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert TEMPLATES[0] == "a bad photo of a {}." and TEMPLATES[-1] == "this is one {} in the scene."
    assert "a photo of a {}." in TEMPLATES and "itap of my {}." in TEMPLATES
    assert negated("a photo of a {}.") == "not a photo of a {}."
    assert len(COCO_CLASSES) == 80 and len(set(COCO_CLASSES)) == 80
    assert COCO_CLASSES[:3] == ["person", "bicycle", "car"] and COCO_CLASSES[-1] == "toothbrush"


def test_negation_matches_direct_computation():
    model, _ = _demo_clip()
    classes, templates = COCO_CLASSES[:6], TEMPLATES[:4]
    sims = negation_similarities(model, classes, templates)
    for i, c in enumerate(classes):
        p1, n1, p2 = _unit_text(model, [f"photo of a {c}", f"not a photo of a {c}", f"picture of a {c}"])
        assert sims["one prompt"]["p1_n1"][i].item() == pytest.approx((p1 @ n1).item(), abs=1e-5)
        assert sims["one prompt"]["p1_p2"][i].item() == pytest.approx((p1 @ p2).item(), abs=1e-5)
        pos = _unit_text(model, [t.format(c) for t in templates])  # (K, D)
        neg = _unit_text(model, ["not " + t.format(c) for t in templates])
        assert torch.allclose(sims["85 templates"]["p1_n1"][:, i], (pos * neg).sum(-1), atol=1e-5)
        pairs = [pos[a] @ pos[b] for a in range(4) for b in range(a + 1, 4)]
        assert torch.allclose(sims["85 templates"]["p1_p2"][i], torch.stack(pairs), atol=1e-5)
    s = negation_summary(sims)
    per_class = sims["85 templates"]["p1_n1"].mean(0).double().numpy()
    assert s["85 templates"]["p1_n1"]["mean"] == pytest.approx(per_class.mean())
    assert s["85 templates"]["p1_n1"]["std"] == pytest.approx(per_class.std())  # over classes, ddof 0
    assert s["85 templates"]["p1_n1"]["min"] == pytest.approx(per_class.min())


def test_negation_command_table(tmp_path):
    assert analysis.main(["negation", *DEMO_ARGS, "--out", str(tmp_path)]) == 0
    text = (tmp_path / "table.md").read_text()
    assert "the demo's CLIP, the miniature pretrained" in text
    rows = _table_rows(text)
    assert rows[0] == ["Setting", "P1-N1", "P1-P2"] and len(rows) == 6  # ours x3, paper x2
    assert rows[2] == ["80 classes, 1 prompt, paper (RN101, COCO)", "0.58 ± 0.06 (0.37, 0.69)",
                       "0.53 ± 0.04 (0.51, 0.67)"]
    # the one-prompt row against a direct computation over the demo's 12 classes (the words the miniature
    # knows)
    model, _ = _demo_clip()
    p1 = _unit_text(model, [f"photo of a {c}" for c in SCENE_CLASSES])
    n1 = _unit_text(model, [f"not a photo of a {c}" for c in SCENE_CLASSES])
    cos = (p1 * n1).sum(-1).double().numpy()
    expected = f"{cos.mean():.2f} ± {cos.std():.2f} ({cos.min():.2f}, {cos.max():.2f})"
    assert rows[1][0] == "12 classes, 1 prompt" and rows[1][1] == expected
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["summary"]["one prompt"]["p1_n1"]["mean"] == pytest.approx(cos.mean(), abs=1e-6)
    assert len(results["per_class"]["85 templates, per-class mean"]["p1_n1"]) == 12


def test_zero_shot_matches_direct_computation(tmp_path, monkeypatch):
    model, data = _demo_clip()
    # the very same images (and calibration)
    monkeypatch.setattr(cli, "load_data", lambda args, say=print: data)
    assert analysis.main(["zeroshot", *DEMO_ARGS, "--no-cache-features", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    _, _, test, test_y, names = data
    transform = image_transform(64, train=False)
    with torch.no_grad():
        features = model.encode_dense(torch.stack([transform(im) for im in test]))
        presence = model.encode_text(tokenize([f"a photo of a {n}." for n in names]))
        absence = model.encode_text(tokenize([f"not a photo of a {n}." for n in names]))
        logits = prompt_logits(features, presence, absence)
        scores = logits[..., 0] - logits[..., 1]  # ranked by the margin, as the heads are
    assert result["map"] == pytest.approx(_map(scores, test_y), abs=1e-3)
    assert result["clip"]["name"] == "demo" and "the demo's CLIP, the miniature pretrained" in \
        (tmp_path / "table.md").read_text()


def test_zero_shot_json_is_strict_with_null_for_classes_without_positives(tmp_path):
    """Two demo images: the test split is one image, so most classes have no positive there."""
    argv = ["zeroshot", "--data", "demo", "--demo-images", "2", "--image-size", "64", "--workers", "0",
            "--no-cache-features", "--out", str(tmp_path)]
    assert analysis.main(argv) == 0
    result = _strict_json(tmp_path / "results.json")
    _, test_y = demo_split(1, 0, 64, offset=10**6)
    present = {n for n, y in zip(SCENE_CLASSES, test_y[0]) if y == 1}
    assert {n for n, a in result["per_class_ap"].items() if a is not None} == present
    assert "| – |" in (tmp_path / "table.md").read_text()


@pytest.fixture(scope="module")
def demo_sweep(tmp_path_factory):
    """A 2 heads x 2 label proportions sweep on the demo, 2 epochs per run; its folder."""
    out = tmp_path_factory.mktemp("sweep")
    argv = ["sweep", "--heads", "baseline", "positive", "--labels", "0.5", "1", *DEMO_ARGS, "--epochs", "2",
            "--out", str(out), "--cache-dir", str(out / "cache")]
    assert analysis.main(argv) == 0
    return out, argv


@pytest.mark.slow
def test_sweep_table_and_plot(demo_sweep):
    out, _ = demo_sweep
    text = (out / "table.md").read_text()
    assert "the demo's CLIP, the miniature pretrained" in text
    rows = _table_rows(text)
    assert rows[0] == ["Method", "50%", "100%", "Avg", "#Params", "Train time / run"]
    assert [r[0] for r in rows[1:]] == ['zero-shot ("a photo of a {}." / "not a photo of a {}.")', "baseline",
                                        "positive"]  # no paper rows for the demo
    # each cell is its run's mAP (zero-shot: the same at every proportion), to the table's one decimal
    zero_shot_map = json.loads((out / "zeroshot.json").read_text())["map"]
    runs = {(head,
             labels): json.loads((out / f"demo-{head}-{labels}-seed0" / "results.json").read_text())["map"]
            for head in ("baseline", "positive") for labels in ("0.5", "1")}
    expected = [[zero_shot_map,
                 zero_shot_map]] + [[runs[head, "0.5"], runs[head, "1"]] for head in ("baseline", "positive")]
    for r, maps in zip(rows[1:], expected):
        cells = [float(c) for c in r[1:4]]
        assert cells == [pytest.approx(m, abs=0.051) for m in (*maps, np.mean(maps))], (r, maps)
    # baseline 2·(64+1)·12, positive (16·64 + 2·64)·12
    assert rows[2][4] == "1,560" and rows[3][4] == "13,824"
    for head in ("baseline", "positive"):
        for labels in ("0.5", "1"):
            result = json.loads((out / f"demo-{head}-{labels}-seed0" / "results.json").read_text())
            assert result["settings"]["epochs"] == 2 and result["settings"]["cache_features"]
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table][1:] == ["baseline", "positive"]
    assert float(table[1]["50%"]) == pytest.approx(float(rows[2][1]), abs=0.051)
    with Image.open(out / "plot.png") as im:
        assert im.size == (900, 520) and im.mode == "RGB"


@pytest.mark.slow
def test_sweep_restart_skips_done_runs(demo_sweep, monkeypatch, capsys):
    out, argv = demo_sweep
    calls = []
    finished = out / "demo-positive-1-seed0"
    saved = (finished / "results.json").read_text()
    (finished / "results.json").unlink()  # as if killed after its checkpoint, before its results

    def fake_train(script, run_argv):  # records the call and puts the results back instead of training
        calls.append(run_argv)
        assert os.path.samefile(script, os.path.join(ROOT, "run.py"))
        (finished / "results.json").write_text(saved)
        return 0

    monkeypatch.setattr(sweep_module, "train", fake_train)
    assert analysis.main(argv) == 0
    assert len(calls) == 1 and calls[0][-1] == "--resume" and str(finished) in calls[0]
    assert capsys.readouterr().out.count("is done, skipped") == 3
    # a finished run made with other settings is not silently reused
    assert analysis.main([a if a != "2" else "3" for a in argv]) == 2
    assert "other settings" in capsys.readouterr().err


def test_sweep_table_has_the_papers_rows():
    results = [{"head": h, "labels": p, "seed": s, "map": 90.0 + s, "trainable_params": 1,
                "train_seconds": 60.0}
               for h in ("baseline", "positive") for p in PROPORTIONS for s in (0, 1)]
    text, rows = sweep_table(results, None, "voc", "RN101")
    table = _table_rows(text)
    assert table[0][1:10] == [f"{10 * i}%" for i in range(1, 10)] and table[0][10] == "Avg"
    assert table[1][1] == "90.5 ± 0.5"  # two seeds: mean ± std
    paper = [f"{v:.1f}" for v in PAPER_TABLE1["voc"]["baseline"]]
    paper += [f"{PAPER_AVERAGE['voc']['baseline']:.1f}"]
    # the published Avg, not a recomputed one
    assert table[2][0] == "baseline (paper)" and table[2][1:11] == paper
    assert table[4][-2:] == ["0.17M", "3 GPU-h"]
    subset = [r for r in results if r["labels"] in (0.1, 0.9)]
    text, _ = sweep_table(subset, None, "coco", "RN101")
    assert _table_rows(text)[2][3] == f"{np.mean([78.9, 83.5]):.1f}*" and "Avg over 10%…90% is 82.0" in text


@pytest.mark.slow
def test_maps_hand_written_and_learned(demo_sweep, tmp_path):
    out, _ = demo_sweep
    assert analysis.main(["maps", *DEMO_ARGS, "--index", "1", "--panel", "96", "--out", str(tmp_path)]) == 0
    for name in ("positive", "baseline"):
        assert analysis.main(["maps", "--run", str(out / f"demo-{name}-1-seed0"), "--index", "1", "--panel",
                              "96",
                              "--class", "ring", "--out", str(tmp_path)]) == 0
    pngs = sorted(os.listdir(tmp_path))
    assert len(pngs) == 3 and any("hand-written" in p for p in pngs), pngs
    for p in pngs:
        with Image.open(tmp_path / p) as im:
            assert im.size == figure_size(96) == (320, 196)
    assert analysis.main(["maps", "--run", str(out / "demo-positive-1-seed0"), "--class", "dog"]) == 2
    assert analysis.main(["maps", "--run", str(tmp_path / "nothing"), "--class", "ring"]) == 2


def test_similarity_maps_are_cosines():
    torch.manual_seed(0)
    features, presence, absence = torch.randn(1 + 9, 8), torch.randn(8), torch.randn(8)
    maps = similarity_maps(features, presence, absence)
    assert maps.shape == (2, 3, 3)
    assert maps[0, 1, 2].item() == pytest.approx(F.cosine_similarity(features[1 + 5], presence, dim=0).item(),
                                                 abs=1e-6)
    assert maps[1, 2, 0].item() == pytest.approx(F.cosine_similarity(features[1 + 6], absence, dim=0).item(),
                                                 abs=1e-6)


def test_switches_and_sweep_protocol(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep_module, "train", lambda script, argv: run.main(argv))  # in-process: faster
    argv = ["switches", *DEMO_ARGS, "--epochs", "1", "--labels", "0.5", "--out", str(tmp_path / "s"),
            "--cache-dir", str(tmp_path / "c")]
    assert analysis.main(argv) == 0
    rows = _table_rows((tmp_path / "s" / "table.md").read_text())
    assert rows[0] == ["switch", "run.py option", "mAP", "vs defaults"] and len(rows) == 1 + 10
    runs = {r[1]: r for r in rows[1:]}
    assert runs["--randaugment torchvision"][2:] == ["–", "cannot matter here"]  # the demo does not augment
    own = _strict_json(tmp_path / "s" / "1-absence-weights" / "results.json")
    assert own["settings"]["absence_weights"] == "own"
    default = _strict_json(tmp_path / "s" / "0-defaults" / "results.json")
    assert float(runs["--absence-weights own"][3]) == pytest.approx(own["map"] - default["map"], abs=0.006)
    # the sweep offers the paper's protocol and says which one its table used
    for protocol, words in (("paper", "the paper's protocol (encoder in the loop"),
                            ("cached", "cached features")):
        out = tmp_path / protocol
        assert analysis.main(["sweep", "--heads", "baseline", "--labels", "1", "--protocol", protocol,
                              "--no-zero-shot",
                              *DEMO_ARGS, "--epochs", "1", "--out", str(out), "--cache-dir",
                              str(tmp_path / "c")]) == 0
        assert words in (out / "table.md").read_text()
        result = _strict_json(out / "demo-baseline-1-seed0" / "results.json")
        assert result["settings"]["cache_features"] == (protocol == "cached")
    assert analysis.main(["sweep", "--cache-features", *DEMO_ARGS]) == 2
    assert "--protocol cached" in capsys.readouterr().err


# ===========================================================================================================
# 13. the demo's CLIP: pretraining it, and the paper's premise on it The scenes' captions, deterministic
# contrastive pretraining saved in OpenAI's format, and the shipped miniature.
# ===========================================================================================================

def test_scene_captions_name_only_shapes_that_are_present():
    """The paper's premise in the scenes: a caption names shapes that are in the image, leaves some out (web
    captions are incomplete) and never says what is absent; colour says nothing about the shape."""
    left_out = 0
    for i in range(300):
        image, labels, caption = scene(i, 1, 64)
        words = set(re.findall(r"[a-z]+", caption))
        named = {c for c in SCENE_CLASSES if c in words}
        present = {c for c, y in zip(SCENE_CLASSES, labels.tolist()) if y}
        assert named and named <= present and "not" not in words and "no" not in words, (caption, present)
        left_out += len(present - named)
    assert left_out > 30  # about a quarter of the shapes present go unnamed
    # a function of (index, seed): pretraining's seed is not the demo's
    same, other = scene(5, 1, 64), scene(5, 0, 64)
    assert np.array_equal(np.array(scene(5, 1, 64)[0]), np.array(same[0])) and same[2] == scene(5, 1, 64)[2]
    assert not np.array_equal(np.array(same[0]), np.array(other[0]))


def test_pretraining_is_deterministic_lowers_the_loss_and_saves_openais_format(tmp_path):
    """A few steps of the contrastive pretraining: the same losses and weights twice (same threads), a loss
    that falls, and a checkpoint in OpenAI's key names and fp16 that clip.load reads back, its sha256 that of
    the file."""
    first, losses = pretrain.pretrain(steps=8, batch_size=16, size=64, progress=False)
    again, losses_again = pretrain.pretrain(steps=8, batch_size=16, size=64, progress=False)
    assert losses == losses_again
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    images, captions = pretrain.scene_batch(0, 16, 64)  # the first step's scenes, before and after training
    with torch.no_grad():
        initial = pretrain.initial_model(64).eval()
        before = pretrain.contrastive_loss(initial, images, tokenize(captions)).item()
        after = pretrain.contrastive_loss(first, images, tokenize(captions)).item()
    assert after < before - 0.1, (before, after)
    path = tmp_path / "mini.pt"
    sha = pretrain.save_openai_format(first, str(path))
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(first.state_dict()) and saved["visual.conv1.weight"].dtype == torch.float16
    model, _ = clip.load(str(path))
    assert model.sha256 == sha
    ids = tokenize(["a photo of a star.", "a ring and a dot."])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(ids), first.half().float().encode_text(ids), rtol=0,
                                   atol=1e-5)


def test_demo_clip_shows_the_papers_premise():
    """The shipped miniature (weights/demo-clip.pt) as the analyses read it, on 64 demo test scenes at 128 px:
    the presence prompt alone ranks the shapes far above chance (measured 77.9 here), while ranking by
    presence minus "not a photo of a {}" is below chance (measured 11.9): negated prompts are almost the
    positive ones (cosine 0.94 on one prompt, measured), because the captions it learned from never say what
    is absent."""
    args = cli.parse_args(["--data", "demo", "--demo-images", "128", "--workers", "0", "--no-cache-features"])
    result = zero_shot(args)
    chance = _demo_chance(128, 128)
    assert 70 < result["map_presence_alone"] < 90 and result["map"] < chance < 30, (result, chance)
    model, _ = cli.load_clip(args)
    one = negation_summary(negation_similarities(model, SCENE_CLASSES))["one prompt"]["p1_n1"]
    assert 0.85 < one["mean"] < 0.99 and one["min"] > 0.7, one


def test_demo_clip_maps_peak_on_the_shape_they_name():
    """Fig. 1 in miniature: one shape drawn in one cell of the 4 x 4 grid (128 px); the per-position cosine
    with "a photo of a {shape}." peaks in that cell (measured here: 40 of 48 shape-cell pairs, every cell for
    the large shapes asserted below)."""
    model, _ = clip.load(demo_clip_path())
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.normal(128, 40, (128, 128, 1)).clip(0, 255).astype(np.uint8).repeat(3, 2))
    background = Image.blend(noise, Image.new("RGB", (128, 128), (110, 120, 100)), 0.7)
    for kind in ("circle", "square", "cross", "hexagon", "crescent"):
        for gy, gx in ((0, 3), (2, 1), (3, 3), (1, 0)):
            image = background.copy()
            draw_scene_shape(ImageDraw.Draw(image), kind, 32 * gx + 16, 32 * gy + 16, 14, (230, 40, 40))
            with torch.no_grad():
                features = model.encode_dense(image_transform(128, False)(image)[None])[0]
                presence, absence = text_features(model, [f"a photo of {with_article(kind)}.",
                                                          f"not a photo of {with_article(kind)}."])
            maps = similarity_maps(features, presence, absence)  # (2, 4, 4)
            assert divmod(int(maps[0].flatten().argmax()), 4) == (gy, gx), (kind, gy, gx)


def test_the_demo_clip_by_name_on_your_own_images(tmp_path):
    """--clip demo works on any data, offline: a folder dataset trains, and predict tags with the run's CLIP.
    """
    _make_folder(str(tmp_path / "data"))
    out = tmp_path / "run"
    assert run.main(["--data", "folder", "--data-root", str(tmp_path / "data"), "--clip", "demo", "--epochs",
                     "1",
                     "--image-size", "64", "--workers", "0", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["clip"]["name"] == "demo" and list(results["per_class_ap"]) == FOLDER_CLASSES
    assert predict.main([str(out), str(tmp_path / "data" / "photos"), "--workers", "0"]) == 0


# ===========================================================================================================
# 14. the architecture: a core and its layers; the package alone; the entry points
# The import graph parsed (the core imports no layer), clipmlr/ copied alone, one start per command.
# ===========================================================================================================

CORE = {"aggregation", "heads", "loss", "metrics", "data", "augment"}
LAYERS = {"cli", "cache", "checkpoint", "distributed", "download", "demo", "analysis", "folder", "nuswide",
          "predict",
          "pipelines",
          "pretrain"}


def _imports(path):
    """The clipmlr modules (first component under clipmlr) and top-level modules a file imports."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = os.path.relpath(os.path.dirname(path), REPO).split(os.sep)  # e.g. ["clipmlr", "analysis"]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{a.name}" for a in node.names]
                found |= set(names)
            else:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _python_files(folder):
    return [os.path.join(d, f) for d, _,
            fs in os.walk(os.path.join(REPO, folder)) for f in fs if f.endswith(".py")]


@pytest.mark.slow
def test_architecture_core_and_layers():
    for path in _python_files("clipmlr"):
        imported = _imports(path)
        own = {m.split(".")[1] for m in imported if m.startswith("clipmlr.") and len(m.split(".")) > 1}
        assert "run" not in imported and not any(m.startswith("run.") for m in imported), path
        name = os.path.relpath(path, os.path.join(REPO, "clipmlr")).split(os.sep)[0].removesuffix(".py")
        assert name in CORE | LAYERS | {"clip", "__init__"}, f"{path}: neither core nor layer"
        if name == "clip":
            assert own <= {"clip"}, (path, own)  # the CLIP imports nothing else of clipmlr
        elif name in CORE:
            assert not own & LAYERS, (path, own & LAYERS)  # the core imports no layer
    # the loop needs only the layers it always uses: the others are imported where (and when) they are used
    code = ("import sys, run\nprint(sorted(m for m in sys.modules if m.startswith('clipmlr.')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120,
                            check=True).stdout
    for layer in ("cache", "download", "folder", "demo", "predict", "analysis", "pretrain"):
        assert f"'clipmlr.{layer}" not in loaded, (layer, loaded)


@pytest.mark.slow
def test_package_copied_alone_imports_and_works(tmp_path):
    """clipmlr/ copied into another project (no run.py beside it) imports, and the sweep asks for run.py."""
    shutil.copytree(os.path.join(REPO, "clipmlr"), tmp_path / "clipmlr",
                    ignore=shutil.ignore_patterns("__pycache__"))
    modules = ["clipmlr." + os.path.relpath(p, tmp_path)[len("clipmlr/"):-3].replace(os.sep, ".")
               for p in map(str, (tmp_path / "clipmlr").rglob("*.py")) if not p.endswith("__main__.py")]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({m.removesuffix('.__init__')!r})\n"
                                                 for m in modules) + "assert 'run' not in sys.modules\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), env=env, check=True, timeout=120)
    p = subprocess.run([sys.executable, "-m", "clipmlr.analysis", "sweep", "--labels", "1", *DEMO_ARGS],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--run-script" in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_bench_sections_run_on_tiny_settings():
    """bench.py's sections that time run.py's own loop and the input pipelines run (their figures are not
    asserted: timings are measured, never tested); what each returns names what it measured."""
    steps = bench.bench_train_steps(_clip(), ["a", "b"], 64, 2, 1, torch.device("cpu"), heads=["positive"])
    assert set(steps["positive"]) == {"ms_cached", "ms_in_loop"} and steps["positive"]["ms_cached"] > 0
    epoch = bench.bench_demo_epoch(8, 64, 1, 4, 0, torch.device("cpu"))
    assert epoch["images"] == 8 and epoch["s_in_loop"] > 0 and epoch["s_cached"] > 0
    rates = bench.bench_pipelines(64, n=4, batch=2)
    assert set(rates) == {f"{p}_{v}" for p in ("pil", "tensor", "device") for v in ("plain", "augmented")}


@pytest.mark.slow
@pytest.mark.parametrize("command",
                         [["run.py"], ["-m", "clipmlr.analysis", "sweep"], ["-m", "clipmlr.predict"],
                                     ["-m", "clipmlr.pretrain"]])
def test_entry_points_start(command):
    """Each command starts as a user starts it, in a fresh process, and prints its help (exit 0)."""
    p = subprocess.run([sys.executable, *command, "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "usage:" in p.stdout and "Traceback" not in p.stderr, p.stderr
