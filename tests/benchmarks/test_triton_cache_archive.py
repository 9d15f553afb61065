"""bench/triton_cache_archive.py: which prebuilt kernels another machine's Triton may use.

(The whole round trip, compiled kernels found after unpacking, is in test_compile_model.py.)
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
import triton_cache_archive as archive  # noqa: E402

KEY = "3.6.0aaa-bbb-LIB-ccc"  # triton_key(): version + file hashes, LIB the library's


def _entry(root, name: str, **key_parts):
    """A cache entry as Triton writes it (one file, its group listing it by absolute path
    where it was compiled), with compile_model's sidecar if key parts are given."""
    entry = root / name
    entry.mkdir(parents=True)
    (entry / "k.json").write_text("{}")
    (entry / "__grp__k.json").write_text(json.dumps({"child_paths": {"k.json": f"/elsewhere/{name}/k.json"}}))
    if key_parts:
        (entry / archive.SIDECAR).write_text(json.dumps(key_parts))


def test_unpack_keeps_renames_or_leaves_out_each_entry(tmp_path):
    parts = dict(triton_key=KEY, rest="src-opts", libtriton="LIB", env_vars="[]", backend="ptxas-12.8-90",
                 target=["cuda", 90, 32])
    same = archive.entry_name(f"{KEY}-src-opts")
    built = tmp_path / "built"
    _entry(built, same, **parts)
    _entry(built, "OTHERBUILD", **dict(parts, rest="r2", triton_key="3.6.0aaa-bbb-LIB0-ccc", libtriton="LIB0"))
    _entry(built, "OTHERRELEASE", **dict(parts, rest="r3", triton_key="3.7.0aaa-bbb-LIB0-ccc", libtriton="LIB0"))
    _entry(built, "OTHERENV", **dict(parts, rest="r4", env_vars="[('TRITON_DEFAULT_FP_FUSION', '0')]"))
    _entry(built, "OTHERPTXAS", **dict(parts, rest="r5", backend="ptxas-13.0-90"))
    _entry(built, "NOKEY")
    assert archive.pack(str(built), str(tmp_path / "a.tar.xz")) == 6

    out = tmp_path / "out"
    counts = archive.unpack(str(tmp_path / "a.tar.xz"), str(out), local_key=KEY, local_libtriton="LIB",
                            local_env_vars="[]", local_backend_hash=lambda *target: "ptxas-12.8-90")
    assert counts == dict(entries=6, as_is=1, rekeyed=1, other_triton=1, other_env=1, other_backend=1, no_key=1)
    rekeyed = archive.entry_name(f"{KEY}-r2")
    assert sorted(os.listdir(out)) == sorted([same, rekeyed, "NOKEY"])
    for name in (same, rekeyed, "NOKEY"):  # file lists point where the files now are
        group = json.loads((out / name / "__grp__k.json").read_text())
        assert group == {"child_paths": {"k.json": str(out / name / "k.json")}}


def test_only_the_library_hash_may_differ_between_triton_builds():
    recorded = dict(triton_key=KEY, libtriton="LIB")
    assert archive.rebuilt_triton_key(recorded, KEY, "LIB") == KEY
    assert archive.rebuilt_triton_key(recorded, "3.6.0aaa-bbb-OTHER-ccc", "OTHER") == "3.6.0aaa-bbb-OTHER-ccc"
    assert archive.rebuilt_triton_key(recorded, "3.6.0aaa-bbb-OTHER-ccd", "OTHER") is None  # a Python file differs
    assert archive.rebuilt_triton_key(recorded, "3.7.0aaa-bbb-OTHER-ccc", "OTHER") is None  # another release
    assert archive.rebuilt_triton_key(recorded, "3.6.0aaa-bbb-OTHER-ccc", "THIRD") is None  # not the local library
    assert archive.rebuilt_triton_key(recorded, "3.6.0aaa-bbb-ccc", "LIB") is None
