"""Labelled images for `eval`: an ImageFolder whose subfolders name classes of the model.

A subfolder maps to a class by synset ("n01440764"), class index ("0") or class name
("tench"; names that occur twice in the class list are refused as ambiguous). `--labels FILE`
gives another mapping: tab-separated lines `NAME<TAB>CLASS`, NAME a subfolder or, in a folder
of images without subfolders, a file name; lines naming nothing in the folder (a header) are
skipped. ImageNet-style files such as imagenet-samples/labels.tsv work as they are.
"""

from __future__ import annotations

import os
from collections import Counter

from vgg_onnx.decoding import IMAGE_EXTENSIONS
from vgg_onnx.errors import UsageError


def class_resolver(classes):
    """CLASS text -> class index, or None with the reason."""
    by_synset = {c.synset: c.index for c in classes if c.synset}
    names = Counter(c.name.lower() for c in classes)
    by_name = {c.name.lower(): c.index for c in classes}

    def resolve(text: str):
        key = text.strip()
        if key in by_synset:
            return by_synset[key], None
        if key.isdigit():
            index = int(key)
            if 0 <= index < len(classes):
                return index, None
            return None, f"class index {index} is outside 0..{len(classes) - 1}"
        for name in (key.lower(), key.lower().replace("_", " "), key.lower().replace(" ", "_")):
            if name in by_name:
                if names[name] > 1:
                    return None, f"class name {key!r} is ambiguous ({names[name]} classes have it)"
                return by_name[name], None
        return None, "not a synset, class index or class name of the model"

    return resolve


def _images_in(folder: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def read_labels_file(path: str) -> dict[str, str]:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read labels file: {getattr(e, 'strerror', None) or e}") from None
    mapping = {}
    for line in lines:
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t") if "\t" in line else line.split(None, 1)
        if len(fields) >= 2:
            mapping[fields[0].strip()] = fields[1].strip()
    return mapping


def labelled_images(data_dir: str, classes, labels_file: str | None = None) -> list[tuple[str, int]]:
    """(image path, class index) for every image; refuses folders it cannot map, naming them all."""
    if not os.path.isdir(data_dir):
        raise UsageError(f"{data_dir}: not a folder")
    resolve = class_resolver(classes)
    mapping = read_labels_file(labels_file) if labels_file else None
    entries = sorted(os.scandir(data_dir), key=lambda e: e.name)
    folders = [e.name for e in entries if e.is_dir()]
    if not folders:  # a flat folder: labels per file
        if mapping is None:
            raise UsageError(f"{data_dir}: no class subfolders (give --labels FILE for a flat folder of images)")
        files = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
        out, problems = [], []
        for name in files:
            if name not in mapping:
                problems.append(f"{name} (not in {labels_file})")
                continue
            index, why = resolve(mapping[name])
            if index is None:
                problems.append(f"{name} -> {mapping[name]!r} ({why})")
            else:
                out.append((os.path.join(data_dir, name), index))
        if problems:
            raise UsageError(f"cannot label {len(problems)} file(s) in {data_dir}: " + "; ".join(problems[:20])
                             + (" ..." if len(problems) > 20 else ""))
        if not out:
            raise UsageError(f"{data_dir}: no images found")
        return out
    out, problems = [], []
    for folder in folders:
        spec = folder if mapping is None else mapping.get(folder)
        if spec is None:
            problems.append(f"{folder} (not in {labels_file})")
            continue
        index, why = resolve(spec)
        if index is None:
            problems.append(f"{folder}" + (f" -> {spec!r}" if spec != folder else "") + f" ({why})")
            continue
        out += [(path, index) for path in _images_in(os.path.join(data_dir, folder))]
    if problems:
        raise UsageError(f"cannot map {len(problems)} folder(s) of {data_dir} to the model's classes: "
                         + "; ".join(problems))
    if not out:
        raise UsageError(f"{data_dir}: no images found in its subfolders")
    return out


def limit_round_robin(items: list[tuple[str, int]], limit: int | None) -> list[tuple[str, int]]:
    """The first `limit` images taking one per class in turn, so a subset covers every class."""
    if limit is None or limit >= len(items):
        return items
    per_class: dict[int, list] = {}
    for item in items:
        per_class.setdefault(item[1], []).append(item)
    queues = [list(reversed(v)) for _, v in sorted(per_class.items())]
    out = []
    while len(out) < limit:
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop())
    return out
