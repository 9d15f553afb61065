"""Packed inference checkpoint: exact round trip, 1 bit per binary weight, clear errors.

The model carries the golden file's weights (SPEC §2: perturbed, so no value is
trivially compressible, as in a trained checkpoint). The fused model from the file is
compared with ``convert(model)`` entry by entry and output by output, bitwise.
"""
import math
import os
import pickle

import pytest
import torch

from bimatting_triton import BiMatting, CheckpointError
from bimatting_triton.baselines import RVMMobileNetV3
from bimatting_triton.fuse import BinaryConvUnit, convert
from bimatting_triton.nn import BiConv2d
from bimatting_triton.packed import (
    FORMAT,
    VERSION,
    PackedCheckpointError,
    _digest,
    _payload,
    load_packed,
    save_packed,
)

# With BIMATTING_TEST_CUDA=1 (tests/conftest.py) the round trip also runs the compiled kernels.
CUDA = bool(os.environ.get("BIMATTING_TEST_CUDA")) and torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKEND = "auto" if CUDA else "reference"
PAPER_STORAGE_RATIO = 21.6


@pytest.fixture(scope="module")
def golden(reference_dir):
    return torch.load(os.path.join(reference_dir, "bimatting_golden.pt"), weights_only=True)


def golden_model(golden, refiner="deep_guided_filter"):
    model = BiMatting(refiner=refiner)
    model.load_state_dict(golden["state_dict"], strict=refiner == "deep_guided_filter")
    return model.eval()


@pytest.fixture(scope="module")
def model(golden):
    return golden_model(golden)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("packed") / "bimatting.packed"
    save_packed(model, path)
    return path


def rewrite(src, dst, edit, fix_checksum=True):
    """Load a packed file, apply ``edit(obj)``, save it to ``dst`` (checksum recomputed)."""
    obj = torch.load(src, weights_only=True)
    edit(obj)
    if fix_checksum:
        obj["sha256"] = _digest(_payload(obj))
    torch.save(obj, dst)
    return dst


def assert_same_state(loaded, fused):
    """Every entry bitwise equal; ``alpha`` (not stored) holds the unit's ``scale``."""
    a, b = fused.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    units = {n for n, m in fused.named_modules() if isinstance(m, BinaryConvUnit)}
    for key, value in a.items():
        parent, _, leaf = key.rpartition(".")
        if parent in units and leaf == "alpha":
            assert torch.equal(b[key], a[f"{parent}.scale"]), key
            if torch.equal(value, a[f"{parent}.scale"]):  # no BN / conv bias: alpha is recovered
                assert torch.equal(b[key], value), key
        else:
            assert b[key].dtype == value.dtype and torch.equal(b[key].cpu(), value.cpu()), key


def outputs(model, golden, dtype, full=True):
    """Matting pass with the refiner and coarse outputs; with ``full``, also the next clip
    (recurrent state carried over) and a segmentation pass."""
    src = golden["src"].to(DEVICE, dtype)
    with torch.no_grad():
        first = model(src, downsample_ratio=0.5, return_coarse=True)
        if not full:
            return first
        nxt = model(golden["src_next"].to(DEVICE, dtype), *first[2:6], downsample_ratio=0.5)
        seg = model(src, segmentation_pass=True)
    return [*first, *nxt, *seg]


@pytest.mark.parametrize("refiner", ["deep_guided_filter", "fast_guided_filter"])
def test_round_trip_gives_equal_outputs(golden, tmp_path, refiner):
    model = golden_model(golden, refiner).to(DEVICE)
    fused = convert(model, backend=BACKEND)
    path = tmp_path / "m.packed"
    size = save_packed(model, path)
    assert size == os.path.getsize(path)
    loaded = load_packed(path, device=DEVICE, backend=BACKEND)
    assert isinstance(loaded, BiMatting) and loaded.refiner_name == refiner and not loaded.training
    assert not any(isinstance(m, BiConv2d) for m in loaded.modules())
    assert_same_state(loaded, fused)
    full = refiner == "deep_guided_filter"
    for i, (x, y) in enumerate(zip(outputs(fused, golden, torch.float32, full),
                                   outputs(loaded, golden, torch.float32, full))):
        assert torch.equal(x, y), f"output {i} differs by {(x - y).abs().max().item():.3g}"


def test_float64_model_round_trip(golden, tmp_path):
    fused = convert(golden_model(golden).double(), backend="reference")
    save_packed(fused, tmp_path / "f64.packed")  # an already converted model
    loaded = load_packed(tmp_path / "f64.packed", backend="reference")
    assert loaded.project_mat.conv.weight.dtype == torch.float64
    assert_same_state(loaded, fused)
    for x, y in zip(outputs(fused, golden, torch.float64, False), outputs(loaded, golden, torch.float64, False)):
        assert torch.equal(x, y)


def test_half_precision_model_round_trip(tmp_path):
    # A half-precision fused model (fp16 buffers, float32 epilogues) stores its floats in
    # float16 and comes back equal, outputs bit for bit.
    torch.manual_seed(0)
    fused = convert(BiMatting().eval().half(), backend="reference")
    size = save_packed(fused, tmp_path / "f16.packed")
    loaded = load_packed(tmp_path / "f16.packed", backend="reference")
    assert loaded.project_mat.conv.weight.dtype == torch.float16
    assert_same_state(loaded, fused)
    src = torch.rand(1, 2, 3, 48, 64).half()
    for x, y in zip(fused(src, downsample_ratio=0.5), loaded(src, downsample_ratio=0.5)):
        assert torch.equal(x, y)
    stored = torch.load(tmp_path / "f16.packed", weights_only=True)
    assert size > 0 and stored["dtype"] == "float16"
    floats = [k for k in stored if k.startswith("pool.") and stored[k].is_floating_point()]
    assert floats == ["pool.float16"]  # no float value needs more (BN counters are int64)
    fused.decoder.decode3.conv.scale = fused.decoder.decode3.conv.scale.float()
    with pytest.raises(ValueError, match="model must have one float dtype"):
        save_packed(fused, tmp_path / "mixed.packed")


def test_files_of_the_earlier_entry_names_load(model, saved, tmp_path):
    # Files written before the bottleneck GRU was fused (its units were then named
    # decoder.decode4.gru.{ih,hh}.ops.0.*) load into today's model, the same values.
    import json
    import zlib

    from bimatting_triton import packed

    obj = torch.load(saved, weights_only=True)
    rows = json.loads(zlib.decompress(obj["manifest"].numpy().tobytes()))
    renamed = 0
    for row in rows:
        for unit in ("ih", "hh"):
            prefix = f"decoder.decode4.gru.{unit}."
            if row[0].startswith(prefix):
                row[0] = f"{prefix}ops.0.{row[0][len(prefix):]}"
                renamed += 1
    assert renamed >= 8  # bits and folded vectors of both units
    obj["manifest"] = torch.frombuffer(bytearray(zlib.compress(json.dumps(rows).encode())), dtype=torch.uint8)
    obj["sha256"] = packed._digest(packed._payload(obj))
    torch.save(obj, tmp_path / "old.packed")
    assert_same_state(load_packed(tmp_path / "old.packed", backend="reference"),
                      load_packed(saved, backend="reference"))


def test_plain_and_converted_model_give_the_same_file(model, saved, tmp_path):
    save_packed(convert(model, backend="reference"), tmp_path / "converted.packed")
    assert (tmp_path / "converted.packed").read_bytes() == saved.read_bytes()


def test_one_bit_per_binary_weight_and_size(model, saved, tmp_path):
    obj = torch.load(saved, weights_only=True)
    binary = sum(m.weight.numel() for m in model.modules() if isinstance(m, BiConv2d))
    assert obj["signs"].dtype == torch.uint8 and obj["signs"].numel() == math.ceil(binary / 8)
    assert obj["zeros"].numel() == 0  # no exact-zero w_c in these weights
    # Everything else: at most the other entries of the fused model (no alpha, no int8)
    # at their own width, plus a small container.
    fused = convert(model, backend="reference")
    units = {n for n, m in fused.named_modules() if isinstance(m, BinaryConvUnit)}
    rest = sum(
        v.numel() * v.element_size() for k, v in fused.state_dict().items()
        if k.rpartition(".")[0] not in units or k.rpartition(".")[2] not in ("bits", "int8", "alpha")
    )  # fmt: skip
    pools = sum(v.numel() * v.element_size() for k, v in obj.items() if k.startswith("pool."))
    assert pools <= rest
    size = os.path.getsize(saved)
    assert obj["signs"].numel() + pools < size < obj["signs"].numel() + pools + 8192
    with open(tmp_path / "rvm.pth", "wb") as f:
        torch.save(RVMMobileNetV3().state_dict(), f)
    assert os.path.getsize(tmp_path / "rvm.pth") / size > PAPER_STORAGE_RATIO


def test_zero_weights_and_small_dtypes_round_trip(golden, tmp_path):
    """A constant output channel (w_c == 0, packed as 0), an all-equal bias (one value)
    and a float16-exact slope (stored as float16) come back exactly."""
    model = golden_model(golden)
    conv = model.backbone.feature[3].binary_3x3
    with torch.no_grad():
        conv.weight[5] = 0.25
        model.aspp.aspp1[0].bias.fill_(0.1)
        model.aspp.aspp1[5].weight.copy_(torch.arange(128) / 64 - 1)
    fused = convert(model, backend="reference")
    save_packed(model, tmp_path / "z.packed")
    obj = torch.load(tmp_path / "z.packed", weights_only=True)
    assert obj["zeros"].numel() == conv.weight[5].numel()
    assert obj["pool.float16"].numel() >= 128
    assert (obj["pool.float32"] == 0.1).sum() == 1  # the constant bias: one float32 value
    loaded = load_packed(tmp_path / "z.packed", backend="reference")
    assert_same_state(loaded, fused)
    for x, y in zip(outputs(fused, golden, torch.float32, False), outputs(loaded, golden, torch.float32, False)):
        assert torch.equal(x, y)


def test_write_is_atomic(model, saved, tmp_path, monkeypatch):
    path = tmp_path / "keep.packed"
    path.write_bytes(saved.read_bytes())

    def failing_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_packed(model, path)
    assert path.read_bytes() == saved.read_bytes()
    assert os.listdir(tmp_path) == ["keep.packed"]


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(saved, tmp_path, keep):
    data = saved.read_bytes()
    path = tmp_path / "cut.packed"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PackedCheckpointError, match="truncated"):
        load_packed(path)


def test_wrong_version(saved, tmp_path):
    path = rewrite(saved, tmp_path / "v.packed", lambda o: o.update(version=VERSION + 1))
    with pytest.raises(PackedCheckpointError, match=f"version {VERSION + 1}.*reads version {VERSION}"):
        load_packed(path)


def test_not_a_packed_file(model, tmp_path):
    torch.save(model.state_dict(), tmp_path / "float.pth")
    with pytest.raises(PackedCheckpointError, match=f"not a packed BiMatting checkpoint .*'{FORMAT}'"):
        load_packed(tmp_path / "float.pth")


def test_corrupted_payload(saved, tmp_path):
    def flip(obj):
        obj["signs"][1000] ^= 1

    path = rewrite(saved, tmp_path / "c.packed", flip, fix_checksum=False)
    with pytest.raises(PackedCheckpointError, match="checksum"):
        load_packed(path)


def test_entries_that_do_not_fit_are_named(saved, tmp_path):
    import json
    import zlib

    def rename(obj):
        rows = json.loads(zlib.decompress(obj["manifest"].numpy().tobytes()))
        for row in rows:
            if row[0] == "project_mat.conv.bias":
                row[0] = "project_mat.conv.offset"
        obj["manifest"] = torch.frombuffer(bytearray(zlib.compress(json.dumps(rows).encode())), dtype=torch.uint8)

    path = rewrite(saved, tmp_path / "k.packed", rename)
    with pytest.raises(PackedCheckpointError) as info:
        load_packed(path)
    message = str(info.value)
    assert "1 missing keys: project_mat.conv.bias" in message
    assert "1 unexpected keys: project_mat.conv.offset" in message


def test_short_pool_is_reported(saved, tmp_path):
    path = rewrite(saved, tmp_path / "p.packed", lambda o: o.update({"pool.float32": o["pool.float32"][:-3]}))
    with pytest.raises(PackedCheckpointError, match="too short"):
        load_packed(path)


class Payload:
    """Would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (os.system, ("echo unsafe",))


def test_weights_only_refuses_code(tmp_path, capfd):
    path = tmp_path / "evil.packed"
    with open(path, "wb") as f:
        pickle.dump({"format": FORMAT, "version": VERSION, "manifest": Payload()}, f, protocol=2)
    with pytest.raises(PackedCheckpointError, match="weights-only(.|\n)*system"):
        load_packed(path)
    assert "unsafe" not in capfd.readouterr().out


def test_error_types_and_bad_arguments(model, tmp_path):
    assert issubclass(PackedCheckpointError, CheckpointError) and issubclass(PackedCheckpointError, ValueError)
    with pytest.raises(FileNotFoundError, match="missing.packed"):
        load_packed(tmp_path / "missing.packed")
    with pytest.raises(TypeError, match="model must be a BiMatting"):
        save_packed(RVMMobileNetV3(), tmp_path / "x.packed")
    with pytest.raises(ValueError, match="backend must be one of"):
        load_packed(tmp_path / "x.packed", backend="cuda")


def test_file_permissions(model, tmp_path):
    """A new file gets 0o666 less the umask (not a fixed 0o644); a replaced file keeps its mode."""
    path = tmp_path / "m.packed"

    def save_with_umask(mask):
        old = os.umask(mask)
        try:
            save_packed(model, path)
        finally:
            os.umask(old)
        return os.stat(path).st_mode & 0o777

    assert save_with_umask(0o027) == 0o640
    os.chmod(path, 0o600)
    assert save_with_umask(0o022) == 0o600
    os.chmod(path, 0o666)  # kept exactly, past the umask that a new file would get
    assert save_with_umask(0o022) == 0o666
    assert os.listdir(tmp_path) == ["m.packed"]


def test_output_path_is_checked_before_encoding(model, tmp_path, monkeypatch):
    import bimatting_triton.packed as packed

    def no_encoding(fused):
        raise AssertionError("encoded before checking the path")

    monkeypatch.setattr(packed, "_encode", no_encoding)
    with pytest.raises(IsADirectoryError, match=f"path '{tmp_path}' is a folder"):
        save_packed(model, tmp_path)
    with pytest.raises(FileNotFoundError, match="the folder .*nodir' does not exist"):
        save_packed(model, tmp_path / "nodir" / "m.packed")
    assert os.listdir(tmp_path) == []


def test_unusable_device_is_named(saved):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available"):
            load_packed(saved, device="cuda")
    with pytest.raises(ValueError, match="'nonsense' is not a torch device"):
        load_packed(saved, device="nonsense")


def test_an_empty_entry_of_any_strides_is_read(saved, tmp_path):
    # An empty tensor may carry stride 0 (torch.save keeps it): the checksum read it through
    # a view that refused such strides (a RuntimeError instead of a model).
    def empty_with_stride_0(obj):
        assert obj["zeros"].numel() == 0  # (the golden weights have no zeros)
        obj["zeros"] = torch.zeros(0, dtype=obj["zeros"].dtype).as_strided((0,), (0,))

    path = rewrite(saved, tmp_path / "strided.packed", empty_with_stride_0)
    load_packed(path)


def test_output_paths_written_as_folders_are_refused_before_work(model, tmp_path):
    from bimatting_triton.train.loop import load_checkpoint, save_checkpoint

    with pytest.raises(IsADirectoryError, match="path 'newname/' is a folder, expected a file name"):
        save_packed(model, "newname/")
    with pytest.raises(IsADirectoryError, match="checkpoint path .* is a folder"):
        save_checkpoint(str(tmp_path), model)
    with pytest.raises(IsADirectoryError, match="is a folder, expected a checkpoint file"):
        load_checkpoint(str(tmp_path))
    assert os.listdir(tmp_path) == []
