"""The compiler end to end: one dynamic-shape graph, verification, metadata, weights, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import PYTHON
from vgg_onnx.errors import UsageError, VggOnnxError
from vgg_onnx.export import exporter
from vgg_onnx.export.compiler import relative_error
from vgg_onnx.export.exporter import export_model
from vgg_onnx.configs import score_map_size
from vgg_onnx.export.flops import conv_flops
from vgg_onnx.metadata import ModelInfo, sidecar_path
from vgg_onnx.normalization import IMAGENET_MEAN_RGB
from vgg_onnx.train.model import VGG, init_weights

SMALL = dict(width_mult=0.125, crop=64, num_classes=10)


def quiet(message):
    pass


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_cli(*args, env=None):
    return subprocess.run([PYTHON, "-m", "vgg_onnx", *map(str, args)], capture_output=True, text=True, env=env)


def small_model(config="A", seed=0):
    torch.manual_seed(seed)
    return init_weights(VGG(config, 10, 0.125, 64), "glorot").eval()


def test_one_session_runs_several_batch_sizes_and_image_sizes(small_model):
    sess = session(small_model)
    rng = np.random.default_rng(0)
    for height, width in [(64, 64), (96, 128), (130, 77), (200, 64)]:
        images = (rng.random((5, 3, height, width)) * 255).astype(np.float32)
        single_scores, single_probs = sess.run(None, {"image": images[:1]})
        for batch in (1, 2, 5):
            scores, probs = sess.run(None, {"image": images[:batch]})
            assert scores.shape == (batch, 10, *score_map_size(height, width, 64))
            assert probs.shape == (batch, 10)
            np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
            # softmax of the score map's spatial mean
            mean = scores.mean(axis=(2, 3))
            expected = np.exp(mean - mean.max(1, keepdims=True))
            np.testing.assert_allclose(probs, expected / expected.sum(1, keepdims=True), rtol=1e-4, atol=1e-7)
            assert relative_error(probs[:1], single_probs) < 1e-5


def test_interface_is_dynamic(small_model):
    proto = onnx.load(str(small_model))
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input]
    assert dims == [["N", 3, "H", "W"]]
    assert [o.name for o in proto.graph.output] == ["scores", "probs"]
    assert proto.ir_version == 8 and proto.opset_import[0].version == 17


def test_metadata_round_trip(tmp_path):
    model = small_model()
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "m.onnx"
    result = export_model(out, "A", str(weights), normalization="paper", train_scales=[96, 128], log=quiet)
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    from_props = ModelInfo.from_metadata_props(props, str(out))
    sidecar = json.loads(open(sidecar_path(str(out))).read())
    from_sidecar = ModelInfo.from_json_dict(sidecar, "sidecar")
    assert from_props == from_sidecar == result.info
    assert list(props) == ["vgg_onnx"] and json.loads(props["vgg_onnx"]) == sidecar  # one document, one key
    assert from_props.config == "A" and from_props.num_classes == 10 and from_props.crop_size == 64
    assert from_props.width_mult == 0.125 and from_props.train_scales == [96, 128]
    assert from_props.test_scales == [96, 112, 128]
    assert from_props.weights_source == "w.pth" and len(from_props.weights_sha256) == 64
    assert from_props.param_count == sum(p.numel() for p in model.parameters())
    assert from_props.normalization.mean_rgb == IMAGENET_MEAN_RGB


def test_weights_inside_the_graph_are_the_files(tmp_path):
    model = small_model(seed=3)
    weights = tmp_path / "w.pth"
    torch.save(model.state_dict(), weights)
    export_model(tmp_path / "m.onnx", "A", str(weights), log=quiet)
    image = torch.rand(2, 3, 64, 64) * 255
    from vgg_onnx.normalization import normalization_preset

    expected = torch.softmax(model(((image - torch.tensor(normalization_preset("torchvision").mean_rgb).view(1, 3, 1, 1))
                                    / torch.tensor(normalization_preset("torchvision").std_rgb).view(1, 3, 1, 1))), 1)
    _, probs = session(tmp_path / "m.onnx").run(None, {"image": image.numpy()})
    # a bare torchvision-layout .pth defaults to torchvision's normalisation
    assert relative_error(probs, expected.detach().numpy()) < 1e-4


def test_caffe_round_trip_with_bgr_first_layer(tmp_path):
    """A Caffe net reads BGR minus the mean pixel; its named arrays, exported with the caffe preset,
    must give the same posteriors from raw RGB pixels."""
    from test_weights import caffe_arrays

    caffe_net = small_model(seed=5)
    np.savez(tmp_path / "vgg_caffe.npz", **caffe_arrays(caffe_net, style="caffe"))
    result = export_model(tmp_path / "c.onnx", "A", str(tmp_path / "vgg_caffe.npz"), log=quiet)
    assert result.info.normalization.preset == "caffe" and result.info.normalization.channel_order == "BGR"
    rgb = torch.rand(2, 3, 64, 64) * 255
    bgr_centred = rgb.flip(1) - torch.tensor(IMAGENET_MEAN_RGB[::-1]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = torch.softmax(caffe_net(bgr_centred), 1).numpy()
    _, probs = session(tmp_path / "c.onnx").run(None, {"image": rgb.numpy()})
    assert relative_error(probs, expected) < 1e-4
    # and dense evaluation on a larger image sees the same flipped first layer
    big = torch.rand(1, 3, 96, 128) * 255
    scores, _ = session(tmp_path / "c.onnx").run(None, {"image": big.numpy()})
    with torch.no_grad():
        x = caffe_net.features(big.flip(1) - torch.tensor(IMAGENET_MEAN_RGB[::-1]).view(1, 3, 1, 1))
        window = torch.flatten(x[:, :, :2, :2], 1)  # the score map's top-left cell is fc8(fc7(fc6(that window)))
        top_left = caffe_net.classifier(window)
    assert relative_error(scores[:, :, 0, 0], top_left.numpy()) < 1e-4


def test_checkpoint_defaults_come_from_its_json(tmp_path):
    from safetensors.torch import save_file

    from vgg_onnx.classes import ClassInfo
    from vgg_onnx.normalization import normalization_preset

    model = small_model()
    save_file(model.state_dict(), str(tmp_path / "best.safetensors"))
    classes = tuple(ClassInfo(i, f"n0000000{i}", f"thing {i}") for i in range(10))
    info = ModelInfo("A", classes, normalization_preset("paper", (120.5, 110.25, 100.0)), crop_size=64, width_mult=0.125,
                     train_scales=[80, 128])
    sha256 = hashlib.sha256((tmp_path / "best.safetensors").read_bytes()).hexdigest()
    (tmp_path / "best.json").write_text(json.dumps(info.to_json_dict() | {"training": {"epoch": 7},
                                                                           "weights_sha256": sha256}))
    out = tmp_path / "ckpt.onnx"
    result = export_model(out, None, str(tmp_path / "best.safetensors"), log=quiet)
    got = result.info
    assert (got.config, got.classes, got.normalization, got.train_scales) == ("A", classes, info.normalization, [80, 128])
    with pytest.raises(UsageError, match="is a checkpoint of config A, not D"):
        export_model(tmp_path / "x.onnx", "D", str(tmp_path / "best.safetensors"), log=quiet)


def test_lrn_is_one_onnx_node(tmp_path):
    result = export_model(tmp_path / "lrn.onnx", "A-LRN", **SMALL, log=quiet)
    assert result.max_error < 1e-4
    nodes = onnx.load(str(tmp_path / "lrn.onnx")).graph.node
    lrn = [n for n in nodes if n.op_type == "LRN"]
    assert len(lrn) == 1 and not any(n.op_type in ("Pow", "AveragePool", "Pad") for n in nodes)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in lrn[0].attribute}
    assert attrs == pytest.approx({"size": 5, "alpha": 1e-4, "beta": 0.75, "bias": 2.0})


@pytest.mark.parametrize("config", ["D", "A-LRN", "E-BN"])
def test_emitted_graph_is_already_minimal(config):
    """What a simplifier would remove is never emitted: one node per layer, no shape arithmetic or
    constant nodes, every initializer read by a node, and each tensor named once (docs/export.md)."""
    from vgg_onnx.classes import default_classes
    from vgg_onnx.export.compiler import compile_model
    from vgg_onnx.normalization import normalization_preset

    model = init_weights(VGG(config, 10, 0.125, 64), "glorot").eval()
    info = ModelInfo(config, default_classes(10), normalization_preset("torchvision"), crop_size=64, width_mult=0.125,
                     train_scales=[96])
    graph = compile_model(model, info)[0].graph
    ops = [n.op_type for n in graph.node]
    allowed = {"Sub", "Div", "Conv", "Relu", "MaxPool", "LRN", "GlobalAveragePool", "Flatten", "Softmax"}
    assert set(ops) <= allowed, set(ops) - allowed
    read = {i for n in graph.node for i in n.input}
    assert {t.name for t in graph.initializer} <= read
    outputs = [o for n in graph.node for o in n.output]
    assert len(outputs) == len(set(outputs))
    assert ops.count("Conv") == sum(1 for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert "BatchNormalization" not in ops and ops.count("Relu") == ops.count("Conv") - 1


@pytest.mark.parametrize("config", ["C", "E-BN"])
def test_other_configs_verify(tmp_path, config):
    result = export_model(tmp_path / "m.onnx", config, **SMALL, log=quiet)
    assert len(result.checks) == 6 and result.max_error < 1e-4
    assert {c.reference for c in result.checks} == {"FC form", "conv form"}


def test_fp16_export(tmp_path):
    fp32 = export_model(tmp_path / "a32.onnx", "A", **SMALL, log=quiet)
    fp16 = export_model(tmp_path / "a16.onnx", "A", **SMALL, fp16=True, log=quiet)
    assert fp16.bound == 1e-2 and 1e-6 < fp16.max_error < 1e-2 and fp16.info.precision == "fp16"
    proto = onnx.load(str(tmp_path / "a16.onnx"))
    weights = [t for t in proto.graph.initializer if t.name.endswith(".weight")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in list(proto.graph.input) + list(proto.graph.output))
    assert os.path.getsize(tmp_path / "a16.onnx") < 0.6 * os.path.getsize(tmp_path / "a32.onnx")
    assert fp32.info.precision == "fp32"


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_other_opsets(tmp_path, opset):
    result = export_model(tmp_path / "m.onnx", "A", **SMALL, opset=opset, log=quiet)
    assert result.max_error < 1e-4
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == opset


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "FP32_BOUND", 0.0)
    with pytest.raises(VggOnnxError, match="verification failed: max relative error .* exceeds"):
        export_model(tmp_path / "m.onnx", "A", **SMALL, log=quiet)
    assert os.listdir(tmp_path) == []


def test_flops_follow_the_graph(small_model):
    """FLOPs counted from the ONNX graph equal those counted by hooks on the torch convs."""
    from vgg_onnx.export.compiler import DenseVGG
    from vgg_onnx.normalization import normalization_preset

    dense = DenseVGG(VGG("A", 10, 0.125, 64), normalization_preset("paper"))  # the fixture's architecture
    counted = []

    def hook(module, inputs, output):
        counted.append(2 * output.shape[2] * output.shape[3] * module.weight.numel())

    for m in dense.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    for height, width in [(64, 64), (99, 131)]:
        counted.clear()
        with torch.no_grad():
            dense(torch.zeros(1, 3, height, width))
        assert conv_flops(str(small_model), height, width) == sum(counted)


def test_inspect_cli(small_model):
    table = run_cli("inspect", small_model, "--size", "96x128")
    assert table.returncode == 0, table.stderr
    assert "VGG-A" in table.stdout and "score map 2 x 3" in table.stdout and "N x 3 x H x W" in table.stdout
    as_json = run_cli("inspect", small_model, "--size", "96x128", "--format", "json")
    details = json.loads(as_json.stdout)
    assert details["config"] == "A" and details["at_size"]["score_map"] == [2, 3]
    assert details["at_size"]["flops"] == conv_flops(str(small_model), 96, 128)
    assert details["parameters"] == details["metadata"]["param_count"]
    assert details["inputs"][0]["shape"] == ["N", 3, "H", "W"]


# --- bad input: one line, non-zero exit, no traceback --------------------------------------

def assert_one_line_error(result, code, *fragments):
    assert result.returncode == code, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_unknown_config(tmp_path, cli_env):
    result = run_cli("export", "--config", "F", "--out", tmp_path / "m.onnx", env=cli_env)
    assert_one_line_error(result, 2, "unknown config 'F'", "A, A-LRN, B, C, D, E")


def test_crop_not_a_multiple_of_32(tmp_path, cli_env):
    result = run_cli("export", "--config", "A", "--crop", "100", "--out", tmp_path / "m.onnx", env=cli_env)
    assert_one_line_error(result, 2, "crop size 100", "multiple of 32")


def test_unwritable_output_is_found_before_slow_work(tmp_path, cli_env):
    (tmp_path / "file").write_text("")
    result = run_cli("export", "--config", "D", "--out", tmp_path / "file" / "m.onnx", env=cli_env)
    assert_one_line_error(result, 2, "cannot write there")
    assert "compiling" not in result.stderr and "RANDOM" not in result.stderr
    with pytest.raises(UsageError, match="cannot write"):  # the Python API checks first too
        export_model(tmp_path / "file" / "m.onnx", "D", log=quiet)


def test_mismatched_weights(tmp_path, cli_env):
    torch.save(small_model().state_dict(), tmp_path / "a.pth")
    result = run_cli("export", "--config", "B", "--weights", tmp_path / "a.pth", "--out", tmp_path / "m.onnx", env=cli_env)
    assert_one_line_error(result, 1, "a.pth", "features.", "expected")
    result = run_cli("export", "--config", "A", "--classes", "5", "--weights", tmp_path / "a.pth",
                     "--out", tmp_path / "m.onnx", env=cli_env)
    assert_one_line_error(result, 1, "classifier.6.weight has shape 10x512, expected 5x512")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip", b"\x80\x02not really a pickle"])
def test_truncated_or_corrupt_weights(tmp_path, cli_env, content):
    torch.save(small_model().state_dict(), tmp_path / "ok.pth")
    data = content or (tmp_path / "ok.pth").read_bytes()[:3000]  # empty: a truncated real file instead
    (tmp_path / "bad.pth").write_bytes(data)
    result = run_cli("export", "--config", "A", "--weights", tmp_path / "bad.pth", "--out", tmp_path / "m.onnx",
                     env=cli_env)
    assert_one_line_error(result, 1, "bad.pth")


def test_missing_weights_file_and_non_weights_file(tmp_path, cli_env):
    result = run_cli("export", "--config", "A", "--weights", tmp_path / "none.pth", "--out", tmp_path / "m.onnx",
                     env=cli_env)
    assert_one_line_error(result, 2, "none.pth: no such file")
    np.savez(tmp_path / "other.npz", image=np.zeros((4, 4)))
    result = run_cli("export", "--config", "A", "--weights", tmp_path / "other.npz", "--out", tmp_path / "m.onnx",
                     env=cli_env)
    assert_one_line_error(result, 1, "other.npz: no VGG weights in it")


def test_export_cli_writes_model_and_sidecar(tmp_path, cli_env):
    out = tmp_path / "models" / "vgg_A.onnx"
    result = run_cli("export", "--config", "A", "--width-mult", "0.125", "--crop", "64", "--classes", "10",
                     "--train-scale", "96", "--init", "gaussian", "--out", out, env=cli_env)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights (gaussian" in result.stderr and "verify 64x64 batch 1" in result.stderr
    assert "verified (max relative error" in result.stderr and result.stdout == ""
    info = ModelInfo.from_json_dict(json.loads((tmp_path / "models" / "vgg_A.json").read_text()))
    assert info.train_scales == [96] and info.test_scales == [64, 96, 128]
    assert sorted(os.listdir(out.parent)) == ["vgg_A.json", "vgg_A.onnx"]  # no temporary files left


def test_graph_flops_agree_with_the_runtimes_metadata_count(small_model):
    """One counter, two independent descriptions of the net: the compiled graph's nodes and conv weights,
    and the config table's layer specs with the model's metadata."""
    runtime_flops = pytest.importorskip("vgg_onnx.runtime.flops")
    info = ModelInfo.from_metadata_props({p.key: p.value for p in onnx.load(str(small_model)).metadata_props})
    for height, width in [(64, 64), (99, 131), (256, 341)]:
        assert runtime_flops.dense_flops(info, height, width) == conv_flops(str(small_model), height, width)


def test_inspect_bad_input(tmp_path, small_model, cli_env):
    (tmp_path / "bad.onnx").write_bytes(b"not a model at all")
    assert_one_line_error(run_cli("inspect", tmp_path / "bad.onnx", env=cli_env), 1, "bad.onnx: not an ONNX model")
    assert_one_line_error(run_cli("inspect", tmp_path / "none.onnx", env=cli_env), 2, "no such file")
    assert_one_line_error(run_cli("inspect", small_model, "--size", "32x100", env=cli_env), 2, "smaller than")
    # a model without our metadata is still described, from its graph
    proto = onnx.load(str(small_model))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    result = run_cli("inspect", tmp_path / "plain.onnx", "--size", "64x64", env=cli_env)
    assert result.returncode == 0 and "no vgg-onnx metadata" in result.stdout and "score map 1 x 1" in result.stdout


def test_usage_mistakes_found_before_work(tmp_path):
    with pytest.raises(UsageError, match="--config is required"):
        export_model(tmp_path / "m.onnx", None, log=quiet)
    with pytest.raises(UsageError, match="opset 9 is not supported"):
        export_model(tmp_path / "m.onnx", "A", opset=9, log=quiet)
    with pytest.raises(UsageError, match="Smin < Smax"):
        export_model(tmp_path / "m.onnx", "A", train_scales=[512, 256], log=quiet)
    torch.save(small_model().state_dict(), tmp_path / "tv.pth")
    with pytest.raises(UsageError, match="not Caffe's"):
        export_model(tmp_path / "m.onnx", "A", str(tmp_path / "tv.pth"), weights_format="caffe", log=quiet)
    with pytest.raises(UsageError, match="not one of our checkpoints"):
        export_model(tmp_path / "m.onnx", "A", str(tmp_path / "tv.pth"), weights_format="checkpoint", log=quiet)
    assert sorted(os.listdir(tmp_path)) == ["tv.pth"]
