"""Loading official-layout checkpoints: wrappers, DDP prefixes, weights_only, clear errors."""
import os
import pickle

import pytest
import torch

from bimatting_triton import BiMatting, CheckpointError


@pytest.fixture(scope="module")
def official_state(reference_dir):
    """A checkpoint in the official key layout (the golden file's perturbed weights)."""
    return torch.load(os.path.join(reference_dir, "bimatting_golden.pt"), weights_only=True)["state_dict"]


def assert_loaded(model, state):
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "ddp", "ddp_in_model"])
def test_from_pretrained_accepts_common_wrappings(tmp_path, official_state, wrap):
    state = official_state
    if wrap in ("ddp", "ddp_in_model"):
        state = {f"module.{k}": v for k, v in state.items()}
    obj = {"plain": state, "ddp": state, "state_dict": {"state_dict": state, "epoch": 3},
           "model": {"model": state, "step": torch.tensor(10)}, "ddp_in_model": {"model": state}}[wrap]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = BiMatting.from_pretrained(path)
    assert_loaded(model, official_state)


def test_fast_guided_filter_ignores_refiner_weights(tmp_path, official_state):
    path = tmp_path / "ckpt.pth"
    torch.save(official_state, path)
    model = BiMatting.from_pretrained(path, refiner="fast_guided_filter")
    assert model.refiner_name == "fast_guided_filter"
    assert torch.equal(model.state_dict()["project_mat.conv.bias"], official_state["project_mat.conv.bias"])


def test_missing_num_batches_tracked_is_accepted(tmp_path, official_state):
    state = {k: v for k, v in official_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pth"
    torch.save(state, path)
    assert_loaded(BiMatting.from_pretrained(path), state)


def test_wrong_keys_are_named(tmp_path, official_state):
    state = dict(official_state)
    del state["aspp.aspp1.0.bias"]
    state["decoder.extra.weight"] = torch.zeros(3)
    state["project_mat.conv.weight"] = torch.zeros(5, 16, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        BiMatting.from_pretrained(path)
    message = str(info.value)
    assert "1 missing keys: aspp.aspp1.0.bias" in message
    assert "1 unexpected keys: decoder.extra.weight" in message
    assert "project_mat.conv.weight: checkpoint (5, 16, 1, 1) vs model (4, 16, 1, 1)" in message
    assert "bad.pth" in message


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="expected a state_dict"):
        BiMatting.from_pretrained(path)


class Payload:
    """Any pickled object that is not plain tensors/containers: weights_only must refuse it."""


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="weights-only"):
        BiMatting.from_pretrained(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="does-not-exist.pth"):
        BiMatting.from_pretrained("does-not-exist.pth")


def test_folder_is_named(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder, expected a checkpoint file"):
        BiMatting.from_pretrained(tmp_path)


def test_unreadable_file_says_so(tmp_path):
    """Not a torch.save file: torch.load's bare error (``101``) is explained."""
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"hello\n")
    with pytest.raises(CheckpointError, match=r"'.*garbage.pth' is not a readable PyTorch checkpoint .*: \w+Error"):
        BiMatting.from_pretrained(path)


def test_values_that_are_not_tensors_are_named(tmp_path):
    path = tmp_path / "mixed.pth"
    torch.save({"a.weight": torch.zeros(1), "epoch": 3, "note": "x"}, path)
    with pytest.raises(CheckpointError, match=r"dict whose values are not all tensors: 'epoch' \(int\), 'note' \(str\)"):
        BiMatting.from_pretrained(path)


def test_packed_checkpoint_is_named(tmp_path):
    """A packed inference checkpoint (its header is enough) points to load_packed."""
    from bimatting_triton.checkpoint import PACKED_FORMAT, is_packed_file
    from bimatting_triton.packed import FORMAT

    assert PACKED_FORMAT == FORMAT
    path = tmp_path / "model.packed"
    torch.save({"format": FORMAT, "version": 1, "signs": torch.zeros(3, dtype=torch.uint8)}, path)
    with pytest.raises(CheckpointError, match="this is a packed inference checkpoint: use "
                                              "bimatting_triton.packed.load_packed"):
        BiMatting.from_pretrained(path)
    assert is_packed_file(path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pth")
    (tmp_path / "garbage.pth").write_bytes(b"hello\n")
    assert not any(is_packed_file(tmp_path / n) for n in ("plain.pth", "garbage.pth", "missing.pth"))


@pytest.mark.parametrize("device, available, count, message", [
    (None, False, 0, None),
    ("cpu", False, 0, None),
    ("cuda", False, 0, "--device 'cuda': CUDA is not available here"),
    ("cuda:2", True, 2, "--device 'cuda:2': this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    ("meta", False, 0, "--device 'meta': the meta device holds no data"),
    ("nonsense", False, 0, "--device 'nonsense' is not a torch device"),
])
def test_usable_device_names_the_argument(monkeypatch, device, available, count, message):
    """The one device check of the CLIs, evaluate and load_packed."""
    import torch

    from bimatting_triton.devices import usable_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    if message is None:
        assert usable_device(device, "--device") == torch.device("cpu")
    else:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            usable_device(device, "--device")


def test_model_and_graph_step_make_the_input_gpu_current(monkeypatch):
    """Triton launches and CUDA graphs go to the current CUDA device: a model given tensors on
    cuda:1 while cuda:0 is current switches to cuda:1 for the call (pretended: no GPU here)."""
    import contextlib

    import torch

    from bimatting_triton import BiMatting, CudaGraphStep
    from bimatting_triton.devices import current_cuda_device

    switched = []

    @contextlib.contextmanager
    def fake_device(device):
        switched.append(torch.device(device))
        yield

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    for device in ("cpu", "cuda:0"):
        with current_cuda_device(torch.device(device)):
            pass
    assert switched == []
    with current_cuda_device(torch.device("cuda:1")):
        pass
    assert switched == [torch.device("cuda:1")]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with current_cuda_device(torch.device("cuda:1")):
        pass
    assert len(switched) == 1  # one GPU: nothing to switch

    # the model and CudaGraphStep ask for their input's device (CPU tensors here: the real
    # context is then a no-op, so the recorded device is what they asked for)
    asked = []

    def recording(device):
        asked.append(device)
        return contextlib.nullcontext()

    import bimatting_triton.cuda_graph as cuda_graph
    import bimatting_triton.model.bimatting as bimatting
    monkeypatch.setattr(bimatting, "current_cuda_device", recording)
    monkeypatch.setattr(cuda_graph, "current_cuda_device", recording)
    monkeypatch.setattr(cuda_graph, "_check_device", lambda src: None)
    model = BiMatting().eval()
    src = torch.rand(1, 1, 3, 32, 32)
    with torch.no_grad():
        _, _, *rec = model(src)
        CudaGraphStep(model)(src, *rec)  # (the first call with states runs eagerly)
    assert asked == [torch.device("cpu")] * 3


@pytest.mark.parametrize("kind", ["int64", "bool", "complex64"])
def test_weights_of_another_kind_of_dtype_are_named(tmp_path, official_state, kind):
    # load_state_dict would convert them silently (integers rounded, complex parts dropped).
    dtype = getattr(torch, kind)
    state = dict(official_state)
    state["project_mat.conv.weight"] = state["project_mat.conv.weight"].to(dtype)
    path = tmp_path / "kind.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=rf"1 dtype mismatches: project_mat.conv.weight: checkpoint torch.{kind} "
                                              r"vs model torch.float32"):
        BiMatting.from_pretrained(path)
    state = {k: v.half() if v.is_floating_point() else v for k, v in official_state.items()}
    torch.save(state, path)
    BiMatting.from_pretrained(path)  # another float precision is fine


def test_map_location_and_keys_are_checked_first(tmp_path, official_state):
    path = tmp_path / "ok.pth"
    torch.save(official_state, path)
    with pytest.raises(ValueError, match="map_location 'meta': the meta device holds no data"):
        BiMatting.from_pretrained(path, map_location="meta")
    if not torch.cuda.is_available():  # (was blamed on the file: "truncated or corrupted")
        with pytest.raises(ValueError, match="map_location 'cuda': CUDA is not available"):
            BiMatting.from_pretrained(path, map_location="cuda")
    torch.save({0: torch.zeros(1), "a": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="keys that are not parameter names \\(str\\): 0"):
        BiMatting.from_pretrained(path)


def test_a_file_that_cannot_be_opened_keeps_its_own_error(tmp_path, official_state, monkeypatch):
    path = tmp_path / "locked.pth"
    torch.save(official_state, path)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(torch, "load", denied)
    with pytest.raises(PermissionError, match="locked.pth"):  # (not "truncated or corrupted")
        BiMatting.from_pretrained(path)


def test_rvm_checkpoint_errors_name_the_keys(tmp_path, official_state):
    from bimatting_triton.baselines import RVMMobileNetV3

    path = tmp_path / "bimatting.pth"
    torch.save({"model": official_state}, path)  # a BiMatting checkpoint given to the RVM network
    with pytest.raises(CheckpointError, match=r"bimatting.pth' does not fit RVMMobileNetV3: \d+ missing keys"):
        RVMMobileNetV3.from_pretrained(path)
