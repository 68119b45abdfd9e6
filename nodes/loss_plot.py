"""The loss curve of an erasure as a ComfyUI IMAGE (a float tensor of shape (1, H, W, 3) in [0, 1])."""

import numpy as np
import torch
from PIL import Image, ImageDraw

WIDTH, HEIGHT, MARGIN = 512, 256, 36


def loss_curve_image(losses: list[float], title: str = "") -> torch.Tensor:
    """Plot ``losses`` (one per iteration) on a white background with axes and the first/last/min values."""
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = MARGIN, 20, WIDTH - 12, HEIGHT - MARGIN
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=(0, 0, 0), width=1)
    finite = [v for v in losses if np.isfinite(v)]
    if finite:
        low, high = min(finite), max(finite)
        span = (high - low) or max(abs(high), 1e-12)
        count = len(losses)
        points = []
        for index, value in enumerate(losses):
            if not np.isfinite(value):
                continue
            x = left + (right - left) * (index / max(count - 1, 1))
            y = bottom - (bottom - top) * ((value - low) / span)
            points.append((x, y))
        if len(points) == 1:
            x, y = points[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(200, 30, 30))
        else:
            draw.line(points, fill=(200, 30, 30), width=2)
        draw.text((left + 4, 4), f"{title}  loss: first {finite[0]:.4g}, last {finite[-1]:.4g}, min {low:.4g}", fill=(0, 0, 0))
        draw.text((4, top - 4), f"{high:.3g}", fill=(80, 80, 80))
        draw.text((4, bottom - 8), f"{low:.3g}", fill=(80, 80, 80))
        draw.text((left, bottom + 6), "1", fill=(80, 80, 80))
        draw.text((right - 40, bottom + 6), f"{count} it.", fill=(80, 80, 80))
    else:
        draw.text((left + 4, 4), f"{title}  (no loss values)", fill=(0, 0, 0))
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)
