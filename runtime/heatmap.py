"""`infer --heatmap DIR`: the top class's dense score map over the image, with its legend.

Each PNG is the image with the class's score map (mean over fused models, each stretched to
the image) in OpenCV's JET colours blended half and half over it, and beneath it a band that
names the class and shows the colour scale: this image's own score range, lowest (blue) to
highest (red), with the two score values written at its ends.
"""

from __future__ import annotations

import os

import numpy as np

from vgg_onnx.atomic import atomic_write_bytes
from vgg_onnx.errors import VggOnnxError

__all__ = ["heatmap_image", "HeatmapWriter"]

BAND_HEIGHT = 44  # pixels under the image for the class name and the colour scale
MIN_WIDTH = 320  # narrower images get a wider canvas so the legend stays legible
FONT_SCALE = 0.42


def mean_score_map(score_maps: list[np.ndarray], class_index: int, width: int, height: int) -> np.ndarray:
    import cv2

    maps = [cv2.resize(m[class_index].astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
            for m in score_maps if m is not None]
    return np.mean(maps, axis=0)


def legend_band(width: int, label: str, low: float, high: float) -> np.ndarray:
    """BGR band: the class label, then `low` [blue ... red] `high`."""
    import cv2

    band = np.full((BAND_HEIGHT, width, 3), 255, np.uint8)
    font, black = cv2.FONT_HERSHEY_SIMPLEX, (0, 0, 0)
    cv2.putText(band, label, (6, 15), font, FONT_SCALE, black, 1, cv2.LINE_AA)
    low_text, high_text = f"{low:.3g}", f"{high:.3g}"
    low_w = cv2.getTextSize(low_text, font, FONT_SCALE, 1)[0][0]
    high_w = cv2.getTextSize(high_text, font, FONT_SCALE, 1)[0][0]
    left, right = 12 + low_w, width - 12 - high_w
    ramp = np.linspace(0, 255, max(1, right - left)).astype(np.uint8)[None, :]
    colours = cv2.applyColorMap(ramp, cv2.COLORMAP_JET)
    band[24:38, left:right] = np.repeat(colours, 14, axis=0)
    cv2.putText(band, low_text, (6, 36), font, FONT_SCALE, black, 1, cv2.LINE_AA)
    cv2.putText(band, high_text, (right + 6, 36), font, FONT_SCALE, black, 1, cv2.LINE_AA)
    return band


def heatmap_image(image: np.ndarray, score_maps: list[np.ndarray], class_index: int, label: str) -> np.ndarray:
    """BGR uint8 picture: the heat over the RGB image, and the legend band beneath it. The
    colours span this image's own score range, which the legend states."""
    import cv2

    height, width = image.shape[:2]
    heat = mean_score_map(score_maps, class_index, width, height)
    low, high = float(heat.min()), float(heat.max())
    span = high - low
    level = ((heat - low) / span * 255 if span > 0 else np.zeros_like(heat)).astype(np.uint8)
    colored = cv2.applyColorMap(level, cv2.COLORMAP_JET)
    blended = cv2.addWeighted(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), 0.5, colored, 0.5, 0)
    canvas_width = max(width, MIN_WIDTH)
    canvas = np.full((height + BAND_HEIGHT, canvas_width, 3), 255, np.uint8)
    canvas[:height, :width] = blended
    canvas[height:] = legend_band(canvas_width, f"{label} (class score)", low, high)
    return canvas


class HeatmapWriter:
    """--heatmap DIR: DIR/<image name>.png, with -1, -2... when two images share a name."""

    def __init__(self, folder: str):
        self.folder = folder
        self.used: set[str] = set()
        os.makedirs(folder, exist_ok=True)

    def write(self, image: np.ndarray, score_maps: list[np.ndarray], class_index: int, label: str,
              source: str) -> str:
        """Write one heatmap; returns its path. OSError (one line) when it cannot be written."""
        import cv2

        picture = heatmap_image(image, score_maps, class_index, label)
        stem = os.path.splitext(os.path.basename(source))[0]
        name, n = stem + ".png", 0
        while name in self.used:
            n += 1
            name = f"{stem}-{n}.png"
        self.used.add(name)
        ok, data = cv2.imencode(".png", picture)
        if not ok:
            raise OSError("PNG encoding failed")
        path = os.path.join(self.folder, name)
        try:
            atomic_write_bytes(path, data.tobytes())
        except VggOnnxError as e:  # a read-only folder: this image fails, the run goes on
            raise OSError(str(e)) from None
        return path
