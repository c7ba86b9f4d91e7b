"""The analysis pictures, drawn with Pillow alone (no plotting library needed): a line plot and heat-map
overlays.

    line_plot(series, ...)          mAP against the label proportion, one colour per head (PositiveCoOp
                                    Table 1)
    similarity_figure(image, ...)   an image beside its presence and absence similarity maps (paper Fig. 1)

Both return a PIL image of a size fixed by their arguments, so tests can check it.
"""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

PALETTE = {"baseline": (31, 119, 180), "dual": (255, 127, 14), "positive": (44, 160, 44),
           "negative": (214, 39, 40), "zero-shot": (110, 110, 110)}
OTHER_COLOURS = [(148, 103, 189), (140, 86, 75), (227, 119, 194), (188, 189, 34), (23, 190, 207)]


def font(size=13):
    try:
        return ImageFont.load_default(size=size)  # a scalable font where Pillow has FreeType
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def text(draw, xy, string, size, anchor):
    """Black text placed by a two-letter anchor (l/m/r, t/m), computed by hand so any Pillow font works."""
    f = font(size)
    x0, y0, x1, y1 = draw.textbbox((0, 0), string, font=f)
    x = xy[0] - {"l": 0, "m": (x1 - x0) / 2, "r": x1 - x0}[anchor[0]] - x0
    y = xy[1] - {"t": 0, "m": (y1 - y0) / 2}[anchor[1]] - y0
    draw.text((x, y), string, fill=(0, 0, 0), font=f)


def colour_of(name, index=0):
    return PALETTE.get(name, OTHER_COLOURS[index % len(OTHER_COLOURS)])


def jet(values):
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours, blue (low) through cyan, yellow to red (high)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0, 1)
    rgb = np.stack([np.clip(1.5 - np.abs(4 * v - s), 0, 1) for s in (3, 2, 1)], axis=-1)  # (H, W, 3)
    return (255 * rgb).round().astype(np.uint8)


def nice_ticks(low, high, count=6):
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [low, high]."""
    raw = max(high - low, 1e-9) / count
    magnitude = 10 ** np.floor(np.log10(raw))
    step = next(s * magnitude for s in (1, 2, 2.5, 5, 10) if s * magnitude >= raw)
    start = np.floor(low / step) * step
    return [round(float(start + i * step), 9) for i in range(int(np.ceil((high - start) / step)) + 1)]


def dashed_line(draw, start, end, fill, width=1, dash=6):
    (x0, y0), (x1, y1) = start, end
    length = max(1.0, float(np.hypot(x1 - x0, y1 - y0)))
    for a in np.arange(0, length, 2 * dash):
        b = min(a + dash, length)
        draw.line([(x0 + (x1 - x0) * a / length, y0 + (y1 - y0) * a / length),
                   (x0 + (x1 - x0) * b / length, y0 + (y1 - y0) * b / length)], fill=fill, width=width)


def marker(draw, x, y, colour, filled=True, r=4, shape="circle"):
    box = (x - r, y - r, x + r, y + r)
    kwargs = {"fill": colour} if filled else {"outline": colour, "width": 2, "fill": (255, 255, 255)}
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, **kwargs)


def line_plot(series, title, xlabel, ylabel, size=(900, 520), x_range=(0.0, 1.04)):
    """A PIL image of `size`: one entry of `series` per legend row.

    Each series is a dict with `label`, `colour`, `xs`, `ys` and `style`: "line" (solid line, filled dots),
    "markers" (hollow squares, no line: reference values) or "hline" (a dashed horizontal line at ys[0]).
    """
    width, height = size
    left, right, top, bottom = 70, 230, 46, 56
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [y for s in series for y in s["ys"] if y is not None and np.isfinite(y)]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = max(0.5, 0.08 * (high - low))
    yticks = nice_ticks(low - pad, high + pad)
    y0, y1 = yticks[0], yticks[-1]
    x0, x1 = x_range

    def to_px(x, y):
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    # axes, grid and ticks
    draw.rectangle((left, top, width - right, height - bottom), outline=(0, 0, 0))
    for y in yticks:
        _, py = to_px(x0, y)
        draw.line([(left, py), (width - right, py)], fill=(225, 225, 225))
        text(draw, (left - 6, py), f"{y:g}", 12, "rm")
    for x in np.arange(0, x1 + 1e-9, 0.1):  # a tick every 10% of labels
        px, _ = to_px(x, y0)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill=(0, 0, 0))
        text(draw, (px, height - bottom + 7), f"{100 * x:.0f}%", 12, "mt")
    text(draw, ((left + width - right) / 2, height - 16), xlabel, 13, "mm")
    text(draw, (12, top - 24), ylabel, 13, "lt")
    text(draw, (width / 2, 14), title, 15, "mm")

    # the series, then the legend
    for s in series:
        points = [to_px(x, y) for x, y in zip(s["xs"], s["ys"]) if y is not None and np.isfinite(y)]
        if s["style"] == "hline" and points:
            dashed_line(draw, (left, points[0][1]), (width - right, points[0][1]), s["colour"], width=2)
        elif s["style"] == "line":
            if len(points) > 1:
                draw.line(points, fill=s["colour"], width=2)
            for p in points:
                marker(draw, *p, s["colour"])
        else:
            for p in points:
                marker(draw, *p, s["colour"], filled=False, shape="square")
    for i, s in enumerate(series):
        ly = top + 10 + 20 * i
        lx = width - right + 14
        if s["style"] == "hline":
            dashed_line(draw, (lx, ly), (lx + 24, ly), s["colour"], width=2, dash=4)
        elif s["style"] == "line":
            draw.line([(lx, ly), (lx + 24, ly)], fill=s["colour"], width=2)
            marker(draw, lx + 12, ly, s["colour"])
        else:
            marker(draw, lx + 12, ly, s["colour"], filled=False, shape="square")
        text(draw, (lx + 32, ly), s["label"], 12, "lm")
    return image


# similarity maps: three panels [image | presence | absence], a title band above, a colour bar below
MARGIN, TITLE_BAND, BAR_BAND = 8, 44, 40


def figure_size(panel):
    """(width, height) of `similarity_figure` in pixels: (3·panel + 32, panel + 100)."""
    return 3 * panel + 4 * MARGIN, MARGIN + TITLE_BAND + panel + MARGIN + BAR_BAND


def overlay(image, values, low, high, alpha=0.5):
    """A square RGB image with (H, W) `values` upsampled bilinearly and drawn over it in the jet colours."""
    side = image.size[0]
    grid = torch.as_tensor(values, dtype=torch.float32)[None, None]  # (1, 1, H, W)
    up = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
    heat = Image.fromarray(jet((up - low) / max(high - low, 1e-12)))
    return Image.blend(image.convert("RGB"), heat, alpha)


def similarity_figure(image, maps, captions, title, panel=256, value_name="cosine similarity"):
    """Image beside one overlay per map (two maps: presence, absence), on one shared colour scale.

    image: a PIL image (resized to panel x panel); maps: two (H, W) arrays; captions: three panel titles.
    Returns a PIL image of `figure_size(panel)`.
    """
    if len(maps) != 2 or len(captions) != 3:
        raise ValueError(f"expected 2 maps and 3 captions, got {len(maps)} and {len(captions)}")
    low = float(min(np.min(m) for m in maps))
    high = float(max(np.max(m) for m in maps))
    width, height = figure_size(panel)
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    text(draw, (width / 2, MARGIN + 9), title, 14, "mm")
    base = image.convert("RGB").resize((panel, panel), Image.BILINEAR)
    panels = [base] + [overlay(base, m, low, high) for m in maps]
    y = MARGIN + TITLE_BAND
    for i, (p, caption) in enumerate(zip(panels, captions)):
        x = MARGIN + i * (panel + MARGIN)
        figure.paste(p, (x, y))
        text(draw, (x + panel / 2, y - 10), caption, 12, "mm")

    # the colour bar under the two maps, labelled with the values at its ends
    bar_x0, bar_x1 = 2 * MARGIN + panel, width - MARGIN
    bar_y = y + panel + MARGIN
    ramp = jet(np.linspace(0, 1, bar_x1 - bar_x0)[None].repeat(12, axis=0))  # (12, bar width, 3)
    figure.paste(Image.fromarray(ramp), (bar_x0, bar_y))
    text(draw, (bar_x0, bar_y + 15), f"{low:.3f}", 12, "lt")
    text(draw, (bar_x1, bar_y + 15), f"{high:.3f}", 12, "rt")
    text(draw, ((bar_x0 + bar_x1) / 2, bar_y + 15), value_name, 12, "mt")
    return figure
