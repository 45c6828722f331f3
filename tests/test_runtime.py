"""The runtime's Python API: each evaluation method against a plain re-implementation, fusion,
default scales, sessions and providers, FLOPs and the MatMul graph."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from conftest import SAMPLES, export_small_model
from vgg_onnx.decoding import load_image
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.runtime import session as session_module
from vgg_onnx.scales import rescale
from vgg_onnx.runtime.evaluate import Evaluator, collect_images, top_k
from vgg_onnx.runtime.flops import dense_flops
from vgg_onnx.runtime.matmul import MATMUL_ONNX, matmul_peak
from vgg_onnx.runtime.session import ModelSession, gpu_library_problem


@pytest.fixture(scope="session")
def other_model(tmp_path_factory) -> Path:
    """Different weights and training scale 128 (test scales 96, 128, 160), same 10 classes."""
    return export_small_model(tmp_path_factory.mktemp("models") / "vgg_A_other.onnx", seed=1, train_scales=(128,))


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[str]:
    """Smooth random images of several sizes; two share a size so they share dense batches."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate([(75, 100), (75, 100), (120, 90), (64, 64), (50, 170)]):
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)
        path = folder / f"img{i}.png"
        cv2.imwrite(str(path), image)
        paths.append(str(path))
    return paths


def plain_probs(sess: ort.InferenceSession, image: np.ndarray) -> np.ndarray:
    """One HxWx3 image through the graph on its own (N = 1)."""
    x = image.transpose(2, 0, 1)[None].astype(np.float32)
    return sess.run(["probs"], {"image": x})[0][0].astype(np.float64)


def plain_dense(sess, image, scales, flip=True):
    per_scale = []
    for q in scales:
        scaled = rescale(image, q)
        views = [scaled, scaled[:, ::-1]] if flip else [scaled]
        per_scale.append(np.mean([plain_probs(sess, v) for v in views], axis=0))
    return np.mean(per_scale, axis=0)


def plain_multi_crop(sess, image, scales, crop, flip=True):
    posteriors = []
    for q in scales:
        scaled = rescale(image, q)
        h, w = scaled.shape[:2]
        lefts = [int(Fraction(i * (w - crop), 4) + Fraction(1, 2)) for i in range(5)]
        tops = [int(Fraction(j * (h - crop), 4) + Fraction(1, 2)) for j in range(5)]
        for top in tops:
            for left in lefts:
                c = scaled[top:top + crop, left:left + crop]
                posteriors.append(plain_probs(sess, c))
                if flip:
                    posteriors.append(plain_probs(sess, c[:, ::-1]))
    return np.mean(posteriors, axis=0)


SAMPLE = SAMPLES / "chelsea.png"


def ort_session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_each_method_matches_a_plain_implementation(small_model, images, flip, batch_size):
    sess = ort_session(small_model)
    model = ModelSession(small_model, "cpu", threads=1)
    scales = [64, 96, 128]
    assert model.info.test_scales == scales  # trained at 96: {S-32, S, S+32}
    evaluator = Evaluator([model], ("dense", "multi-crop", "both"), flip=flip, batch_size=batch_size)
    results = list(evaluator.run(images, workers=2))
    assert [r.path for r in results] == images
    for path, result in zip(images, results):
        assert result.error is None
        image = load_image(path)
        dense = plain_dense(sess, image, scales, flip)
        crops = plain_multi_crop(sess, image, scales, 64, flip)
        np.testing.assert_allclose(result.posteriors["dense"], dense, atol=2e-6)
        np.testing.assert_allclose(result.posteriors["multi-crop"], crops, atol=2e-6)
        np.testing.assert_allclose(result.posteriors["both"], (dense + crops) / 2, atol=2e-6)
        assert abs(result.posteriors["both"].sum() - 1) < 1e-5


def test_scales_override_and_fusion_use_each_models_own_scales(small_model, other_model, images):
    a, b = ModelSession(small_model, "cpu"), ModelSession(other_model, "cpu")
    assert b.info.test_scales == [96, 128, 160]
    sa, sb = ort_session(small_model), ort_session(other_model)
    fused = Evaluator([a, b], ("dense",))
    for path, result in zip(images, fused.run(images)):
        image = load_image(path)
        pa, pb = plain_dense(sa, image, [64, 96, 128]), plain_dense(sb, image, [96, 128, 160])
        np.testing.assert_allclose(result.model_posteriors[0]["dense"], pa, atol=2e-6)
        np.testing.assert_allclose(result.model_posteriors[1]["dense"], pb, atol=2e-6)
        np.testing.assert_allclose(result.posteriors["dense"], (pa + pb) / 2, atol=2e-6)
    override = Evaluator([a, b], ("multi-crop",), scales=[80], flip=False)
    result = next(override.run(images[:1]))
    image = load_image(images[0])
    expected = (plain_multi_crop(sa, image, [80], 64, False) + plain_multi_crop(sb, image, [80], 64, False)) / 2
    np.testing.assert_allclose(result.posteriors["multi-crop"], expected, atol=2e-6)


def test_scale_under_the_crop_is_a_usage_error(small_model):
    with pytest.raises(UsageError, match="scale 63 is smaller than the model's crop size 64"):
        Evaluator([ModelSession(small_model, "cpu")], scales=[63, 96])


def test_fusion_needs_the_same_classes(small_model, tmp_path):
    five = export_small_model(tmp_path / "five.onnx", num_classes=5)
    with pytest.raises(UsageError, match="10 classes.*5 classes.*same class list"):
        Evaluator([ModelSession(small_model, "cpu"), ModelSession(five, "cpu")])


def test_bad_images_fail_alone(small_model, images, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    evaluator = Evaluator([ModelSession(small_model, "cpu")], ("dense",), batch_size=4)
    results = list(evaluator.run([images[0], str(bad), images[1]]))
    assert results[0].error is None and results[2].error is None
    assert results[1].error == f"{bad}: not a supported image (JPEG, PNG, BMP, GIF, WebP, TIFF or PNM)"


def test_heatmap_score_maps_are_the_largest_scale(small_model, images):
    evaluator = Evaluator([ModelSession(small_model, "cpu")], ("multi-crop",), heatmap=True)
    result = next(evaluator.run(images[:1]))  # 100 x 75 -> 171 x 128 at the largest scale
    scores = ort_session(small_model).run(
        ["scores"], {"image": rescale(load_image(images[0]), 128).transpose(2, 0, 1)[None].astype(np.float32)})[0]
    assert result.score_maps[0].shape == scores.shape[1:] == (10, 3, 4)
    np.testing.assert_allclose(result.score_maps[0], scores[0], rtol=1e-5, atol=1e-5)
    assert result.image.shape == (75, 100, 3)


def test_top_k_ties_go_to_the_lower_index():
    assert top_k(np.array([0.1, 0.3, 0.3, 0.2, 0.1]), 3) == [1, 2, 3]


def test_collect_images(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.jpg", "a/b/y.PNG", "a/notes.txt", "z.png"):
        (tmp_path / name).write_bytes(b"")
    found, missing = collect_images([str(tmp_path / "a"), str(tmp_path / "*.png"), str(tmp_path / "nope.jpg"),
                                     str(tmp_path / "a" / "notes.txt")])
    assert found == [str(tmp_path / "a" / "x.jpg"), str(tmp_path / "a" / "b" / "y.PNG"), str(tmp_path / "z.png"),
                     str(tmp_path / "a" / "notes.txt")]
    assert missing == [str(tmp_path / "nope.jpg")]


# --- sessions --------------------------------------------------------------------------------

def test_model_metadata_is_read(small_model):
    model = ModelSession(small_model, "cpu", threads=1)
    assert model.info.crop_size == 64 and model.info.num_classes == 10 and model.threads == 1
    assert model.provider == "cpu"


def test_missing_corrupt_and_foreign_models(tmp_path, small_model):
    import onnx

    with pytest.raises(VggOnnxError, match="no such model file"):
        ModelSession(tmp_path / "missing.onnx", "cpu")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 50)
    with pytest.raises(VggOnnxError, match="not a loadable ONNX model") as e:
        ModelSession(corrupt, "cpu")
    assert "\n" not in str(e.value)
    foreign = tmp_path / "foreign.onnx"
    proto = onnx.load(str(small_model))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    with pytest.raises(VggOnnxError, match="no vgg-onnx metadata"):
        ModelSession(foreign, "cpu")
    matmul = tmp_path / "matmul.onnx"
    matmul.write_bytes(MATMUL_ONNX)
    with pytest.raises(VggOnnxError, match="no vgg-onnx metadata"):
        ModelSession(matmul, "cpu")


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_explicit_gpu_provider_never_falls_back(small_model, provider):
    problem = gpu_library_problem(provider)
    if problem is None:
        pytest.skip(f"{provider} libraries load on this machine")
    with pytest.raises(VggOnnxError, match=f"provider {provider} cannot run: "):
        ModelSession(small_model, provider)


@pytest.mark.parametrize("gpu_present", [True, False])
def test_auto_says_once_which_provider(small_model, capsys, monkeypatch, gpu_present):
    """Where an NVIDIA GPU exists but CUDA cannot run, auto says why; on a machine without any
    NVIDIA GPU the CPU is no surprise: one short neutral line, no library error."""
    monkeypatch.setattr(session_module, "_announced", False)
    monkeypatch.setattr(session_module, "has_nvidia_gpu", lambda: gpu_present)
    first = ModelSession(small_model, "auto")
    ModelSession(small_model, "auto")
    err = capsys.readouterr().err
    assert err.count("vgg-onnx: using the") == 1
    assert f"using the {first.provider.upper()} provider" in err
    if gpu_library_problem("cuda"):
        assert first.provider == "cpu"
        assert ("CUDA unavailable" in err) == gpu_present
        if not gpu_present:
            assert err == "vgg-onnx: using the CPU provider\n"


def test_gpu_that_onnxruntime_cannot_start(small_model, monkeypatch, capsys):
    """Libraries that load but a session that ends up on the CPU: explicit cuda fails, auto
    goes to the CPU and says why. (Simulated where the CUDA libraries do not load.)"""
    if gpu_library_problem("cuda") is None:
        pytest.skip("CUDA libraries load here: the real case, not the simulation")
    monkeypatch.setattr(session_module, "gpu_library_problem", lambda provider: None)
    monkeypatch.setattr(session_module, "has_nvidia_gpu", lambda: True)
    monkeypatch.setattr(session_module, "_announced", False)
    with pytest.raises(VggOnnxError, match="provider cuda cannot run .*could not start it"):
        ModelSession(small_model, "cuda")
    model = ModelSession(small_model, "auto")
    assert model.provider == "cpu" and model.session.get_providers() == ["CPUExecutionProvider"]
    assert "using the CPU provider (CUDA unavailable: its libraries load, but" in capsys.readouterr().err


def test_unknown_provider(small_model):
    with pytest.raises(UsageError, match="unknown provider"):
        ModelSession(small_model, "tpu")


# --- FLOPs and the MatMul graph ----------------------------------------------------------------

def test_dense_flops_known_values_and_the_graph(small_model):
    from vgg_onnx.export.flops import conv_flops  # counts from the graph itself: an independent check
    from vgg_onnx.metadata import ModelInfo
    from vgg_onnx.classes import default_classes
    from vgg_onnx.normalization import normalization_preset

    vgg16 = ModelInfo("D", default_classes(1000), normalization_preset("paper"))
    assert dense_flops(vgg16, 224, 224) == 2 * 15_470_264_320  # VGG-16's well-known 15.47 G multiply-adds
    info = ModelSession(small_model, "cpu").info
    for h, w in [(64, 64), (96, 128), (130, 97)]:
        assert dense_flops(info, h, w) == conv_flops(str(small_model), h, w)


def test_matmul_graph_is_what_onnx_helper_builds_and_measures():
    import onnx
    from onnx import TensorProto, helper

    def tensor(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"], name="matmul")], "matmul_peak",
                              [tensor("A", ["M", "K"]), tensor("B", ["K", "N"])], [tensor("C", ["M", "N"])])
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="vgg-onnx",
                              ir_version=8)
    proto = onnx.load_from_string(MATMUL_ONNX)
    assert proto == built, "runtime/matmul.py's MATMUL_ONNX: paste built.SerializeToString().hex() there"
    onnx.checker.check_model(proto, full_check=True)
    sess = ort.InferenceSession(MATMUL_ONNX, providers=["CPUExecutionProvider"])
    a, b = np.ones((3, 4), np.float32), np.full((4, 5), 2, np.float32)
    np.testing.assert_array_equal(sess.run(None, {"A": a, "B": b})[0], a @ b)
    assert matmul_peak(1, size=256, seconds=0.05) > 0.1


# --- the model's metadata, checked once at load ----------------------------------------------

def model_with_metadata(small_model, folder, **changes) -> Path:
    """The small model with some fields of its metadata document replaced."""
    from metadata_edit import edited_model

    return edited_model(small_model, folder / f"bad_{'_'.join(changes)}.onnx", **changes)


@pytest.mark.parametrize("changes,message", [
    ({"classes": [{"index": i, "synset": "", "name": f"c{i}"} for i in range(7)], "num_classes": 7},
     "it lists 7 classes but its outputs have 10"),
    ({"test_scales": []}, "its test scales [] are not a non-empty list of positive integers"),
    ({"test_scales": [96, -5]}, "its test scales [96, -5] are not a non-empty list of positive integers"),
    ({"crop_size": -64}, "its crop size -64 is not a positive multiple of 32"),
    ({"crop_size": 50}, "its crop size 50 is not a positive multiple of 32"),
    ({"test_scales": [32, 96]}, "its test scale 32 is smaller than its crop size 64"),
])
def test_bad_metadata_is_one_line_at_load_exit_1(small_model, tmp_path, changes, message):
    from click.testing import CliRunner

    from vgg_onnx.cli import main

    bad = model_with_metadata(small_model, tmp_path, **changes)
    with pytest.raises(VggOnnxError, match="malformed vgg-onnx metadata") as e:
        ModelSession(bad, "cpu")
    assert not isinstance(e.value, UsageError) and message in str(e.value) and str(bad) in str(e.value)
    out = tmp_path / "out.json"
    result = CliRunner().invoke(main, ["infer", str(SAMPLE), "-m", str(bad), "--method", "multi-crop",
                                       "--output", str(out)])
    assert result.exit_code == 1 and not out.exists()
    errors = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr


def test_metadata_is_one_versioned_document(small_model, tmp_path):
    """One metadata_props key holding the sidecar's document; other versions refused by name."""
    import json

    import onnx
    from metadata_edit import edited_model, legacy_layout_model

    from vgg_onnx.metadata import FORMAT_VERSION, METADATA_KEY, ModelInfo

    props = {p.key: p.value for p in onnx.load(str(small_model)).metadata_props}
    document = json.loads(props[METADATA_KEY])
    assert list(props) == [METADATA_KEY] and document["vgg_onnx_format"] == FORMAT_VERSION == 2
    for version, message in [("2", 'metadata format "2"'), (3, "metadata format 3"), (2.0, "metadata format 2.0"),
                             (True, "metadata format true")]:
        with pytest.raises(VggOnnxError, match=message):
            ModelSession(edited_model(small_model, tmp_path / "v.onnx", vgg_onnx_format=version), "cpu")
    with pytest.raises(VggOnnxError, match=r"metadata format 1 \(an older vgg-onnx.*export it again"):
        ModelSession(legacy_layout_model(small_model, tmp_path / "legacy.onnx"), "cpu")
    # version 1's JSON documents (checkpoints written before format 2) have the same fields and still read
    assert ModelInfo.from_json_dict(document | {"vgg_onnx_format": "1"}) == ModelInfo.from_json_dict(document)


def test_threads_are_bounded_by_the_cpus():
    from vgg_onnx.runtime.session import available_cpus, check_threads

    check_threads(None)
    check_threads(available_cpus())
    for threads in (0, available_cpus() + 1, 100000):
        with pytest.raises(UsageError, match=f"--threads {threads} must be between 1 and {available_cpus()}"):
            check_threads(threads)


def test_progress_moves_per_network_batch_and_counts_each_image_once(small_model, images, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nothing")
    shares: list[float] = []
    evaluator = Evaluator([ModelSession(small_model, "cpu")], ("both",), batch_size=4, progress=shares.append)
    results = list(evaluator.run(images + [str(bad)]))
    assert sum(r.error is None for r in results) == len(images)
    assert len(shares) > 4 * len(images)  # dense rows and 150 crops per image, 4 rows a batch
    assert sum(shares) == pytest.approx(len(images) + 1)  # the failed image counts once too
    assert all(s > 0 for s in shares)
