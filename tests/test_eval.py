"""`vgg-onnx eval`: folder-to-class mapping, and error rates on an ImageFolder whose answer the
test knows because it computes the small model's rankings itself."""

from __future__ import annotations

import json

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from vgg_onnx.classes import ClassInfo, imagenet_classes
from vgg_onnx.cli import main
from vgg_onnx.decoding import load_image
from vgg_onnx.errors import UsageError
from vgg_onnx.scales import rescale
from vgg_onnx.runtime.imagefolder import class_resolver, labelled_images, limit_round_robin


def run_eval(*args):
    result = CliRunner().invoke(main, ["eval", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def dense_ranking(sess, path, scales=(64, 96, 128)) -> list[int]:
    """Plain dense evaluation with mirrors, then the classes by falling probability."""
    image = load_image(path)
    probs = []
    for q in scales:
        scaled = rescale(image, q)
        for view in (scaled, scaled[:, ::-1]):
            probs.append(sess.run(["probs"], {"image": view.transpose(2, 0, 1)[None].astype(np.float32)})[0][0])
    return list(np.argsort(-np.mean(probs, axis=0), kind="stable"))


@pytest.fixture(scope="module")
def known_folder(tmp_path_factory, small_model):
    """12 images filed so that exactly 4 are right (top-1), 4 are right only within the top 5
    (filed under their 3rd class) and 4 are wrong (filed under their last class).
    Folders are named by class name ("class_3") or by index ("7")."""
    root = tmp_path_factory.mktemp("imagefolder")
    staging = tmp_path_factory.mktemp("staging")
    sess = ort.InferenceSession(str(small_model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    for i in range(12):
        h, w = (int(v) for v in rng.integers(64, 140, 2))
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 1 + i % 3)
        path = staging / f"img{i:02d}.png"
        cv2.imwrite(str(path), image)
        ranking = dense_ranking(sess, path)
        label = ranking[[0, 2, 9][i % 3]]
        folder = root / (f"class_{label}" if i % 2 else str(label))
        folder.mkdir(exist_ok=True)
        path.rename(folder / path.name)
    return root


def test_error_rates_match_the_known_answer(small_model, known_folder):
    result = run_eval(known_folder, "--model", small_model, "--methods", "dense", "--format", "json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["images"] == 12 and report["failed"] == 0 and report["scales"] == [64, 96, 128]
    (row,) = report["rows"]
    assert row["dense"]["top1_error"] == pytest.approx(100 * 8 / 12)
    assert row["dense"]["top5_error"] == pytest.approx(100 * 4 / 12)
    assert report["images_per_second"] > 0


def test_table_has_every_method_and_fusion_rows(small_model, known_folder, tmp_path):
    from conftest import export_small_model

    other = export_small_model(tmp_path / "other.onnx", seed=5)
    result = run_eval(known_folder, "-m", small_model, "-m", other, "--limit", "5")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "top-1 / top-5 error (%)"
    assert lines[1].split() == ["model", "dense", "multi-crop", "both"]
    assert lines[3].startswith(str(small_model)) and lines[4].startswith(str(other))
    assert lines[5].startswith(f"{small_model.name} + other.onnx")
    assert lines[6].startswith("5 images (0 failed)") and "images/s" in lines[6]


def test_bad_image_in_folder_counts_as_failed(small_model, tmp_path):
    folder = tmp_path / "class_1"
    folder.mkdir()
    cv2.imwrite(str(folder / "ok.png"), np.full((70, 70, 3), 128, np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    result = run_eval(tmp_path, "-m", small_model, "--methods", "dense", "--format", "json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["images"] == 1 and report["failed"] == 1 and "broken.jpg" in report["errors"][0]


def test_unmappable_folders_are_all_listed(small_model, tmp_path):
    for name in ("class_1", "bananas", "42", "n01440764"):
        (tmp_path / name).mkdir()
    result = run_eval(tmp_path, "-m", small_model)
    assert result.exit_code == 2
    assert "cannot map 3 folder(s)" in result.stderr
    for name in ("bananas", "42 (class index 42 is outside 0..9)", "n01440764"):
        assert name in result.stderr


def test_labels_file_for_a_flat_folder(small_model, tmp_path):
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(tmp_path / name), np.full((64, 80, 3), 50, np.uint8))
    labels = tmp_path / "labels.tsv"
    labels.write_text("file\tclass_index\nb.png\tclass_2\na.png\t3\n")
    assert labelled_images(str(tmp_path), [ClassInfo(i, "", f"class_{i}") for i in range(10)], str(labels)) == \
        [(str(tmp_path / "a.png"), 3), (str(tmp_path / "b.png"), 2)]
    with pytest.raises(UsageError, match="no class subfolders"):
        labelled_images(str(tmp_path), [ClassInfo(0, "", "x")])


def test_class_resolver_on_imagenet():
    resolve = class_resolver(imagenet_classes())
    assert resolve("n01440764") == (0, None)
    assert resolve("999")[0] == 999
    assert resolve("great_white_shark") == (2, None) and resolve("Great White Shark") == (2, None)
    index, why = resolve("crane")
    assert index is None and "ambiguous" in why


def test_limit_takes_classes_in_turn():
    items = [(f"a{i}", 0) for i in range(5)] + [("b0", 1), ("c0", 2), ("c1", 2)]
    assert limit_round_robin(items, 5) == [("a0", 0), ("b0", 1), ("c0", 2), ("a1", 0), ("c1", 2)]
    assert limit_round_robin(items, None) == items


def test_table_aligns_when_an_error_is_100():
    from vgg_onnx.runtime.output import format_eval_table

    rows = [{"model": "a.onnx", "dense": {"top1_error": 100.0, "top5_error": 100.0},
             "both": {"top1_error": 5.0, "top5_error": 0.0}},
            {"model": "a.onnx + b.onnx", "dense": {"top1_error": 50.0, "top5_error": 7.5},
             "both": {"top1_error": 100.0, "top5_error": 12.5}}]
    report = {"methods": ["dense", "both"], "rows": rows, "images": 2, "failed": 0, "scales": [256],
              "flip": True, "images_per_second": 1.0}
    lines = format_eval_table(report).splitlines()
    table = lines[1:5]
    assert len({len(line) for line in table}) == 1, table  # header, rule and rows the same width
    for column in ("dense", "both"):  # each column's right edge is the header's
        edge = lines[1].index(column) + len(column)
        assert all(line[edge - 1] != " " and (edge == len(line) or line[edge] == " ") for line in lines[3:5])


def test_output_never_replaces_the_model_or_an_image(small_model, known_folder):
    image = next(p for p in sorted(known_folder.rglob("*")) if p.is_file())
    for output in (small_model, image):
        before = output.read_bytes()
        result = CliRunner().invoke(main, ["eval", str(known_folder), "--model", str(small_model),
                                           "--output", str(output)])
        assert result.exit_code == 2, result.output
        assert output.read_bytes() == before
