"""The ``bimatting`` command: help, flags reaching convert_video, the random-weights
warning, checkpoints, --fused, errors and Ctrl-C exit codes."""
import os
import re
import signal
import subprocess
import sys
import time
from fractions import Fraction

import numpy as np
import pytest
import torch

import bimatting_triton
from bimatting_triton import BiMatting, cli
from bimatting_triton.video import convert_video

from video_utils import FakeMatting, decode, make_video, read_png


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(str(tmp_path_factory.mktemp("cli") / "in.mp4"), 3, 40, 24, rate=25)


@pytest.fixture
def recorded(monkeypatch):
    """Replace the model loading and convert_video by recorders; returns the records."""
    calls = {}

    def fake_load(checkpoint, refiner, device, dtype, fused):
        calls["load"] = dict(checkpoint=checkpoint, refiner=refiner, device=device, dtype=dtype, fused=fused)
        return "model"

    def fake_convert(model, input_source, **kwargs):
        calls["convert"] = dict(model=model, input_source=input_source, **kwargs)
        return 5

    monkeypatch.setattr(cli, "load_model", fake_load)
    monkeypatch.setattr("bimatting_triton.video.convert_video", fake_convert)
    return calls


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: bimatting")
    for flag in ("--composition", "--alpha", "--foreground", "--checkpoint", "--device", "--dtype",
                 "--downsample-ratio", "--seq-chunk", "--output-type", "--background-color",
                 "--background-image", "--mbps", "--no-progress", "--fused", "--cuda-graph", "examples:"):
        assert flag in text
    assert "(default: None)" not in text


def test_python_m_runs_the_cli():
    run = subprocess.run([sys.executable, "-m", "bimatting_triton", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("usage: bimatting")


def test_flags_reach_convert_video(recorded, tmp_path, capsys):
    code = cli.main(["in.mp4", "-o", "out.webm", "--alpha", "a.mov", "--checkpoint", "ck.pth",
                     "--device", "cpu", "--dtype", "float16", "--downsample-ratio", "0.4",
                     "--seq-chunk", "6", "--background-color", "#0a14fa", "--mbps", "2.5",
                     "--input-resize", "64", "48", "--no-progress", "--no-audio",
                     "--refiner", "fast_guided_filter", "--threads", "3"])
    assert code == 0
    assert recorded["load"] == dict(checkpoint="ck.pth", refiner="fast_guided_filter",
                                    device=torch.device("cpu"), dtype=torch.float16, fused=False)
    c = recorded["convert"]
    assert (c["model"], c["input_source"], c["output_composition"], c["output_alpha"]) == \
        ("model", "in.mp4", "out.webm", "a.mov")
    assert c["output_foreground"] is None and c["output_type"] == "video"
    assert (c["downsample_ratio"], c["seq_chunk"], c["output_video_mbps"]) == (0.4, 6, 2.5)
    assert c["background"] == (10, 20, 250) and c["input_resize"] == (64, 48)
    assert (c["progress"], c["audio"], c["num_workers"], c["dtype"]) == (False, False, 3, torch.float16)
    err = capsys.readouterr().err
    assert "RANDOM" not in err and "wrote 5 frames" in err


def test_defaults_and_inferred_output_type(recorded):
    assert cli.main(["frames", "-o", "cutout", "--alpha", "matte/", "--background-image", "bg.jpg",
                     "--frame-rate", "30000/1001"]) == 0
    c = recorded["convert"]
    assert c["output_type"] == "png_sequence" and c["background"] == "bg.jpg"
    assert c["frame_rate"] == Fraction(30000, 1001)
    assert c["downsample_ratio"] is None and c["seq_chunk"] == 1 and c["progress"]
    assert cli.main(["frames", "--alpha", "matte/", "--downsample-ratio", "auto"]) == 0
    assert recorded["convert"]["downsample_ratio"] is None
    assert recorded["load"]["device"].type == ("cuda" if torch.cuda.is_available() else "cpu")
    # no --dtype: the model's own (float32 for a plain one; a packed checkpoint's), and the frames follow it
    assert recorded["load"]["dtype"] is None and recorded["load"]["checkpoint"] is None
    assert c["dtype"] == torch.float32
    assert cli.main(["photo.jpg", "-o", "cut.png"]) == 0
    assert recorded["convert"]["output_type"] == "png_sequence"
    assert cli.main(["in.mp4", "-o", "out.mp4", "--output-type", "video"]) == 0
    assert recorded["convert"]["output_type"] == "video"


@pytest.mark.parametrize("argv,message", [
    (["in.mp4"], "at least one output"),
    (["in.mp4", "-o", "o.mp4", "--background-color", "1,2"], "R,G,B"),
    (["in.mp4", "-o", "o.mp4", "--background-color", "0,0,256"], "R,G,B"),
    (["in.mp4", "-o", "o.mp4", "--background-color", "1,2,3", "--background-image", "x.png"],
     "not allowed with"),
    (["in.mp4", "-o", "o.mp4", "--downsample-ratio", "2"], "(0, 1]"),
    (["in.mp4", "-o", "o.mp4", "--seq-chunk", "0"], "positive integer"),
    (["in.mp4", "-o", "o.mp4", "--mbps", "fast"], "positive number"),
    (["in.mp4", "-o", "o.mp4", "--dtype", "int8"], "invalid choice"),
    (["in.mp4", "-o", "o.mp4", "--output-type", "gif"], "invalid choice"),
    (["in.mp4", "-o", "o.mp4", "--frame-rate", "nan"], "frame rate such as"),
    (["in.mp4", "-o", "o.mp4", "--frame-rate", "-25"], "frame rate such as"),
    (["in.mp4", "-o", "o.mp4", "--frame-rate", "1/0"], "frame rate such as"),
    (["in.mp4", "-o", "o.mp4", "--threads", "-3"], "argument --threads: expected an integer >= 0, got '-3'"),
])
def test_bad_arguments(recorded, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
    assert "convert" not in recorded


def test_random_weights_warning_and_real_run(clip, tmp_path, capsys):
    """No checkpoint: the real network runs with random weights, and says so loudly."""
    out = tmp_path / "pha"
    code = cli.main([clip, "--alpha", str(out), "--device", "cpu", "--no-progress",
                     "--downsample-ratio", "0.5", "--seq-chunk", "3"])
    err = capsys.readouterr().err
    assert code == 0
    assert "RANDOM weights" in err and "meaningless" in err
    assert sorted(os.listdir(out)) == ["0000.png", "0001.png", "0002.png"]


def test_checkpoint_is_loaded(clip, tmp_path, capsys):
    torch.manual_seed(3)
    model = BiMatting().eval()
    torch.save(model.state_dict(), tmp_path / "ck.pth")
    code = cli.main([clip, "--alpha", str(tmp_path / "cli"), "--checkpoint", str(tmp_path / "ck.pth"),
                     "--device", "cpu", "--seq-chunk", "3", "--downsample-ratio", "0.5", "--no-progress"])
    assert code == 0 and "RANDOM" not in capsys.readouterr().err
    convert_video(model, clip, output_type="png_sequence", output_alpha=str(tmp_path / "direct"),
                  seq_chunk=3, downsample_ratio=0.5, progress=False)
    for i in range(3):
        np.testing.assert_array_equal(read_png(tmp_path / "cli" / f"{i:04d}.png", "gray"),
                                      read_png(tmp_path / "direct" / f"{i:04d}.png", "gray"))


def test_run_errors_are_reported_not_raised(clip, tmp_path, capsys):
    assert cli.main([str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o.mp4"), "--device", "cpu",
                     "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "--checkpoint" in capsys.readouterr().err
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert cli.main([clip, "-o", str(tmp_path / "o.mp4"), "--device", "cpu",
                     "--checkpoint", str(tmp_path / "bad.pth")]) == 1
    err = capsys.readouterr().err
    assert "--checkpoint: checkpoint '" in err and "bad.pth' is not a readable PyTorch checkpoint" in err
    assert cli.main([clip, "-o", str(tmp_path / "o.mp4"), "--device", "cpu", "--checkpoint", str(tmp_path)]) == 1
    assert f"--checkpoint '{tmp_path}' is a folder, expected a checkpoint file" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "missing.mp4"), "-o", str(tmp_path / "o.mp4"), "--device", "cpu",
                     "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "bimatting: error: input '" in err and "does not exist" in err
    assert "Traceback" not in err
    assert cli.main([clip, "-o", clip, "--device", "cpu"]) == 1
    assert "input file itself" in capsys.readouterr().err
    assert cli.main([clip, "-o", "x.mp4", "--device", "nonsense"]) == 2
    assert "--device" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


def test_errors_name_the_flags(monkeypatch, clip, tmp_path, capsys):
    """convert_video's errors name its arguments (output_alpha, num_workers...); the command
    shows its flags instead, and leaves the quoted paths as they are."""
    monkeypatch.setattr(cli, "load_model", lambda *a: FakeMatting())
    cases = [
        (["-o", str(tmp_path / "o.avi")], "-o/--composition '"),
        (["-o", str(tmp_path / "o.avi")], "(or --output-type png_sequence for a folder of PNGs)"),
        (["--alpha", str(tmp_path / "output_alpha" / "a.mp4")],
         f"--alpha '{tmp_path / 'output_alpha' / 'a.mp4'}': the folder '{tmp_path / 'output_alpha'}'"),
        (["--alpha", str(tmp_path / "a.mp4"), "--foreground", str(tmp_path / "a.mp4")],
         "--foreground '"),
    ]
    for argv, message in cases:
        assert cli.main([clip, "--no-progress", *argv]) == 1
        err = capsys.readouterr().err
        assert message in err, err
        unquoted = re.sub(r"'[^']*'", "", err)
        for name in ("input_source", "output_composition", "output_alpha", "output_foreground", "num_workers"):
            assert name not in unquoted
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("text,want", [("30000/1001", Fraction(30000, 1001)), ("29.97", Fraction(30000, 1001)),
                                       ("25", Fraction(25)), ("12.5", Fraction(25, 2))])
def test_frame_rate_real_run(monkeypatch, tmp_path, capsys, text, want):
    """--frame-rate through a real conversion (not a stub of convert_video): the output's rate."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        make_video(str(folder / f"{i}.png"), 1, 10, 8, codec="png", pix_fmt="rgb24")
    monkeypatch.setattr(cli, "load_model", lambda *a: FakeMatting())
    out = tmp_path / "o.mp4"
    assert cli.main([str(folder), "-o", str(out), "--frame-rate", text, "--no-progress"]) == 0, \
        capsys.readouterr().err
    frames, info = decode(str(out))
    assert len(frames) == 3 and info["frame_rate"] == want
    assert [p * info["time_base"] for p in info["pts"]] == [i / want for i in range(3)]


def test_fused(monkeypatch, clip, tmp_path, capsys):
    monkeypatch.delattr(bimatting_triton, "convert", raising=False)
    assert cli.main([clip, "-o", str(tmp_path / "o.mp4"), "--device", "cpu", "--fused"]) == 2
    assert "--fused needs bimatting_triton.convert" in capsys.readouterr().err
    seen = []

    def fake_convert(model):
        seen.append(type(model).__name__)
        return FakeMatting()

    monkeypatch.setattr(bimatting_triton, "convert", fake_convert, raising=False)
    out = tmp_path / "pha.mkv"
    assert cli.main([clip, "--alpha", str(out), "--device", "cpu", "--fused", "--no-progress"]) == 0
    assert seen == ["BiMatting"]
    frames, _ = decode(str(out), "gray")
    src, _ = decode(clip)   # the fake model's alpha is the mean of RGB: it was the one used
    want = torch.from_numpy(src).float().div(255).mean(-1).mul(255).round().numpy()
    assert np.abs(frames.astype(float) - want).mean() < 3


def test_with_flags_reads_like_the_command_line():
    assert cli._with_flags("num_workers must be >= 0; or output_type='png_sequence', 'output_type=x'") == \
        "--threads must be >= 0; or --output-type png_sequence, 'output_type=x'"


@pytest.mark.parametrize("device,available,count,message", [
    ("cuda", False, 0, "--device 'cuda': CUDA is not available here"),
    ("cuda:1", False, 0, "--device 'cuda:1': CUDA is not available here"),
    ("cuda:2", True, 2, "--device 'cuda:2': this machine has 2 CUDA device(s), cuda:0 to cuda:1"),
    ("meta", False, 0, "--device 'meta': the meta device holds no data"),
    ("nonsense", False, 0, "--device 'nonsense' is not a torch device"),
])
def test_device_is_checked_up_front(recorded, monkeypatch, capsys, device, available, count, message):
    """A device this PyTorch cannot use is a usage error naming --device (exit 2, no traceback),
    before the model is loaded."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    assert cli.main(["in.mp4", "--alpha", "a.mp4", "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"bimatting: error: {message}" in err and "Traceback" not in err and "RANDOM" not in err
    assert recorded == {}


@pytest.mark.skipif(hasattr(torch, "xpu") and torch.xpu.is_available(), reason="this PyTorch has an XPU")
def test_device_type_this_build_lacks(recorded, capsys):
    assert cli.main(["in.mp4", "--alpha", "a.mp4", "--device", "xpu"]) == 2
    assert "--device 'xpu' cannot be used by this PyTorch" in capsys.readouterr().err and recorded == {}


def test_cuda_graph_flag(monkeypatch, capsys):
    calls = {}
    monkeypatch.setattr(cli, "load_model", lambda *a: FakeMatting())
    monkeypatch.setattr("bimatting_triton.video.convert_video",
                        lambda model, src, **kw: calls.setdefault("model", model) and 3)
    assert cli.main(["in.mp4", "-o", "o.mp4", "--device", "cpu", "--cuda-graph"]) == 2
    assert "--cuda-graph needs a CUDA device, got --device 'cpu'" in capsys.readouterr().err and not calls
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["in.mp4", "-o", "o.mp4", "--cuda-graph"]) == 2   # no --device: none to name
    err = capsys.readouterr().err
    assert "--cuda-graph needs a CUDA device, and none is available (no --device given" in err and not calls
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli.main(["in.mp4", "-o", "o.mp4", "--device", "cuda", "--cuda-graph"]) == 0
    step = calls["model"]
    assert isinstance(step, bimatting_triton.CudaGraphStep) and isinstance(step.model, FakeMatting)


def test_packed_checkpoint(clip, tmp_path, capsys, monkeypatch):
    """A packed inference checkpoint runs its fused model, with or without --fused; a
    --refiner other than its own is refused."""
    from bimatting_triton.kernels import _common
    from bimatting_triton.packed import load_packed, save_packed

    monkeypatch.setattr(_common, "interpreting", lambda: False)  # references, not the slow interpreter

    torch.manual_seed(4)
    save_packed(BiMatting().eval(), tmp_path / "m.packed")
    run = [clip, "--checkpoint", str(tmp_path / "m.packed"), "--device", "cpu", "--seq-chunk", "3",
           "--downsample-ratio", "0.5", "--no-progress"]
    for name, extra in (("plain", []), ("fused", ["--fused"])):
        assert cli.main([*run, "--alpha", str(tmp_path / name), *extra]) == 0
        err = capsys.readouterr().err
        assert "is a packed inference checkpoint: running its fused model" in err and "RANDOM" not in err
    convert_video(load_packed(tmp_path / "m.packed"), clip, output_type="png_sequence",
                  output_alpha=str(tmp_path / "direct"), seq_chunk=3, downsample_ratio=0.5, progress=False)
    for i in range(3):
        want = read_png(tmp_path / "direct" / f"{i:04d}.png", "gray")
        for name in ("plain", "fused"):
            np.testing.assert_array_equal(read_png(tmp_path / name / f"{i:04d}.png", "gray"), want)
    assert cli.main([*run, "--alpha", str(tmp_path / "x"), "--refiner", "fast_guided_filter"]) == 2
    assert "--refiner fast_guided_filter: the packed --checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_packed_checkpoint_runs_in_its_own_dtype(clip, tmp_path, monkeypatch):
    """A bfloat16 packed file runs in bfloat16 unless --dtype says otherwise (it ran in float32)."""
    from bimatting_triton.kernels import _common
    from bimatting_triton.packed import save_packed

    # The dtype's way through the command is the point here: the kernels' plain-PyTorch
    # references (as on a CPU without TRITON_INTERPRET), not the interpreter, which is slow.
    monkeypatch.setattr(_common, "interpreting", lambda: False)

    save_packed(BiMatting().eval().bfloat16(), tmp_path / "m.packed")
    seen = []
    import bimatting_triton.video as video

    original = video.convert_video

    def spy(model, *args, dtype=None, **kwargs):
        seen.append((model.project_mat.conv.weight.dtype, dtype))
        return original(model, *args, dtype=dtype, **kwargs)

    monkeypatch.setattr(video, "convert_video", spy)
    run = [clip, "--checkpoint", str(tmp_path / "m.packed"), "--device", "cpu", "--no-progress"]
    assert cli.main([*run, "--alpha", str(tmp_path / "a")]) == 0
    assert cli.main([*run, "--alpha", str(tmp_path / "b"), "--dtype", "float32"]) == 0
    assert seen == [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)]


def test_downsample_ratio_too_small_hint(clip, tmp_path, capsys):
    assert cli.main([clip, "--alpha", str(tmp_path / "a"), "--device", "cpu", "--no-progress",
                     "--downsample-ratio", "0.01"]) == 1
    err = capsys.readouterr().err
    assert "--downsample-ratio: 0.01 turns the 40x24 frames into nothing; use a larger ratio, or leave it " \
           "unset (None) for the automatic choice of convert_video and the bimatting command" in err
    assert os.listdir(tmp_path) == []


def test_ctrl_c_exit_code_and_no_file(monkeypatch, clip, tmp_path, capsys):
    monkeypatch.setattr(cli, "load_model", lambda *a: FakeMatting(fail_at=1))
    code = cli.main([clip, "-o", str(tmp_path / "o.mp4"), "--seq-chunk", "1", "--no-progress"])
    assert code == 130
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


# The command run as a child whose SIGINT disposition is set first: "default" as in an
# interactive terminal (Python's KeyboardInterrupt), "ignore" as a background job of a
# non-interactive shell (``cmd &`` ignores SIGINT and SIGQUIT in the job). Set explicitly
# because a child otherwise inherits pytest's: a suite itself started as such a job (seen:
# ``(python -m pytest ... &)``) had SIGINT ignored all the way down, and the SIGINT case
# could not pass there.
_CHILD = ("import runpy, signal, sys; "
          "signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[1] == 'ignore' else signal.default_int_handler); "
          "sys.argv = ['bimatting'] + sys.argv[2:]; runpy.run_module('bimatting_triton', run_name='__main__')")


def _interrupt_run(tmp_path, sig, sigint: str):
    """Start the command on a 400-frame clip, send ``sig`` once it is writing; (exit code, stderr)."""
    clip = make_video(str(tmp_path / "in.mp4"), 400, 32, 24, rate=25)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, sigint, clip, "-o", str(tmp_path / "o.mp4"),
                             "--alpha", str(tmp_path / "a.mov"), "--device", "cpu", "--no-progress",
                             "--seq-chunk", "1"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not any(name.endswith(".part") for name in os.listdir(tmp_path)):   # started
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        time.sleep(0.3)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_real_signal_leaves_no_file(tmp_path, sig):
    """A real Ctrl-C (SIGINT) or kill (SIGTERM) mid-run: exit 130, nothing left behind."""
    code, err = _interrupt_run(tmp_path, sig, "default")
    assert code == 130, err[-2000:]
    assert "interrupted" in err
    assert os.listdir(tmp_path) == ["in.mp4"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_stops_a_run_whose_sigint_is_ignored(tmp_path):
    """A background job (SIGINT ignored) still stops cleanly on ``kill``: SIGTERM does not go
    through SIGINT (re-raising SIGINT there was a no-op and the run went on to the end)."""
    code, err = _interrupt_run(tmp_path, signal.SIGTERM, "ignore")
    assert code == 130, err[-2000:]
    assert "interrupted" in err
    assert os.listdir(tmp_path) == ["in.mp4"]
