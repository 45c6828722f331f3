"""A hostile-input corpus, generated on the fly: the files a careless user or an attacker may hand
to `vgg-onnx infer`, the C++ host and the Node host (the rules they meet: docs/decoding.md).

Each case makes one file (or FIFO, link, folder) in a given folder and says which line every host
that follows docs/decoding.md prints for it. Image cases are classified beside a good image, which
must still get its result; model cases are given as the model.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from metadata_edit import edited_model, legacy_layout_model

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
HUGE = 30000  # 30000 x 30000 = 9e8 pixels, nine times the default limit of 1e8
MAX_IMAGE_BYTES = 1 << 30  # docs/decoding.md: the size bound on an image file

__all__ = ["Case", "IMAGE_CASES", "MODEL_CASES", "CASES", "HUGE", "MAX_IMAGE_BYTES"]


@dataclass(frozen=True)
class Case:
    """One hostile input: make(folder, good_model) creates it in folder and returns its path."""

    name: str
    kind: str  # "image": classified beside a good image; "model": given as the model
    make: Callable[[Path, Path], Path]
    fragment: str  # in the one error line (and the error record) of every host
    options: tuple[str, ...] = ()  # extra command-line options for this case


# --- images ---------------------------------------------------------------------------------

def png_with_header(width: int, height: int) -> bytes:
    """A well-formed PNG whose header declares width x height over one tiny IDAT."""
    from test_preprocessing import png_header_only

    return png_header_only(width, height)


def tiff_with_duplicated_size(first: int, second: int) -> bytes:
    """A little-endian gray TIFF listing ImageWidth and ImageLength twice: first x first, then
    second x second. libtiff takes the first of a duplicated tag."""
    entries = [(256, 3, 1, first), (256, 3, 1, second), (257, 3, 1, first), (257, 3, 1, second),
               (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1), (273, 4, 1, 0), (277, 3, 1, 1),
               (278, 3, 1, first), (279, 4, 1, second * second)]
    data_offset = 8 + 2 + 12 * len(entries) + 4
    entries[7] = (273, 4, 1, data_offset)
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + struct.pack("<HH" if kind == 3 else "<I", *((value, 0) if kind == 3 else (value,)))
        for tag, kind, count, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\x80" * (second * second)


def jpeg_with_frame(width: int, height: int) -> bytes:
    """SOI, a baseline frame header declaring width x height, EOI: a header check must refuse it."""
    frame = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + frame + b"\xff\xd9"


def bmp_with_size(width: int, height: int) -> bytes:
    """A BITMAPINFOHEADER declaring width x height (negative: top-down) and no pixels."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def entry(name: str, create: Callable[[Path], object]) -> Callable[[Path, Path], Path]:
    """A case maker: create(folder / name) makes the entry."""
    def make(folder: Path, _model: Path) -> Path:
        path = folder / name
        create(path)
        return path
    return make


def write(data: bytes, name: str) -> Callable[[Path, Path], Path]:
    return entry(name, lambda path: path.write_bytes(data))


def truncated(sample: str, name: str) -> Callable[[Path, Path], Path]:
    """The first 60% of a sample: its header intact, its end missing."""
    def cut(path: Path) -> None:
        data = (SAMPLES / sample).read_bytes()
        path.write_bytes(data[:len(data) * 3 // 5])
    return entry(name, cut)


def oversized(path: Path) -> None:
    """A JPEG signature, then a hole: one byte over the size bound, and no disk space used."""
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff")
        f.truncate(MAX_IMAGE_BYTES + 1)


def sliver(path: Path) -> None:
    import cv2

    cv2.imwrite(str(path), np.full((8, 20000), 128, np.uint8))


def fifo(name: str) -> Callable[[Path, Path], Path]:
    return entry(name, os.mkfifo)


def link(name: str, target: str) -> Callable[[Path, Path], Path]:
    return entry(name, lambda path: os.symlink(target, path))


def folder_named(name: str) -> Callable[[Path, Path], Path]:
    return entry(name, Path.mkdir)


NOT_REGULAR = "not a regular file"
UNSUPPORTED = "not a supported image"
HUGE_IMAGE = f"{HUGE}x{HUGE} image exceeds the pixel limit of 100000000 (--max-pixels)"

IMAGE_CASES = [
    Case("fifo", "image", fifo("a.jpg"), NOT_REGULAR),
    Case("dev-zero", "image", link("z.jpg", "/dev/zero"), NOT_REGULAR),
    Case("folder", "image", folder_named("x.jpg"), NOT_REGULAR),
    Case("dangling-link", "image", link("gone.jpg", "nowhere/missing.jpg"), "no such file"),
    Case("oversized-file", "image", entry("big.jpg", oversized),
         f"file of {MAX_IMAGE_BYTES + 1} bytes exceeds the size limit of {MAX_IMAGE_BYTES} bytes"),
    Case("empty", "image", write(b"", "empty.jpg"), "empty file"),
    Case("random-bytes", "image", write(np.random.default_rng(7).bytes(4096), "noise.jpg"), UNSUPPORTED),
    Case("svg-as-jpg", "image", write(b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
                                      b'<rect width="64" height="64" fill="red"/></svg>', "drawing.jpg"), UNSUPPORTED),
    Case("truncated-jpeg", "image", truncated("rocket.jpg", "cut.jpg"), "truncated JPEG"),
    Case("truncated-png", "image", truncated("chelsea.png", "cut.png"), "truncated PNG"),
    Case("tiff-duplicated-size", "image", write(tiff_with_duplicated_size(HUGE, 8), "twice.tif"), HUGE_IMAGE),
    Case("png-huge-header", "image", write(png_with_header(HUGE, HUGE), "huge.png"), HUGE_IMAGE),
    Case("jpeg-huge-frame", "image", write(jpeg_with_frame(HUGE, HUGE), "huge.jpg"), HUGE_IMAGE),
    Case("bmp-huge-top-down", "image", write(bmp_with_size(HUGE, -HUGE), "huge.bmp"), HUGE_IMAGE),
    Case("png-zero-size", "image", write(png_with_header(0, 0), "zero.png"), "invalid image size 0x0"),
    # 20000x8 is small, but its shorter side rescaled to 256 makes it 640000x256
    Case("sliver", "image", entry("sliver.png", sliver), "rescaled to 640000x256 it would exceed the pixel limit of 100000000",
         ("--scales", "256")),
]


# --- models ---------------------------------------------------------------------------------

def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field; the declared length is the payload's."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


# A 43-byte file whose graph length is 2^64 - 11: read as a signed offset it points backwards.
FORGED_BACKWARDS = (b"\x08\x08" + varint(7 << 3 | 2) + varint(2 ** 64 - 11) + b"\x08\x01" * 15)[:43]
# An 11-byte file declaring a 2^62-byte metadata entry.
FORGED_HUGE_ENTRY = varint(14 << 3 | 2) + varint(2 ** 62) + b"\x00"
# A metadata entry whose key declares 8.2 GB.
FORGED_HUGE_KEY = field(14, varint(1 << 3 | 2) + varint(8_200_000_000) + b"vgg_onnx_format")
# A varint that never ends.
FORGED_ENDLESS_VARINT = b"\x08" + b"\xff" * 40


def truncated_model(folder: Path, model: Path) -> Path:
    data = model.read_bytes()
    path = folder / "truncated.onnx"
    path.write_bytes(data[:len(data) // 2])
    return path


def with_metadata(name: str, raw: str | None = None, **changes) -> Callable[[Path, Path], Path]:
    """The good model with its metadata document changed (see metadata_edit.edited_model)."""
    def make(folder: Path, model: Path) -> Path:
        return edited_model(model, folder / f"{name}.onnx", raw=raw, **changes)
    return make


def with_legacy_layout(folder: Path, model: Path) -> Path:
    return legacy_layout_model(model, folder / "legacy.onnx")


def with_forged_initializer(folder: Path, model: Path) -> Path:
    """The good model whose first initializer claims 100000 times the elements its data holds."""
    import onnx

    proto = onnx.load(str(model))
    proto.graph.initializer[0].dims[0] *= 100000
    path = folder / "forged_initializer.onnx"
    onnx.save(proto, str(path))
    return path


MALFORMED = "malformed vgg-onnx metadata"
DEEP = 1_000_000  # JSON nested this deep overflows a recursive parser's (or copier's) stack

MODEL_CASES = [
    Case("model-backwards-length", "model", write(FORGED_BACKWARDS, "backwards.onnx"), "backwards.onnx"),
    Case("model-huge-entry", "model", write(FORGED_HUGE_ENTRY, "entry.onnx"), "entry.onnx"),
    Case("model-huge-key", "model", write(FORGED_HUGE_KEY, "key.onnx"), "key.onnx"),
    Case("model-endless-varint", "model", write(FORGED_ENDLESS_VARINT, "endless.onnx"), "endless.onnx"),
    Case("model-truncated", "model", truncated_model, "truncated.onnx"),
    Case("model-empty", "model", write(b"", "empty.onnx"), "empty.onnx"),
    Case("model-forged-initializer", "model", with_forged_initializer, "forged_initializer.onnx"),
    Case("model-fifo", "model", fifo("fifo.onnx"), NOT_REGULAR),
    Case("model-dev-zero", "model", link("zero.onnx", "/dev/zero"), NOT_REGULAR),
    Case("model-folder", "model", folder_named("folder.onnx"), NOT_REGULAR),
    Case("model-classes-mismatch", "model", with_metadata("fewer_classes", classes=lambda c: c[:-1]), MALFORMED),
    Case("model-no-test-scales", "model", with_metadata("no_scales", test_scales=[]), MALFORMED),
    Case("model-negative-crop", "model", with_metadata("negative_crop", crop_size=-64), MALFORMED),
    Case("model-crop-not-32", "model", with_metadata("crop_50", crop_size=50), MALFORMED),
    Case("model-scale-below-crop", "model", with_metadata("small_scale", test_scales=[32]), MALFORMED),
    Case("model-deep-json", "model", with_metadata("deep", raw='{"vgg_onnx_format": 2, "classes": ' + "[" * DEEP
                                                   + "]" * DEEP + "}"), MALFORMED),
    Case("model-metadata-not-json", "model", with_metadata("not_json", raw="{'vgg_onnx_format': 2"), MALFORMED),
    Case("model-format-string", "model", with_metadata("format_string", vgg_onnx_format="2"), "metadata format"),
    Case("model-format-3", "model", with_metadata("format_3", vgg_onnx_format=3), "metadata format 3"),
    Case("model-legacy-layout", "model", with_legacy_layout, "export it again"),
    Case("model-negative-scale", "model", with_metadata("negative_scale", test_scales=[-96]), MALFORMED),
]

CASES = IMAGE_CASES + MODEL_CASES
