"""Packed inference checkpoint: ``save_packed(model, path)`` / ``load_packed(path)``.

The file holds what the fused model (:func:`bimatting_triton.convert`) reads, and
nothing it can derive:

* the binary weights of every :class:`~bimatting_triton.fuse.BinaryConvUnit` as one
  bit per weight (its sign), over the real input channels only (the 32-channel word
  padding is dropped), all units in one ``uint8`` bit stream, most significant bit
  first; the rare exact-zero weights (``w_c == 0``, e.g. a constant output channel)
  as a list of their positions in that stream;
* every other entry of the fused model's ``state_dict()`` (folded BN ``scale`` /
  ``shift``, LearnableBias vectors, PReLU slopes, the float layers: stem conv and its
  BatchNorm, decode0's float conv, the projection heads, the refiner) in the smallest
  dtype that gives back every value bitwise: the first of float16, bfloat16, float32
  (float64 for a float64 model) whose round trip is exact, per tensor; a tensor whose
  elements are all equal is stored as one value. Entries are concatenated into one
  flat tensor per storage dtype, so the container adds ~5 KB (half of it the
  compressed list of entry names), not a zip record per tensor.

Not stored: a unit's ``int8`` weights (unpacked from the bits on load, by
:class:`~bimatting_triton.kernels.packed_weight.PackedWeight`, as ``convert`` does) and
its ``alpha`` (``mean|w_c|``), which the fused forward never reads: it is folded
into ``scale``. A loaded unit's ``alpha`` holds its ``scale``, which equals the
original ``alpha`` bitwise where the unit has no BatchNorm and no conv bias, and is
the effective per-channel scale of the folded convolution elsewhere.

So the loaded model's ``state_dict()`` equals ``convert(model)``'s (``alpha`` aside)
and its outputs are *equal*, bit for bit, on the same backend and device. Storing the
float vectors as float16 instead would not keep them equal: a vector rounded by up to
2**-11 relative moves values across ``sign`` thresholds, and the flipped activations
propagate (on the golden reference network of ``tests/test_golden.py`` and its input,
rounding all float entries to float16 changes ``pha`` by up to 0.27, 0.006 on average).
Trained float32 values are essentially never float16-exact, so the floats stay
float32: ~23% of BiMatting's file.

File format (version :data:`VERSION`): ``torch.save`` of a dict of tensors, ``str`` and
``int`` only, read back with ``torch.load(weights_only=True)``::

    format   'bimatting-packed'         version   1
    refiner  BiMatting's refiner name   dtype     the model's float dtype
    sha256   hex digest of the tensors below
    manifest uint8: zlib(JSON list of [name, kind, dtype, shape, store, in_channels])
    signs    uint8 (ceil(S / 8),)       zeros     int64 (Z,): positions in the stream
    pool.<dtype>  one flat tensor per storage dtype, entries in manifest order

``load_packed`` rebuilds ``convert(BiMatting(refiner=...))`` and fills it from the
file; a file that is not this format, another version, truncated, corrupted or whose
entries do not fit the fused model (names, shapes, dtypes) raises
:class:`PackedCheckpointError` (a ``ValueError``) saying which. Files are written
atomically (a temporary file in the same folder, then ``os.replace``): a new file gets
the permissions of a plainly created one (``0o666`` less the umask), a replaced file
keeps its own.
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib

import torch
from torch import Tensor, nn

from .atomic import check_output_file, torch_save_atomically
from .checkpoint import PACKED_FORMAT, CheckpointError
from .devices import usable_device
from .fuse import BACKENDS, BinaryConvUnit, convert
from .fuse_decoder import current_conv_gru_key
from .kernels.binary_conv import PackedWeight, dot_weights
from .kernels.pack import WORD_BITS, pack_values, unpack_values, words_for
from .model import BiMatting
from .nn import BiConv2d

__all__ = ["save_packed", "load_packed", "PackedCheckpointError", "FORMAT", "VERSION"]

FORMAT = PACKED_FORMAT
VERSION = 1

# Storage dtypes by name (the names are what the file holds).
_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "int8": torch.int8, "uint8": torch.uint8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "bool": torch.bool,
}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}
_FLOATS = ("float16", "bfloat16", "float32", "float64")
_MODEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # a model's float dtype

# Manifest kinds: how an entry is stored.
_BITS, _INT8, _ALPHA, _CONST, _POOL = "bits", "int8", "alpha", "const", "pool"
_HEADER_FIELDS = {"format": str, "version": int, "refiner": str, "dtype": str, "sha256": str,
                  "manifest": Tensor, "signs": Tensor, "zeros": Tensor}  # fmt: skip


class PackedCheckpointError(CheckpointError):
    """A packed checkpoint that cannot be read: wrong format or version, truncated,
    corrupted, or not matching the fused model it should fill."""


# ----------------------------------------------------------------------------------------
# Bit streams and dtype choice
# ----------------------------------------------------------------------------------------
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32)


def _pack_bits(flags: Tensor) -> Tensor:
    """bool (S,) -> uint8 (ceil(S / 8),), first flag in the most significant bit."""
    pad = -flags.numel() % 8
    b = torch.cat([flags.to(torch.int32), flags.new_zeros(pad, dtype=torch.int32)]).view(-1, 8)
    return (b * _BIT_WEIGHTS).sum(dim=1).to(torch.uint8)


def _unpack_bits(stream: Tensor, count: int) -> Tensor:
    """Inverse of :func:`_pack_bits`: uint8 -> bool (count,)."""
    shifts = torch.arange(7, -1, -1, dtype=torch.int32)
    return ((stream.to(torch.int32).unsqueeze(1) >> shifts) & 1).view(-1)[:count].bool()


def _bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _float_store(v: Tensor) -> str:
    """Name of the smallest float dtype that holds every value of float tensor ``v`` bitwise."""
    own = _NAMES[v.dtype]
    for name in _FLOATS[: _FLOATS.index(own)]:
        if _bitwise_equal(v.to(_DTYPES[name]).to(v.dtype), v):
            return name
    return own


def _digest(tensors: list[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(t.dtype).encode())
        if t.numel():  # (an empty tensor may have any strides, e.g. 0, which no view takes)
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _payload(obj: dict) -> list[Tensor]:
    """The tensors covered by the checksum, in a fixed order."""
    pools = [obj[k] for k in sorted(obj) if k.startswith("pool.")]
    return [obj["manifest"], obj["signs"], obj["zeros"], *pools]


# ----------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------
def _fused(model: nn.Module) -> nn.Module:
    if not isinstance(model, BiMatting):
        raise TypeError(
            f"model must be a BiMatting (plain, or converted with bimatting_triton.convert), got {type(model).__name__}"
        )
    if any(isinstance(m, BiConv2d) for m in model.modules()):
        return convert(model, backend="reference")
    if not any(isinstance(m, BinaryConvUnit) for m in model.modules()):
        raise ValueError("model has neither BiConv2d layers nor packed BinaryConvUnit layers")
    return model


def _check_canonical(name: str, bits: Tensor, cin: int) -> None:
    """Bits as ``pack_values`` writes them: no sign bit without its nonzero bit, padding 0.

    Those are the only bits that one sign per weight cannot give back.
    """
    sign, nonzero = bits[:, :, 0], bits[:, :, 1]  # (KH, KW, CW, Cout) int32
    bad = bool((sign & ~nonzero).any())
    used = cin % WORD_BITS
    if used:
        high = -(1 << used)  # int32 mask of the bits above channel cin - 1 in the last word
        bad = bad or bool((bits[:, :, :, -1] & high).any())
    if bad:
        raise ValueError(f"{name}: the packed bits are not a canonical sign packing (padding bits, or sign "
                         "bits without their nonzero bit, are set); one sign per weight cannot store them")


def _encode(fused: nn.Module) -> tuple[list, Tensor, Tensor, dict[str, Tensor]]:
    """Manifest rows, sign stream, zero positions and pools of a fused model (on the CPU)."""
    units = {name: m for name, m in fused.named_modules() if isinstance(m, BinaryConvUnit)}
    rows: list[list] = []
    signs: list[Tensor] = []
    zeros: list[Tensor] = []
    pools: dict[str, list[Tensor]] = {}
    packed_bits: dict[str, Tensor] = {}
    n_signs = 0
    for name, value in fused.state_dict().items():
        value = value.detach().cpu()
        parent, _, leaf = name.rpartition(".")
        unit = units.get(parent)
        row = [name, _POOL, _NAMES[value.dtype], list(value.shape), _NAMES[value.dtype], 0]
        if unit is not None and leaf == "bits":
            cin = unit.in_channels
            _check_canonical(name, value, cin)
            vals = unpack_values(value.permute(0, 1, 4, 2, 3), cin, torch.int8)  # (KH, KW, Cout, Cin)
            packed_bits[parent] = value
            flat = vals.reshape(-1)
            signs.append(flat < 0)
            zeros.append(torch.nonzero(flat == 0).view(-1) + n_signs)
            n_signs += flat.numel()
            row[1], row[4], row[5] = _BITS, "signs", cin
        elif unit is not None and leaf == "int8":
            # PackedWeight's int8: the bits' values as dot_weights lays them out (derived).
            bits = packed_bits.get(parent)
            if bits is None or not torch.equal(value, dot_weights(bits)):
                raise ValueError(f"{name}: int8 weights differ from the ones unpacked from the bits")
            row[1], row[4] = _INT8, "derived"
        elif unit is not None and leaf == "alpha":
            row[1], row[4] = _ALPHA, "derived"
        else:
            flat = value.reshape(-1)
            if flat.numel() > 1 and _bitwise_equal(flat, flat[:1].expand_as(flat)):
                row[1], flat = _CONST, flat[:1]
            store = _float_store(flat) if value.is_floating_point() else row[4]
            row[4] = store
            pools.setdefault(store, []).append(flat.to(_DTYPES[store]))
        rows.append(row)
    sign_stream = _pack_bits(torch.cat(signs)) if signs else torch.zeros(0, dtype=torch.uint8)
    zero_pos = torch.cat(zeros) if zeros else torch.zeros(0, dtype=torch.int64)
    return rows, sign_stream, zero_pos, {k: torch.cat(v) for k, v in pools.items()}


def save_packed(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model`` as a packed inference checkpoint at ``path``; returns its size in bytes.

    ``model``: a :class:`~bimatting_triton.BiMatting`, plain (converted here with
    ``convert``: BatchNorm folded with its running statistics, i.e. eval semantics) or
    already converted, in float16, bfloat16, float32 or float64. :func:`load_packed` gives back a model whose
    outputs equal ``convert(model)``'s bit for bit (module docstring). The file is
    written atomically, with the permissions of a plainly created file (an existing one
    keeps its own). ``path``: a file in an existing folder, checked before encoding.
    """
    path = check_output_file(path, "path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path {path!r}: the folder {folder!r} does not exist")
    fused = _fused(model)
    dtypes = {p.dtype for p in fused.state_dict().values() if p.is_floating_point()}
    if len(dtypes) != 1:
        raise ValueError(f"model must have one float dtype, got {sorted(str(d) for d in dtypes)}")
    (dtype,) = dtypes
    if dtype not in _MODEL_DTYPES:
        raise ValueError(f"model must be float16, bfloat16, float32 or float64, got {dtype}")
    rows, signs, zeros, pools = _encode(fused)
    manifest = zlib.compress(json.dumps(rows, separators=(",", ":")).encode(), 9)
    obj: dict = {
        "format": FORMAT,
        "version": VERSION,
        "refiner": fused.refiner_name,
        "dtype": _NAMES[dtype],
        "manifest": torch.frombuffer(bytearray(manifest), dtype=torch.uint8),
        "signs": signs,
        "zeros": zeros,
        **{f"pool.{k}": v for k, v in pools.items()},
    }
    obj["sha256"] = _digest(_payload(obj))
    torch_save_atomically(obj, path)
    return os.path.getsize(path)


# ----------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------
def _read(path: str) -> tuple[dict, list]:
    """The checked header dict and manifest rows of a packed file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"packed checkpoint path {path!r} does not exist or is not a file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:  # (a file that cannot be read, e.g. no permission, says so itself, naming it)
        raise
    except Exception as exc:  # truncated zip, pickle with code in it, not a torch file ...
        raise PackedCheckpointError(
            f"{path!r} could not be read as a weights-only torch file (truncated, corrupted or not a "
            f"packed checkpoint): {exc}"
        ) from exc
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise PackedCheckpointError(
            f"{path!r} is not a packed BiMatting checkpoint (no 'format': {FORMAT!r} header); a float "
            "state_dict loads with BiMatting.from_pretrained"
        )
    if obj.get("version") != VERSION:
        raise PackedCheckpointError(
            f"{path!r} has packed format version {obj.get('version')!r}; this bimatting_triton reads version {VERSION}"
        )
    bad = [k for k, t in _HEADER_FIELDS.items() if not isinstance(obj.get(k), t)]
    pools = {k: v for k, v in obj.items() if k.startswith("pool.")}
    bad += [k for k, v in pools.items() if not isinstance(v, Tensor) or _DTYPES.get(k[5:]) != v.dtype]
    if bad:
        raise PackedCheckpointError(f"{path!r}: missing or malformed header fields {sorted(bad)}")
    if obj["dtype"] not in (_NAMES[d] for d in _MODEL_DTYPES):
        raise PackedCheckpointError(f"{path!r}: unknown model dtype {obj['dtype']!r}")
    if _digest(_payload(obj)) != obj["sha256"]:
        raise PackedCheckpointError(f"{path!r}: checksum mismatch, the file is corrupted")
    try:
        rows = json.loads(zlib.decompress(obj["manifest"].numpy().tobytes()))
    except (zlib.error, ValueError) as exc:
        raise PackedCheckpointError(f"{path!r}: unreadable manifest: {exc}") from exc
    if not isinstance(rows, list) or not all(_valid_row(r) for r in rows):
        raise PackedCheckpointError(f"{path!r}: malformed manifest rows")
    return obj, _current_names(rows)


def _current_names(rows: list) -> list:
    """Manifest rows with the entry names of earlier versions of the fused model renamed (in
    place; same values): the bottleneck GRU's units before ``FusedConvGRU``."""
    for row in rows:
        row[0] = current_conv_gru_key(row[0], "decoder.decode4.gru.")
    return rows


def _valid_row(row) -> bool:
    """``[name, kind, dtype, shape, store, in_channels]`` with the types the loader expects."""
    return (
        isinstance(row, list) and len(row) == 6
        and all(isinstance(row[i], str) for i in (0, 1, 2, 4))
        and isinstance(row[3], list) and all(isinstance(d, int) and d >= 0 for d in row[3])
        and isinstance(row[5], int) and row[2] in _DTYPES
        and (row[1] != _BITS or (len(row[3]) == 5 and row[5] > 0))
    )  # fmt: skip


def _check_layout(rows: list, expected: dict[str, Tensor], source: str) -> None:
    """Names, shapes and dtypes of the file's entries against the fused model's state_dict."""
    names = [r[0] for r in rows]
    present = set(names)
    missing = [k for k in expected if k not in present]
    unexpected = [k for k in names if k not in expected]
    mismatched = [
        f"{r[0]}: file {r[2]} {tuple(r[3])} vs model {_NAMES[expected[r[0]].dtype]} {tuple(expected[r[0]].shape)}"
        for r in rows
        if r[0] in expected and (tuple(r[3]) != tuple(expected[r[0]].shape) or r[2] != _NAMES[expected[r[0]].dtype])
    ]
    if missing or unexpected or mismatched:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:10]) + (f", ... ({len(items) - 10} more)" if len(items) > 10 else "")
                parts.append(f"{len(items)} {title}: {shown}")
        raise PackedCheckpointError(
            f"{source} does not fit this version's fused BiMatting (saved by another bimatting_triton?): "
            + "; ".join(parts)
        )


def _decode(obj: dict, rows: list, units: dict[str, BinaryConvUnit], source: str) -> dict[str, Tensor]:
    """The fused model's state_dict from the file's streams (CPU tensors)."""
    offsets = {k[5:]: 0 for k in obj if k.startswith("pool.")}
    n_signs = sum(
        r[3][0] * r[3][1] * r[3][4] * r[5] for r in rows if r[1] == _BITS
    )  # KH * KW * Cout * Cin per unit
    if obj["signs"].numel() != -(-n_signs // 8):
        raise PackedCheckpointError(f"{source}: sign stream holds {obj['signs'].numel()} bytes, "
                                    f"expected {-(-n_signs // 8)}: the file is corrupted")
    signs = _unpack_bits(obj["signs"], n_signs)
    values = 1 - 2 * signs.to(torch.int8)
    zeros = obj["zeros"]
    if zeros.dtype != torch.int64 or (zeros.numel() and (zeros.min() < 0 or zeros.max() >= n_signs)):
        raise PackedCheckpointError(f"{source}: zero-weight positions out of range: the file is corrupted")
    values[zeros] = 0
    state: dict[str, Tensor] = {}
    deferred: list[list] = []
    start = 0
    for row in rows:
        name, kind, dtype, shape, store, cin = row
        if kind == _BITS:
            kh, kw, _, cw, cout = shape
            if cw != words_for(cin):
                raise PackedCheckpointError(f"{source}: {name}: {cw} words cannot hold {cin} channels")
            n = kh * kw * cout * cin
            vals = values[start : start + n].view(kh, kw, cout, cin)
            state[name] = pack_values(vals).permute(0, 1, 3, 4, 2).contiguous()
            start += n
        elif kind in (_INT8, _ALPHA):
            deferred.append(row)
        elif kind in (_CONST, _POOL):
            if store not in offsets:
                raise PackedCheckpointError(f"{source}: {name} refers to a missing pool.{store}")
            count = 1 if kind == _CONST else int(torch.Size(shape).numel())
            pool, at = obj[f"pool.{store}"], offsets[store]
            if at + count > pool.numel():
                raise PackedCheckpointError(f"{source}: pool.{store} is too short: the file is corrupted")
            flat = pool[at : at + count].to(_DTYPES[dtype])
            offsets[store] = at + count
            state[name] = flat.expand(int(torch.Size(shape).numel())).reshape(shape).clone()
        else:
            raise PackedCheckpointError(f"{source}: {name} has unknown storage kind {kind!r}")
    left = [k for k, at in offsets.items() if at != obj[f"pool.{k}"].numel()]
    if left:
        raise PackedCheckpointError(f"{source}: pools {left} hold more values than the manifest: the file is corrupted")
    for name, kind, *_ in deferred:
        parent = name.rpartition(".")[0]
        unit = units[parent]
        if kind == _ALPHA:
            state[name] = state[f"{parent}.scale"].clone()
        else:  # int8: unpacked from the bits exactly as convert() does (PackedWeight)
            state[name] = PackedWeight(state[f"{parent}.bits"], state[f"{parent}.scale"], unit.in_channels).int8
    return state


def load_packed(
    path: str | os.PathLike, device: str | torch.device | None = None, backend: str = "auto"
) -> nn.Module:
    """The fused BiMatting (as :func:`~bimatting_triton.convert` returns) stored at ``path``.

    ``device``: where to put it (default CPU); one this PyTorch cannot use (``'cuda'``
    without CUDA) raises ``ValueError`` before the file is read. ``backend``: as for ``convert``
    (``'auto'``: Triton kernels where they can run, ``'reference'``: plain PyTorch).
    The model is in eval mode, in the float dtype it was saved from. Reads with
    ``torch.load(weights_only=True)``; raises :class:`PackedCheckpointError` for a file
    of another format or version, a truncated or corrupted file, or one whose entries
    do not fit the fused model.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if device is not None:
        usable_device(device, "device")
    path = os.fspath(path)
    source = f"packed checkpoint {path!r}"
    obj, rows = _read(path)
    try:
        template = BiMatting(refiner=obj["refiner"])
    except ValueError as exc:
        raise PackedCheckpointError(f"{source}: {exc}") from exc
    fused = convert(template.to(_DTYPES[obj["dtype"]]), backend=backend, inplace=True)
    expected = fused.state_dict()
    _check_layout(rows, expected, source)
    units = {name: m for name, m in fused.named_modules() if isinstance(m, BinaryConvUnit)}
    for row in rows:
        if row[1] in (_BITS, _INT8, _ALPHA) and row[0].rpartition(".")[0] not in units:
            raise PackedCheckpointError(f"{source}: {row[0]} is stored as {row[1]!r} but is not a packed unit's")
        if row[1] == _BITS and row[5] != units[row[0].rpartition(".")[0]].in_channels:
            raise PackedCheckpointError(f"{source}: {row[0]}: {row[5]} input channels, the model has "
                                        f"{units[row[0].rpartition('.')[0]].in_channels}")
    fused.load_state_dict(_decode(obj, rows, units, source), strict=True)
    if device is not None:
        fused.to(device)
    return fused.eval()
