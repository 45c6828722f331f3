"""The project's preprocessing conventions as data (docs/protocol.md §5), recorded in every model's
metadata so that every host (Python, C++, Node) follows the same rules and gets the same numbers.

The code that implements them: vgg_onnx/decoding.py (image files -> RGB), vgg_onnx/scales.py
(rescale rule, crop grid, scales) and vgg_onnx/normalization.py (presets; applied in the graph).
"""

from __future__ import annotations

__all__ = ["CONVENTIONS"]

CONVENTIONS = {
    "decode": "8-bit RGB; grayscale replicated to 3 channels; alpha dropped; 16-bit scaled to 8 bits "
              "(round(v*255/65535)); EXIF orientation applied; embedded ICC profiles not applied (values as stored)",
    "rescale": "isotropic: shorter side = Q exactly, longer side = floor(L*Q/shorter + 0.5) "
               "= (2*L*Q + shorter) // (2*shorter); OpenCV INTER_AREA when shrinking, INTER_LINEAR when enlarging",
    "input": "float32 N x 3 x H x W, RGB, values 0..255, H and W at least crop_size; normalisation is inside the graph",
    "dense": "per scale: softmax of the spatial mean of the score map (output 'probs'), mean over "
             "{image, mirrored image}; then mean over scales",
    "multi_crop": "per scale: crops of crop_size at left = floor(i*(W-c)/4 + 0.5), top = floor(j*(H-c)/4 + 0.5), "
                  "i, j in 0..4, plus their mirror images (50 crops); mean of all posteriors over all scales",
    "combination": "equal-weight mean of posteriors (dense and multi-crop; several models)",
}
