"""Hand-written prompts: the 85 templates of the PositiveCoOp paper's Sec. 5.2 and the COCO class names.

TEMPLATES is transcribed from the paper's supplement, Table 4 ("85 default prompts from ImageNet": CLIP's 80
ImageNet templates plus five "... in the scene" ones), read row by row. A template holds one `{}` for the
class name. `negated(template)` is the template's negative counterpart, made as the paper makes N1 from P1 in
Sec. 5.2 ("photo of a {}" -> "Not a photo of a {}"): "not " in front (the tokenizer lower-cases, so "Not" is
the same).
"""

# Sec. 5.2, Table 2: P1, its negation N1, and a second positive prompt P2
P1, N1, P2 = "photo of a {}", "not a photo of a {}", "picture of a {}"

# the zero-shot reference and the hand-written similarity maps: presence / absence prompts
PRESENCE, ABSENCE = "a photo of a {}.", "not a photo of a {}."

TEMPLATES = [  # supplement Table 4, row by row
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.",
    "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.",
    "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.",
    "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.", "a good photo of a {}.", "a plushie {}.",
    "a photo of the nice {}.", "a photo of the small {}.", "a photo of the weird {}.",
    "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.",
    "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
]

COCO_CLASSES = [  # the 80 COCO categories, official names, in category-id order
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]

assert len(TEMPLATES) == 85 and len(set(TEMPLATES)) == 85, "supplement Table 4 lists 85 distinct templates"
assert len(COCO_CLASSES) == 80, "COCO has 80 categories"


def negated(template):
    """The absence counterpart of a presence template: "a photo of a {}." -> "not a photo of a {}."."""
    return "not " + template


def fill(template, classnames):
    """One prompt per class: the template with each name in place of `{}`."""
    if template.count("{}") != 1:
        raise ValueError(f"the prompt template {template!r} must hold exactly one {{}} for the class name, "
                         f"e.g. 'a photo of a {{}}.'")
    return [template.format(name) for name in classnames]
