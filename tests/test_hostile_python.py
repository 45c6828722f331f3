"""Hostile input to the Python core, export and weight reading: no hang, no overwrite of an input,
whole-or-nothing outputs, bounded reads and decodes, one clear line per problem."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import zipfile

import numpy as np
import pytest

from conftest import PYTHON, REPO
from vgg_onnx import atomic
from vgg_onnx.atomic import atomic_path, atomic_paths, atomic_write_text, check_writable, remove_stale_temps
from vgg_onnx.decoding import DEFAULT_MAX_PIXELS, decode_image, image_size_from_header, load_image, MAX_FILE_BYTES
from vgg_onnx.errors import ImageError, UsageError, VggOnnxError

SMALL = dict(width_mult=0.125, crop=64, num_classes=10)


def quiet(message):
    pass


def finishes(function, seconds=5.0):
    """Run `function` in a daemon thread; (finished in time, its exception or None)."""
    outcome = {}

    def target():
        try:
            function()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            outcome["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), outcome.get("error")


def forged_tiff(used: tuple[int, int], declared_later: tuple[int, int], with_pixels: bool = True) -> bytes:
    """An 8-bit grey TIFF whose ImageWidth/ImageLength appear twice: libtiff (OpenCV) uses the first
    pair `used`, a parser that keeps the last sees `declared_later`."""
    width, height = used
    entries = [(256, width), (257, height), (258, 8), (259, 1), (262, 1), (273, 0), (277, 1), (278, height),
               (279, width * height), (256, declared_later[0]), (257, declared_later[1])]
    pixels_at = 8 + 2 + 12 * len(entries) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, value in entries:
        out += struct.pack("<HHII", tag, 4, 1, pixels_at if tag == 273 else value)
    out += struct.pack("<I", 0)
    if with_pixels:
        out += bytes(i % 251 for i in range(width * height))
    return bytes(out)


def run_python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "OPENCV_IO_MAX_IMAGE_PIXELS"})


# --- images: only regular files, read with a bound ---------------------------------------------

def test_a_fifo_named_like_an_image_is_refused_without_hanging(tmp_path):
    fifo = tmp_path / "a.jpg"
    os.mkfifo(fifo)  # nobody ever writes to it: opening it blocking would wait forever
    done, error = finishes(lambda: load_image(fifo))
    assert done, "load_image hung on a FIFO"
    assert isinstance(error, ImageError) and "a.jpg: cannot read: a FIFO, not a regular file" in str(error)


def test_a_device_named_like_an_image_is_refused_unread(tmp_path):
    link = tmp_path / "z.jpg"
    link.symlink_to("/dev/zero")  # endless: an unbounded read would grow until memory runs out
    done, error = finishes(lambda: load_image(link))
    assert done and isinstance(error, ImageError)
    assert "z.jpg: cannot read: a character device, not a regular file" in str(error)


def test_a_name_swapped_for_a_fifo_after_the_check_is_caught_on_the_open_file(tmp_path, monkeypatch):
    fifo, regular = tmp_path / "a.jpg", tmp_path / "b.jpg"
    os.mkfifo(fifo)
    regular.write_bytes(b"x")
    real_stat = os.stat
    # the first look at the name says "regular file": what a swap between stat and open looks like
    monkeypatch.setattr(os, "stat", lambda p, *a, **k: real_stat(regular) if os.fspath(p) == str(fifo)
                        else real_stat(p, *a, **k))
    done, error = finishes(lambda: load_image(fifo))
    assert done and isinstance(error, ImageError) and "a FIFO, not a regular file" in str(error)


def test_a_file_larger_than_any_image_within_the_limit_is_refused_unread(tmp_path):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:  # sparse: takes no disk space
        f.truncate(MAX_FILE_BYTES + 1)
    with pytest.raises(ImageError, match=r"huge\.png: file of \d+ bytes exceeds the size limit of 1073741824 bytes"):
        load_image(path)


@pytest.mark.parametrize("height,width", [(100, 100), (10_000, 1)])
def test_the_read_bound_fits_the_largest_uncompressed_image_at_the_limit(tmp_path, height, width):
    # 16-bit RGBA, no compression: the most bytes per pixel a supported format spends (PNG here;
    # one pixel wide, every row carries a filter byte too)
    import cv2

    image = np.full((height, width, 4), 40000, np.uint16)
    ok, data = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    assert ok and len(data) > 8 * height * width
    path = tmp_path / "big.png"
    path.write_bytes(data.tobytes())
    # per pixel at most what this image spends, and the default limit's worth still fits the bound
    assert len(data) / (height * width) * DEFAULT_MAX_PIXELS <= MAX_FILE_BYTES
    assert load_image(path, max_pixels=height * width).shape == (height, width, 3)


# --- the size check agrees with the decoder ----------------------------------------------------

def test_duplicated_tiff_size_tags_cannot_sneak_a_large_image_past_the_limit():
    data = forged_tiff(used=(300, 300), declared_later=(50, 50))
    import cv2

    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_ANYDEPTH).shape == (300, 300)  # what libtiff uses
    with pytest.raises(ImageError, match="300x300 image exceeds the pixel limit of 5000"):
        decode_image(data, max_pixels=5000)
    # the other order: the first pair counts, for the check as for libtiff (and the other hosts)
    assert decode_image(forged_tiff(used=(50, 50), declared_later=(300, 300)), max_pixels=5000).shape == (50, 50, 3)
    assert decode_image(data, max_pixels=90_000).shape == (300, 300, 3)


def test_the_30000_squared_forged_tiff_is_refused_from_its_header():
    data = forged_tiff(used=(30000, 30000), declared_later=(50, 50), with_pixels=False)
    assert image_size_from_header(data) == (30000, 30000)
    with pytest.raises(ImageError, match="30000x30000 image exceeds the pixel limit of 5000"):
        decode_image(data, max_pixels=5000)


def test_tiff_size_tags_of_a_type_libtiff_may_read_differently_are_refused():
    data = bytearray(forged_tiff(used=(64, 64), declared_later=(64, 64)))
    struct.pack_into("<H", data, 10 + 2, 5)  # ImageWidth as a RATIONAL
    with pytest.raises(ImageError, match="corrupt TIFF header"):
        decode_image(bytes(data))


def test_opencv_pixel_limit_is_the_backstop_and_its_log_lines_stay_quiet():
    # with the header check out of the way, OpenCV itself refuses the 30000x30000 TIFF before
    # allocating it (its limit is set when vgg_onnx.decoding is imported), and says nothing
    data = forged_tiff(used=(30000, 30000), declared_later=(50, 50), with_pixels=False)
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 30000x30000x3 would not fit
from vgg_onnx import decoding as p
p.image_size_from_header = lambda data: (50, 50)
try:
    p.decode_image({bytes(data)!r}, max_pixels=5000)
except p.ImageError as e:
    print(e)
try:
    p.decode_image(b"II*\\x00" + bytes(100))
except p.ImageError as e:
    print(e)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"image exceeds the decoder's pixel limit of {DEFAULT_MAX_PIXELS} "
                                          "(OPENCV_IO_MAX_IMAGE_PIXELS)",
                                          "cannot decode image (corrupt or unsupported)"]
    assert result.stderr == ""  # no "[ WARN:0@...] global grfmt_tiff.cpp" lines


# --- outputs: never an input, never renamed over a non-regular file ----------------------------

def test_an_output_that_is_an_input_is_refused_by_any_name(tmp_path):
    source = tmp_path / "w.pth"
    source.write_bytes(b"weights")
    (tmp_path / "link.pth").symlink_to(source)
    os.link(source, tmp_path / "hard.pth")
    for name in ("w.pth", "link.pth", "hard.pth", "sub/../w.pth"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        with pytest.raises(UsageError, match="is one of this command's inputs"):
            check_writable(tmp_path / name, inputs=[None, tmp_path / "other.pth", source])
    check_writable(tmp_path / "new.onnx", inputs=[source])
    (tmp_path / "copy.pth").write_bytes(b"weights")  # same content, another file: fine
    check_writable(tmp_path / "copy.pth", inputs=[source])
    assert source.read_bytes() == b"weights"


def test_a_symlinked_output_keeps_its_link(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    atomic_write_text(tmp_path / "link.json", "new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


def test_a_fifo_output_is_written_in_place(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    done, error = finishes(lambda: atomic_write_text(fifo, "result\n"))
    reader.join(5)
    assert done and error is None and received == [b"result\n"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO, not a regular file renamed over it


def test_an_output_linked_to_stdout_writes_to_stdout(tmp_path):
    # what `--output /dev/stdout` is, with the link in a scratch folder rather than the real /dev
    link = tmp_path / "stdout"
    link.symlink_to("/proc/self/fd/1")
    code = f"from vgg_onnx.atomic import atomic_write_text, check_writable\n" \
           f"check_writable({str(link)!r}); atomic_write_text({str(link)!r}, 'the results\\n')"
    result = run_python(code)
    assert result.returncode == 0 and result.stdout == "the results\n", result.stderr
    assert link.is_symlink() and os.listdir(tmp_path) == ["stdout"]


def test_a_fifo_nobody_reads_fails_at_once(tmp_path):
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    done, error = finishes(lambda: atomic_write_text(fifo, "result\n"))
    assert done and isinstance(error, VggOnnxError) and "a FIFO that no process reads" in str(error)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and not [p for p in os.listdir(tmp_path) if p != "out.json"]


def test_a_character_device_output_is_written_in_place(tmp_path):
    # a private /dev/null: what `--output /dev/stdout` is for root, without touching the real one
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    check_writable(node)
    atomic_write_text(node, "result\n")
    assert stat.S_ISCHR(os.lstat(node).st_mode)


def test_a_socket_output_is_refused(tmp_path):
    path = tmp_path / "s.json"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    try:
        with pytest.raises(UsageError, match=r"s\.json: is a socket; refusing to write there"):
            check_writable(path)
        with pytest.raises(VggOnnxError, match="is a socket"):
            atomic_write_text(path, "x")
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        server.close()


# --- temporary files: recognisable, cleaned, and pairs whole or not at all ----------------------

def test_temporary_files_of_a_killed_run_are_removed_by_the_next(tmp_path):
    out = tmp_path / "m.onnx"
    code = f"""
import os, signal
from vgg_onnx.atomic import atomic_path
with atomic_path({str(out)!r}) as tmp:
    open(tmp, "wb").write(b"half a model")
    os.kill(os.getpid(), signal.SIGKILL)
"""
    result = run_python(code)
    assert result.returncode == -signal.SIGKILL
    left = os.listdir(tmp_path)
    assert len(left) == 1 and left[0].startswith(".m.onnx.") and left[0].endswith(".tmp")
    assert left[0].split(".")[3].isdigit()  # the pid of the run that wrote it
    mine = tmp_path / f".m.onnx.{os.getpid()}.abcd1234.tmp"  # a live run's file stays
    mine.write_bytes(b"in progress")
    atomic_write_text(out, "model")
    assert sorted(os.listdir(tmp_path)) == sorted(["m.onnx", mine.name])
    assert remove_stale_temps(out) == []


def full_disk_on_json(monkeypatch):
    """Every .json output fails with "No space left on device" when it is flushed to disk."""
    real_sync = atomic._PendingFile.sync

    def full_disk_on_the_sidecar(self):
        if self.path.endswith(".json"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_sync(self)

    monkeypatch.setattr(atomic._PendingFile, "sync", full_disk_on_the_sidecar)


def test_a_pair_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    model, sidecar = tmp_path / "m.onnx", tmp_path / "m.json"
    model.write_text("old model")
    sidecar.write_text("old json")
    full_disk_on_json(monkeypatch)
    with pytest.raises(VggOnnxError, match=r"m\.json: cannot write: No space left on device"):
        with atomic_paths([model, sidecar]) as (tmp_model, tmp_sidecar):
            open(tmp_model, "w").write("new model")
            open(tmp_sidecar, "w").write("new json")
    assert model.read_text() == "old model" and sidecar.read_text() == "old json"
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.onnx"]


def test_a_full_disk_while_writing_names_the_output(tmp_path):
    with pytest.raises(VggOnnxError, match=r"out\.txt: cannot write: No space left on device") as caught:
        with atomic_path(tmp_path / "out.txt"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    # still an OSError with its errno, for the callers that tell a full disk apart
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert os.listdir(tmp_path) == []


# --- export: its own inputs, its pair -----------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small checkpoint: best.safetensors with best.json beside it."""
    import torch
    from safetensors.torch import save_file

    from vgg_onnx.classes import default_classes
    from vgg_onnx.metadata import ModelInfo
    from vgg_onnx.normalization import normalization_preset
    from vgg_onnx.train.model import VGG, init_weights

    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = init_weights(VGG("A", 10, 0.125, 64), "glorot").eval()
    save_file(model.state_dict(), str(folder / "best.safetensors"))
    info = ModelInfo("A", default_classes(10), normalization_preset("paper"), crop_size=64, width_mult=0.125,
                     train_scales=[96])
    sha256 = hashlib.sha256((folder / "best.safetensors").read_bytes()).hexdigest()
    (folder / "best.json").write_text(json.dumps(info.to_json_dict() | {"weights_sha256": sha256,
                                                                         "training": {"epoch": 1}}))
    torch.save(model.state_dict(), folder / "w.pth")
    return folder


def test_export_refuses_to_write_over_its_weights_or_their_json(checkpoint):
    from vgg_onnx.export.exporter import export_model

    before = {p: p.read_bytes() for p in checkpoint.iterdir()}
    with pytest.raises(UsageError, match=r"w\.pth: is one of this command's inputs"):
        export_model(checkpoint / "w.pth", "A", str(checkpoint / "w.pth"), **SMALL, log=quiet)
    # best.onnx's sidecar is best.json: the checkpoint's own description
    with pytest.raises(UsageError, match=r"best\.json: is one of this command's inputs"):
        export_model(checkpoint / "best.onnx", None, str(checkpoint / "best.safetensors"), log=quiet)
    assert {p: p.read_bytes() for p in checkpoint.iterdir()} == before


def test_export_cli_out_equal_to_weights_is_a_usage_error(checkpoint, cli_env):
    result = subprocess.run([PYTHON, "-m", "vgg_onnx", "export", "--config", "A", "--weights",
                             str(checkpoint / "w.pth"), "--out", str(checkpoint / "w.pth")],
                            capture_output=True, text=True, env=cli_env, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "w.pth: is one of this command's inputs" in errors[0]


def test_export_leaves_the_old_pair_when_the_sidecar_cannot_be_written(tmp_path, monkeypatch):
    from vgg_onnx.export.exporter import export_model

    out, sidecar = tmp_path / "m.onnx", tmp_path / "m.json"
    out.write_bytes(b"old model")
    sidecar.write_text("old json")
    full_disk_on_json(monkeypatch)
    with pytest.raises(VggOnnxError, match=r"m\.json: cannot write: No space left on device"):
        export_model(out, "A", **SMALL, log=quiet)
    assert out.read_bytes() == b"old model" and sidecar.read_text() == "old json"
    assert sorted(os.listdir(tmp_path)) == ["m.json", "m.onnx"]


# --- weights: zip bombs and shapes before decompression; errors name the right tensor -----------

def npz_member(name: str, shape: tuple, payload_bytes: int | None = None) -> tuple[zipfile.ZipInfo, bytes]:
    header = np.lib.format.header_data_from_array_1_0(np.zeros((0,), np.float32)) | {"shape": shape}
    import io

    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    size = int(np.prod(shape)) * 4 if payload_bytes is None else payload_bytes
    info = zipfile.ZipInfo(name + ".npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    return info, buffer.getvalue() + bytes(size)


def test_a_zip_bomb_npz_is_refused_before_decompressing(tmp_path, monkeypatch):
    from vgg_onnx.export import weights

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(*npz_member("conv1_1.weight", (4096, 4096)))  # 64 MiB of zeros, ~65 KB deflated
    assert path.stat().st_size < 200_000
    monkeypatch.setattr(weights.np, "load", lambda *a, **k: pytest.fail("decompressed the archive"))
    with pytest.raises(VggOnnxError, match=r"bomb\.npz: conv1_1\.weight\.npy would expand .*a zip bomb"):
        weights.import_weights(str(path), "A")


def test_npz_shapes_are_checked_from_the_headers_before_decompressing(tmp_path, monkeypatch):
    from vgg_onnx.export import weights

    path = tmp_path / "lying.npz"
    with zipfile.ZipFile(path, "w") as archive:  # the header promises far more than the member holds
        archive.writestr(*npz_member("conv1_1.weight", (100_000, 100_000), payload_bytes=16))
    monkeypatch.setattr(weights.np, "load", lambda *a, **k: pytest.fail("decompressed the archive"))
    with pytest.raises(VggOnnxError, match=r"conv1_1\.weight declares \d+ bytes but its header .* implies"):
        weights.import_weights(str(path), "A")
    # an honest archive whose shapes are not VGG-A's is refused from the headers too
    sys.path.insert(0, str(REPO / "tests"))
    from test_weights import caffe_arrays, small

    arrays = caffe_arrays(small())
    arrays["conv2_1.weight"] = np.zeros((32, 8, 3, 3), np.float32)
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(VggOnnxError, match=r"conv2_1\.weight \(features\.3\.weight\) has shape 32x8x3x3, but "
                                           r"conv2_1\.bias \(features\.3\.bias\) and conv3_1\.weight"):
        weights.import_weights(str(tmp_path / "c.npz"), "A")


@pytest.mark.parametrize("key", ["features.0.weight", "classifier.0.weight", "features.0.bias"])
def test_a_wrong_shape_tensor_error_names_that_tensor(checkpoint, tmp_path, key):
    import torch

    from vgg_onnx.configs import parse_config
    from vgg_onnx.export.weights import build_model, import_weights, infer_dimensions

    state = torch.load(checkpoint / "w.pth")
    state[key] = torch.zeros((state[key].shape[0] * 2,) + tuple(state[key].shape[1:]))
    torch.save(state, tmp_path / "bad.pth")
    loaded = import_weights(str(tmp_path / "bad.pth"), "A")
    found = infer_dimensions(loaded.state_dict, parse_config("A"))
    with pytest.raises(VggOnnxError, match=rf"bad\.pth: {key} has shape "):
        build_model("bad.pth", loaded.state_dict, parse_config("A"), found.get("num_classes", 1000),
                    found.get("width_mult", 1.0), found.get("crop_size", 224), loaded.names)


def test_a_fifo_named_like_weights_is_refused_without_hanging(tmp_path):
    from vgg_onnx.export.weights import import_weights

    os.mkfifo(tmp_path / "w.pth")
    done, error = finishes(lambda: import_weights(str(tmp_path / "w.pth"), "A"))
    assert done and isinstance(error, VggOnnxError) and "not a regular file" in str(error)


def test_export_refuses_a_net_too_large_for_one_onnx_file_before_allocating_it(tmp_path, cli_env):
    # 10^8 classes: fc8 alone would be 1.6 TB; refused from the shapes, in a process capped at 4 GiB of address space
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
sys.argv = ["vgg-onnx", "export", "--config", "A", "--classes", "100000000", "--out", {str(tmp_path / "m.onnx")!r}]
from vgg_onnx.cli import main
main()
"""
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=cli_env, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("vgg-onnx: error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "one ONNX file holds at most 1.98 GiB of weights" in errors[0]
    assert os.listdir(tmp_path) == []


def test_an_oversized_checkpoint_json_is_refused_unread(checkpoint, tmp_path):
    from vgg_onnx.export.weights import read_checkpoint_info
    from vgg_onnx.train.checkpoint import MAX_JSON_BYTES

    (tmp_path / "big.safetensors").write_bytes((checkpoint / "best.safetensors").read_bytes())
    with open(tmp_path / "big.json", "wb") as f:  # sparse
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(VggOnnxError, match=r"big\.json: over 64 MiB, too large for a checkpoint's JSON"):
        read_checkpoint_info(str(tmp_path / "big.safetensors"))
