"""clipmlr: multi-label recognition with partial labels on a frozen CLIP (the PositiveCoOp paper, WACV 2025).

The core is the method, and imports nothing else of clipmlr:
    clip/            the vendored CLIP (loads OpenAI's ResNet checkpoints); imports nothing else of clipmlr
    aggregation.py   class-specific region aggregation: 20·cos, softmax over positions, 5·weighted sum
    heads.py         the Baseline, DualCoOp, PositiveCoOp and NegativeCoOp heads, and their parameter groups
    loss.py          the asymmetric loss on the 2-way softmax, unknown labels ignored
    metrics.py       the logit margin, the mAP it ranks by, and precision/recall/F1 in ML-GCN's and ASL's
                     conventions
    data.py          VOC2007 / COCO2014 readers, label masking, the decoding check
    augment.py       the paper's transforms: resize, Cutout, RandAugment (the authors' policy or
                     torchvision's)
The layers go beyond the paper; they may import the core, the core never imports them:
    cli.py           the options shared by run.py and the analyses; loading the data and CLIP they name
    cache.py         dense features computed once and kept on disk
    checkpoint.py    atomic writes, checkpoints and resume
    distributed.py   torchrun (DistributedDataParallel)
    download.py      VOC2007 and COCO2014 downloads through torchvision
    folder.py        your own partially labelled images: a folder with train.csv and test.csv
    nuswide.py       NUS-WIDE's 81 concepts from the official release's lists
    predict.py       a trained head as a model: tag new images, or score its run's test split again
    demo.py          the offline demo: generated captioned scenes, the demo's CLIP by name, a random
                     miniature CLIP
    pretrain.py      contrastive pretraining of a miniature CLIP on those scenes (python -m clipmlr.pretrain)
    analysis/        the paper's analyses: Table 1 sweep, zero-shot, Table 2 negation, Fig. 1 maps
run.py (outside the package) is the training loop; nothing under clipmlr/ imports it.

Shape key, the same in every file: B batch, N images, C classes, D feature dim, L positions (1 + H·W, the
mean token first), T tokens, W text width, X context tokens, V cached views, M prompt templates.
"""
