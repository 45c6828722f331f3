"""The runtime's Python API: the README's example against `vgg-onnx infer`, the three input
kinds, threads sharing one model, batches, fusion, score maps and the errors users see."""

from __future__ import annotations

import json
import subprocess
import threading

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import PYTHON, REPO, SAMPLES, export_small_model
from vgg_onnx.cli import main
from vgg_onnx.runtime import (Classification, ImageError, Model, Prediction, VggOnnxError, fuse, load_model,
                              protocol)

SAMPLE = SAMPLES / "chelsea.png"


@pytest.fixture(scope="module")
def model(small_model) -> Model:
    return load_model(small_model, provider="cpu", threads=1)


def readme_python_example() -> str:
    text = (REPO / "README.md").read_text()
    text = text[text.index("## Python API"):]
    start = text.index("```python\n") + len("```python\n")
    return text[start:text.index("```", start)]


def infer_top5(small_model, path) -> list[dict]:
    result = CliRunner().invoke(main, ["infer", str(path), "-m", str(small_model), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)[0]["top_k"]


def test_readme_example_prints_what_infer_prints(small_model, cli_env):
    code = readme_python_example().replace('"models/vgg_D.onnx"', repr(str(small_model)))
    assert "models/vgg_D.onnx" not in code
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=cli_env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split(maxsplit=2) for line in proc.stdout.splitlines()]
    assert len(lines) == 15  # top-5 for the path, the bytes and the array
    expected = infer_top5(small_model, SAMPLE)
    for kind in range(3):  # path, bytes, array
        got = lines[5 * kind:5 * kind + 5]
        assert [int(index) for _, index, _ in got] == [e["index"] for e in expected]
        np.testing.assert_allclose([float(p) for p, _, _ in got], [e["prob"] for e in expected], atol=1e-6)
        assert [rest.strip() for _, _, rest in got] == [f"{e['synset']} {e['name']}".strip() for e in expected]


def test_the_three_input_kinds_give_identical_posteriors(model):
    data = SAMPLE.read_bytes()
    rgb = cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB)
    for method in ("dense", "multi-crop", "both"):
        path_result, bytes_result, array_result = (model.classify(x, method=method) for x in (SAMPLE, data, rgb))
        assert np.array_equal(path_result.posterior, bytes_result.posterior)
        assert np.array_equal(path_result.posterior, array_result.posterior)
    assert path_result.source == str(SAMPLE) and bytes_result.source == "<bytes #0>"
    assert array_result.source == "<array #0>"
    assert abs(path_result.posterior.sum() - 1) < 1e-6 and path_result.posterior.dtype == np.float64


def test_four_threads_sharing_one_model_agree_with_sequential_calls(model):
    images = [SAMPLES / name for name in ("chelsea.png", "coffee.png", "rocket.jpg", "camera.png")] * 2
    sequential = [model.classify(p, method="both").posterior for p in images]
    results: dict = {}

    def work(offset: int) -> None:
        for i in range(offset, len(images), 4):
            results[i] = model.classify(images[i], method="both").posterior

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(len(images)))
    for i, expected in enumerate(sequential):
        np.testing.assert_allclose(results[i], expected, rtol=0, atol=1e-7)


def test_result_carries_the_class_metadata(model, small_model):
    result = model.classify(SAMPLE, method="multi-crop", scales=(64, 96), flip=False)
    assert isinstance(result, Classification) and result.ok and result.method == "multi-crop"
    assert result.scales == (64, 96) and result.models == (str(small_model),) and result.seconds > 0
    top = result.top_k(3)
    assert all(isinstance(p, Prediction) for p in top) and [p.prob for p in top] == sorted(
        (p.prob for p in top), reverse=True)
    assert top[0].name == model.classes[top[0].index].name == f"class_{top[0].index}"
    assert top[0].prob == pytest.approx(result.posterior.max())


def test_the_scheduler_reproduces_the_unbatched_protocol(model, small_model):
    import onnxruntime as ort

    from vgg_onnx.decoding import load_image

    session = ort.InferenceSession(str(small_model), providers=["CPUExecutionProvider"])
    network = lambda batch: session.run(["probs"], {"image": batch})[0]  # noqa: E731
    image = load_image(SAMPLES / "coffee.png")
    for method in ("dense", "multi-crop", "both"):
        expected = protocol.classify_image(network, image, [64, 96, 128], 64, method)
        np.testing.assert_allclose(model.classify(image, method=method).posterior, expected, atol=2e-6)


def test_classify_many_goes_on_past_a_bad_image(model, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really")
    images = [SAMPLE, str(bad), SAMPLES / "coffee.png", (SAMPLES / "rocket.jpg").read_bytes()]
    results = list(model.classify_many(images, batch_size=3, workers=2))
    assert [r.ok for r in results] == [True, False, True, True]
    assert results[1].posterior is None and results[1].error.startswith(f"{bad}: ")
    assert results[3].source == "<bytes #3>"
    for image, result in zip(images, results):
        if result.ok:
            np.testing.assert_allclose(result.posterior, model.classify(image).posterior, atol=2e-6)
    with pytest.raises(ImageError):
        results[1].top_k()


def test_fuse_averages_the_models(model, tmp_path):
    other = load_model(export_small_model(tmp_path / "other.onnx", seed=4, train_scales=(128,)), provider="cpu")
    ensemble = fuse([model, other])
    fused = ensemble.classify(SAMPLE, method="dense")
    a, b = model.classify(SAMPLE).posterior, other.classify(SAMPLE).posterior
    np.testing.assert_allclose(fused.posterior, (a + b) / 2, atol=2e-6)
    np.testing.assert_allclose(fused.model_posteriors[1], b, atol=2e-6)
    assert fused.scales == (64, 96, 128, 160) and len(ensemble.paths) == 2
    five = load_model(export_small_model(tmp_path / "five.onnx", num_classes=5), provider="cpu")
    with pytest.raises(VggOnnxError, match="same class list"):
        fuse([model, five])


def test_score_maps(model):
    result = model.classify(SAMPLE, score_maps=True)  # 451 x 300 -> 96 x 64 at scale 64
    assert result.score_map(64).shape == (10, 1, 2) and result.score_map(128).shape[0] == 10
    with pytest.raises(KeyError, match="no score map at scale 100"):
        result.score_map(100)
    with pytest.raises(KeyError, match="score_maps=True"):
        model.classify(SAMPLE).score_map(64)


def test_arrays_are_converted_or_refused_clearly(model):
    rgb = cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB)
    gray = rgb[..., 1]
    np.testing.assert_array_equal(model.classify(gray).posterior,
                                  model.classify(np.dstack([gray] * 3)).posterior)
    rgba = np.dstack([rgb, np.full(gray.shape, 7, np.uint8)])
    np.testing.assert_array_equal(model.classify(rgba).posterior, model.classify(rgb).posterior)
    for bad, message in ((rgb.astype(np.float32) / 255, "float32 array: expected uint8 RGB 0..255"),
                         (np.zeros((4, 4, 2), np.uint8), "expected H x W x 3"),
                         (np.zeros((0, 4, 3), np.uint8), "invalid image size 4x0"),
                         ("no/such/file.jpg", "no/such/file.jpg: cannot read"),
                         (b"GIF89a", "truncated or corrupt"),
                         (12, "cannot classify a int")):
        with pytest.raises(ImageError, match=message) as e:
            model.classify(bad)
        assert "\n" not in str(e.value)


def test_the_pixel_limit_holds_for_every_input_kind(small_model):
    small = load_model(small_model, provider="cpu", max_pixels=300 * 300)
    rgb = cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB)  # 451 x 300
    for image in (SAMPLE, SAMPLE.read_bytes(), rgb):
        with pytest.raises(ImageError, match="451x300 image exceeds the pixel limit of 90000"):
            small.classify(image)


def test_public_names_are_documented():
    import inspect

    import vgg_onnx.runtime as runtime

    for name in runtime.__all__:
        obj = getattr(runtime, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name
    for cls in (Model, Classification):
        for name, member in vars(cls).items():
            if not name.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                assert inspect.getdoc(member), f"{cls.__name__}.{name}"
                if inspect.isfunction(member):
                    assert "return" in inspect.get_annotations(member), f"{cls.__name__}.{name}"
    for name in protocol.__all__:
        if inspect.isfunction(getattr(protocol, name)):
            assert inspect.getdoc(getattr(protocol, name)), name


def test_docs_api_is_generated_from_the_docstrings():
    from vgg_onnx.runtime.apidoc import render

    assert (REPO / "docs" / "api.md").read_text() == render(), \
        "docs/api.md is stale: python -m vgg_onnx.runtime.apidoc > docs/api.md"
    text = render()
    for name in ("load_model", "fuse", "Model.classify", "Model.classify_many", "Classification.top_k",
                 "Classification.score_map", "Prediction", "ImageError", "dense_posterior",
                 "multi_crop_posterior", "multi_scale_posterior", "combine_dense_multi_crop", "fuse_posteriors"):
        assert f"`{name}" in text, name
    for field in ("`path`", "`top_k[].prob`", "`method`", "`scales`", "`models`", "`seconds`", "`heatmap`"):
        assert f"| {field} |" in text, field
