"""Carry compiled Triton kernels from this machine to a GPU machine (no GPU needed here).

    python bench/triton_cache_archive.py pack CACHE_DIR ARCHIVE      # after compile_model.py runs
    python bench/triton_cache_archive.py unpack ARCHIVE CACHE_DIR    # on the GPU machine

Triton looks a compiled kernel up in ``TRITON_CACHE_DIR`` by the SHA-256 of a key string,
``f"{triton_key()}-{src.hash()}-{backend.hash()}-{options.hash()}-{env_vars}"``, and reads the
kernel's files from the absolute paths listed in the entry's ``__grp__*.json``. Two things
stop a cache filled on one machine from being found on another:

* the paths: they name the directory the cache was filled in. ``unpack`` rewrites them.
* ``triton_key()``: the Triton version, a hash of each of Triton's Python files, and a hash
  of its compiled library ``libtriton.so``. That library is built once per Python version
  (the GPU image runs Python 3.12, this machine 3.11), so the same Triton release gives
  another key there, although the compiler in it, and so every compiled kernel, is the same.
  ``compile_model.py`` records, beside each entry it compiles, the key's parts
  (``bimatting-key.json``); ``unpack`` recomputes the entry's name with the local
  ``triton_key()`` where the two keys differ in the library's hash only (same version, same
  Python sources), and leaves out entries whose keys differ in anything else (another
  release, other ``TRITON_*`` variables, another ``ptxas``): those are compiled there as usual.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tarfile
import tempfile

import triton
import triton.compiler.compiler as triton_compiler
import triton.runtime.cache as triton_cache
from triton.backends.compiler import GPUTarget

SIDECAR = "bimatting-key.json"  # beside Triton's files in an entry; Triton ignores it


def entry_name(key: str) -> str:
    """The cache directory name Triton gives a compile key (``get_cache_manager(sha256(key))``)."""
    return triton_cache._base32(hashlib.sha256(key.encode("utf-8")).hexdigest())


@functools.lru_cache(maxsize=None)
def libtriton_hash() -> str:
    """The SHA-256 of this Triton's ``libtriton`` library, as ``triton_key()`` hashes it."""
    ext = sysconfig.get_config_var("EXT_SUFFIX").split(".")[-1]
    path = os.path.join(os.path.dirname(triton.__file__), "_C", f"libtriton.{ext}")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def recording_keys():
    """While active, every compile's key is kept (compile -> ``get_cache_key``); yields
    ``{sha256 hex of the key: parts}``, the parts that ``write_sidecar`` stores."""
    keys: dict[str, dict] = {}
    original = triton_compiler.get_cache_key

    def get_cache_key(src, backend, options, env_vars):
        key = original(src, backend, options, env_vars)
        prefix = triton_cache.triton_key() + "-"
        if key.startswith(prefix):  # (else: a Triton whose key we do not know how to rebuild)
            target = backend.target
            keys[hashlib.sha256(key.encode("utf-8")).hexdigest()] = dict(
                triton_key=prefix[:-1], rest=key[len(prefix):], libtriton=libtriton_hash(),
                env_vars=str(sorted(env_vars.items())), backend=backend.hash(),
                target=[target.backend, target.arch, target.warp_size])
        return key

    triton_compiler.get_cache_key = get_cache_key
    try:
        yield keys
    finally:
        triton_compiler.get_cache_key = original


def write_sidecar(compiled, keys: dict) -> None:
    """Store the key parts of ``compiled`` (a Triton ``CompiledKernel``) beside its files."""
    parts = keys.get(compiled.hash)
    if parts is not None:
        triton_cache.get_cache_manager(compiled.hash).put(json.dumps(parts), SIDECAR, binary=False)


def pack(cache_dir: str, archive: str) -> int:
    """``cache_dir`` -> ``archive`` (.tar.xz, written whole, then renamed); number of entries."""
    entries = sorted(e for e in os.listdir(cache_dir) if os.path.isdir(os.path.join(cache_dir, e)))
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(archive)), prefix=".tmp-", suffix=".tar.xz")
    os.close(fd)
    try:
        with tarfile.open(tmp, "w:xz") as tar:
            for entry in entries:
                tar.add(os.path.join(cache_dir, entry), arcname=entry)
        os.chmod(tmp, 0o644)
        os.replace(tmp, archive)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(entries)


def rebuilt_triton_key(recorded: dict, local_key: str, local_libtriton: str) -> str | None:
    """``local_key`` if an entry compiled under ``recorded['triton_key']`` is valid here: the
    keys are equal, or differ only where the recorded key holds the recorded ``libtriton``
    hash and the local one the local library's (another build of the same Triton). Else None."""
    if recorded["triton_key"] == local_key:
        return local_key
    theirs, ours = recorded["triton_key"].split("-"), local_key.split("-")
    if len(theirs) != len(ours):
        return None
    differ = [i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b]
    if differ and all(theirs[i] == recorded["libtriton"] and ours[i] == local_libtriton for i in differ):
        return local_key
    return None


@functools.lru_cache(maxsize=None)
def backend_hash(backend: str, arch: int, warp_size: int) -> str:
    """This Triton's compiler backend hash for a target (for CUDA: its ptxas version and arch)."""
    return triton_compiler.make_backend(GPUTarget(backend, arch, warp_size)).hash()


def unpack(archive: str, cache_dir: str, local_key: str | None = None, local_libtriton: str | None = None,
           local_env_vars: str | None = None, local_backend_hash=backend_hash) -> dict:
    """Extract ``archive`` into ``cache_dir`` under the names this Triton looks up; the
    ``local_*`` arguments default to this machine's (tests pass others). Returns counts:
    ``{'entries', 'as_is', 'rekeyed', 'other_triton', 'other_env', 'other_backend', 'no_key'}``;
    entries without a recorded key are extracted as they are (``no_key``)."""
    local_key = local_key if local_key is not None else triton_cache.triton_key()
    local_libtriton = local_libtriton if local_libtriton is not None else libtriton_hash()
    if local_env_vars is None:
        local_env_vars = str(sorted(triton_compiler.get_cache_invalidating_env_vars().items()))
    counts = dict(entries=0, as_is=0, rekeyed=0, other_triton=0, other_env=0, other_backend=0, no_key=0)
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".unpack-") as staging:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        for entry in sorted(os.listdir(staging)):
            source = os.path.join(staging, entry)
            if not os.path.isdir(source):
                continue
            counts["entries"] += 1
            name, sidecar = entry, os.path.join(source, SIDECAR)
            if os.path.exists(sidecar):
                with open(sidecar) as f:
                    recorded = json.load(f)
                if recorded["env_vars"] != local_env_vars:
                    counts["other_env"] += 1
                    continue
                if recorded["backend"] != local_backend_hash(*recorded["target"]):  # another ptxas
                    counts["other_backend"] += 1
                    continue
                key = rebuilt_triton_key(recorded, local_key, local_libtriton)
                if key is None:
                    counts["other_triton"] += 1
                    continue
                name = entry_name(f"{key}-{recorded['rest']}")
                counts["as_is" if name == entry else "rekeyed"] += 1
            else:
                counts["no_key"] += 1
            target = os.path.join(cache_dir, name)
            if not os.path.exists(target):  # (else compiled here already: Triton's own is kept)
                _point_groups_at(source, target)
                shutil.move(source, target)
    return counts


def _point_groups_at(entry_dir: str, final_dir: str) -> None:
    """Rewrite the entry's ``__grp__*.json`` file lists to name files under ``final_dir``."""
    for name in os.listdir(entry_dir):
        if not name.startswith("__grp__"):
            continue
        path = os.path.join(entry_dir, name)
        with open(path) as f:
            group = json.load(f)
        group["child_paths"] = {child: os.path.join(final_dir, os.path.basename(p))
                                for child, p in group["child_paths"].items()}
        with open(path, "w") as f:
            json.dump(group, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="CACHE_DIR -> ARCHIVE")
    p.add_argument("cache_dir")
    p.add_argument("archive")
    u = sub.add_parser("unpack", help="ARCHIVE -> CACHE_DIR, under this Triton's keys")
    u.add_argument("archive")
    u.add_argument("cache_dir")
    args = parser.parse_args(argv)
    if args.command == "pack":
        if not os.path.isdir(args.cache_dir):
            parser.error(f"CACHE_DIR {args.cache_dir!r} is not a directory")
        print(f"{pack(args.cache_dir, args.archive)} kernels -> {args.archive} (triton {triton.__version__})")
        return
    if not os.path.isfile(args.archive):
        parser.error(f"ARCHIVE {args.archive!r} is not a file")
    counts = unpack(args.archive, args.cache_dir)
    line = (f"prebuilt kernels: {counts['entries']} in the archive; usable by triton {triton.__version__} here: "
            f"{counts['as_is']} as built, {counts['rekeyed']} under this Triton build's key")
    if counts["other_triton"] or counts["other_env"] or counts["other_backend"]:
        line += (f"; not usable: {counts['other_triton']} from another Triton, {counts['other_env']} built with "
                 f"other TRITON_* variables, {counts['other_backend']} with another ptxas")
    if counts["no_key"]:
        line += f"; {counts['no_key']} without a recorded key, extracted as they are"
    print(line)


if __name__ == "__main__":
    main(sys.argv[1:])
