"""Class lists. ImageNet-1k ships with the package in the standard order.

Names repeat in ImageNet-1k ("crane" 134 and 517, "maillot" 638 and 639): key classes by
index or synset, never by name.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from importlib import resources

__all__ = ["ClassInfo", "classes_from_dicts", "classes_from_folders", "default_classes", "imagenet_classes",
           "imagenet_synset_names"]


@dataclass(frozen=True)
class ClassInfo:
    index: int
    synset: str  # WordNet id such as "n01440764"; empty when the class has none
    name: str

    def to_dict(self) -> dict:
        return asdict(self)


@functools.cache
def imagenet_classes() -> tuple[ClassInfo, ...]:
    text = resources.files("vgg_onnx").joinpath("data/imagenet1k_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines()[1:] if line]
    return tuple(ClassInfo(int(i), synset, name) for i, synset, name in rows)


def imagenet_synset_names() -> dict[str, str]:
    return {c.synset: c.name for c in imagenet_classes()}


def default_classes(num_classes: int) -> tuple[ClassInfo, ...]:
    """ImageNet-1k for 1000 classes, otherwise placeholders named class_<i>."""
    if num_classes == 1000:
        return imagenet_classes()
    return tuple(ClassInfo(i, "", f"class_{i}") for i in range(num_classes))


def classes_from_folders(folder_names: list[str]) -> tuple[ClassInfo, ...]:
    """Classes of an ImageFolder: sorted folder names; ImageNet synsets get their names."""
    names = imagenet_synset_names()
    out = []
    for i, folder in enumerate(sorted(folder_names)):
        if folder in names:
            out.append(ClassInfo(i, folder, names[folder]))
        else:
            out.append(ClassInfo(i, "", folder))
    return tuple(out)


def classes_from_dicts(items: list[dict]) -> tuple[ClassInfo, ...]:
    return tuple(ClassInfo(int(d["index"]), str(d.get("synset", "")), str(d["name"])) for d in items)
