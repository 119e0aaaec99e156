"""Read TensorFlow 1 checkpoints without TensorFlow; convert the Pensieve actors to npz.

The GENET / UDR actors of the upstream artifact are published as TF1 checkpoints
(``<prefix>.index`` + ``<prefix>.data-00000-of-00001``), the "tensor bundle" format:

* ``.index`` is a LevelDB-style SSTable. Its 48-byte footer holds the block handles
  of the metaindex and index blocks and a magic number; the index block maps the last
  key of each data block to that block's handle; a data block is a run of
  prefix-compressed ``key -> value`` entries followed by restart offsets, and every
  block is followed by a 5-byte trailer (compression type, masked crc32c).
* The value of key ``""`` is a ``BundleHeaderProto`` (number of shards, endianness);
  every other key is a tensor name whose value is a ``BundleEntryProto`` (dtype, shape,
  shard, offset, size, masked crc32c of the bytes).
* ``.data-SSSSS-of-NNNNN`` holds the raw little-endian tensor bytes.

Everything here is plain Python + numpy: a varint/protobuf field reader, the SSTable
block format (with the small snappy decompressor LevelDB tables may use) and a
vectorised crc32c, so a corrupt or truncated file is reported instead of read.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path

import numpy as np

from netllm.utils import NetLLMError, atomic_path

__all__ = ["read_tf_checkpoint", "convert_actor", "convert_all", "actor_arrays", "pick_checkpoint",
           "crc32c", "ACTOR_KEYS", "CHECKPOINTS"]

# npz key -> (checkpoint variable name, shape), in the order the reference npz files
# store them (the order TensorFlow's reader listed the variables), so that a
# conversion reproduces the reference files byte for byte.
ACTOR_KEYS: dict[str, tuple[int, ...]] = {
    "FullyConnected_3.W": (768, 128),
    "FullyConnected.W": (1, 128),
    "Conv1D_2.b": (128,),
    "Conv1D_2.W": (4, 1, 6, 128),
    "FullyConnected_1.W": (1, 128),
    "Conv1D_1.b": (128,),
    "FullyConnected_2.b": (128,),
    "FullyConnected_4.W": (128, 3),
    "Conv1D.W": (4, 1, 6, 128),
    "FullyConnected_3.b": (128,),
    "Conv1D_1.W": (4, 1, 6, 128),
    "FullyConnected_1.b": (128,),
    "Conv1D.b": (128,),
    "FullyConnected.b": (128,),
    "FullyConnected_2.W": (1, 128),
    "FullyConnected_4.b": (3,),
}
_ACTOR_SCOPE = "actor/"

# The checkpoint each upstream model folder is converted from (the upstream
# artifact's choice, its ``Config.baseline_model_paths``; udr_1 ships epochs 57400
# and 57600, and 57600 is the one the reference npz was converted from). Any other
# folder: its highest epoch.
CHECKPOINTS: dict[str, str] = {
    "genet": "nn_model_ep_9900.ckpt",
    "udr_1": "nn_model_ep_57600.ckpt",
    "udr_2": "nn_model_ep_52400.ckpt",
    "udr_3": "nn_model_ep_58000.ckpt",
    "udr_real": "nn_model_ep_49000.ckpt",
}

# tensorflow/core/framework/types.proto DataType -> numpy little-endian dtype
_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),   # DT_FLOAT
    2: np.dtype("<f8"),   # DT_DOUBLE
    3: np.dtype("<i4"),   # DT_INT32
    4: np.dtype("u1"),    # DT_UINT8
    5: np.dtype("<i2"),   # DT_INT16
    6: np.dtype("i1"),    # DT_INT8
    9: np.dtype("<i8"),   # DT_INT64
    10: np.dtype("?"),    # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}
_DT_STRING = 7

_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_LEN = 48
_TRAILER_LEN = 5  # compression type byte + masked crc32c
_NO_COMPRESSION, _SNAPPY = 0, 1


class _Corrupt(Exception):
    """Internal: a structural problem; turned into NetLLMError naming the file."""


# --------------------------------------------------------------------------- crc32c


@cache
def _crc_table() -> np.ndarray:
    """The byte table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


_CHUNK = 512  # bytes per lane of the vectorised crc


@cache
def _zeros_operator() -> tuple[tuple[int, ...], ...]:
    """Four 256-entry tables applying "feed _CHUNK zero bytes" to a crc register.

    The register update is linear over GF(2), so feeding n zero bytes is a 32x32 bit
    matrix; split by register byte it becomes four table lookups.
    """
    table = _crc_table()
    columns = np.uint32(1) << np.arange(32, dtype=np.uint32)
    for _ in range(_CHUNK):
        columns = table[columns & 0xFF] ^ (columns >> 8)
    cols = [int(c) for c in columns]
    tables = []
    for byte in range(4):
        t = [0] * 256
        for v in range(1, 256):
            low = (v & -v).bit_length() - 1
            t[v] = t[v & (v - 1)] ^ cols[8 * byte + low]
        tables.append(tuple(t))
    return tuple(tables)


def _crc_update(register: int, data: bytes | memoryview) -> int:
    table = _crc_table().tolist()
    for b in bytes(data):
        register = table[(register ^ b) & 0xFF] ^ (register >> 8)
    return register


def crc32c(data: bytes | memoryview) -> int:
    """CRC-32C of ``data``; long inputs run as parallel lanes combined by linearity."""
    buf = np.frombuffer(data, dtype=np.uint8)
    lanes = len(buf) // _CHUNK
    register = 0xFFFFFFFF
    if lanes >= 8:
        table = _crc_table()
        rows = buf[: lanes * _CHUNK].reshape(lanes, _CHUNK)
        regs = np.zeros(lanes, dtype=np.uint32)
        for j in range(_CHUNK):  # each lane's crc from a zero register
            regs = table[(regs ^ rows[:, j]) & 0xFF] ^ (regs >> 8)
        t0, t1, t2, t3 = _zeros_operator()
        for lane in regs.tolist():  # crc(A || B) = zeros_|B|(crc(A)) ^ crc0(B)
            register = (t0[register & 0xFF] ^ t1[(register >> 8) & 0xFF]
                        ^ t2[(register >> 16) & 0xFF] ^ t3[register >> 24] ^ lane)
        data = memoryview(buf[lanes * _CHUNK:])
    return _crc_update(register, data) ^ 0xFFFFFFFF


def _unmask(masked: int) -> int:
    """Undo LevelDB/TensorFlow's crc masking: ((c >> 15 | c << 17) + 0xa282ead8)."""
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot >> 17) | (rot << 15)) & 0xFFFFFFFF


# --------------------------------------------------------------------------- protobuf


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Corrupt("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Corrupt("varint longer than 10 bytes")


def _fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """The (field number, value) pairs of a protobuf message; varints as int,
    fixed32/fixed64 as int, length-delimited as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            if pos + 8 > len(buf):
                raise _Corrupt("truncated fixed64 field")
            value = int.from_bytes(buf[pos:pos + 8], "little")
            pos += 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            if pos + n > len(buf):
                raise _Corrupt("truncated length-delimited field")
            value = buf[pos:pos + n]
            pos += n
        elif wire == 5:
            if pos + 4 > len(buf):
                raise _Corrupt("truncated fixed32 field")
            value = int.from_bytes(buf[pos:pos + 4], "little")
            pos += 4
        else:
            raise _Corrupt(f"unsupported protobuf wire type {wire}")
        out.append((number, value))
    return out


def _parse_entry(buf: bytes) -> dict:
    """A BundleEntryProto: dtype=1, shape=2, shard_id=3, offset=4, size=5, crc32c=6,
    slices=7."""
    entry: dict = {"dtype": 0, "shape": [], "shard_id": 0, "offset": 0, "size": 0,
                   "crc32c": None, "slices": False}
    for number, value in _fields(buf):
        if number == 1:
            entry["dtype"] = value
        elif number == 2:  # TensorShapeProto: dim=2 (Dim: size=1), unknown_rank=3
            for n2, v2 in _fields(value):  # type: ignore[arg-type]
                if n2 == 2:
                    size = dict(_fields(v2)).get(1, 0)  # type: ignore[arg-type]
                    entry["shape"].append(size - (1 << 64) if size >= 1 << 63 else size)
                elif n2 == 3 and v2:
                    raise _Corrupt("tensor of unknown rank")
        elif number in (3, 4, 5):
            entry[{3: "shard_id", 4: "offset", 5: "size"}[number]] = value
        elif number == 6:
            entry["crc32c"] = value
        elif number == 7:
            entry["slices"] = True
    return entry


# --------------------------------------------------------------------------- sstable


def _snappy_decompress(buf: bytes) -> bytes:
    """Raw snappy format (as LevelDB stores compressed blocks)."""
    length, pos = _varint(buf, 0)
    out = bytearray()
    n = len(buf)
    while pos < n:
        tag = buf[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                if pos + extra > n:
                    raise _Corrupt("truncated snappy literal length")
                size = int.from_bytes(buf[pos:pos + extra], "little")
                pos += extra
            size += 1
            if pos + size > n:
                raise _Corrupt("truncated snappy literal")
            out += buf[pos:pos + size]
            pos += size
            continue
        if kind == 1:
            if pos + 1 > n:
                raise _Corrupt("truncated snappy copy")
            size = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | buf[pos]
            pos += 1
        else:
            width = 2 if kind == 2 else 4
            if pos + width > n:
                raise _Corrupt("truncated snappy copy")
            size = (tag >> 2) + 1
            offset = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        if offset == 0 or offset > len(out):
            raise _Corrupt("snappy copy before the start of the output")
        start = len(out) - offset
        if offset >= size:
            out += out[start:start + size]
        else:  # overlapping copy repeats the last `offset` bytes
            for i in range(size):
                out.append(out[start + i])
    if len(out) != length:
        raise _Corrupt(f"snappy block decodes to {len(out)} bytes, header says {length}")
    return bytes(out)


def _block_handle(buf: bytes, pos: int) -> tuple[int, int, int]:
    offset, pos = _varint(buf, pos)
    size, pos = _varint(buf, pos)
    return offset, size, pos


def _read_block(table: bytes, offset: int, size: int) -> bytes:
    """One block's contents, checksum-verified and decompressed."""
    end = offset + size
    if end + _TRAILER_LEN > len(table) - _FOOTER_LEN:
        raise _Corrupt(f"block at byte {offset} (+{size}) runs past the end of the table")
    contents = table[offset:end]
    kind = table[end]
    stored = int.from_bytes(table[end + 1:end + _TRAILER_LEN], "little")
    if crc32c(table[offset:end + 1]) != _unmask(stored):
        raise _Corrupt(f"checksum mismatch in the block at byte {offset}")
    if kind == _NO_COMPRESSION:
        return contents
    if kind == _SNAPPY:
        return _snappy_decompress(contents)
    raise _Corrupt(f"block at byte {offset} uses unsupported compression type {kind}")


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """The key/value pairs of one block (keys are prefix-compressed against the
    previous key; a restart array of uint32 offsets and its count end the block)."""
    if len(block) < 4:
        raise _Corrupt("block shorter than its restart count")
    num_restarts = int.from_bytes(block[-4:], "little")
    limit = len(block) - 4 - 4 * num_restarts
    if num_restarts < 1 or limit < 0:
        raise _Corrupt("bad restart array in a block")
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < limit:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_len, pos = _varint(block, pos)
        if shared > len(key) or pos + unshared + value_len > limit:
            raise _Corrupt("bad entry in a block")
        key = key[:shared] + block[pos:pos + unshared]
        pos += unshared
        entries.append((key, block[pos:pos + value_len]))
        pos += value_len
    return entries


def _read_table(table: bytes) -> list[tuple[bytes, bytes]]:
    """All key/value pairs of an SSTable, in key order."""
    if len(table) < _FOOTER_LEN:
        raise _Corrupt(f"{len(table)} bytes is shorter than the {_FOOTER_LEN}-byte footer")
    footer = table[-_FOOTER_LEN:]
    if int.from_bytes(footer[-8:], "little") != _TABLE_MAGIC:
        raise _Corrupt("no table magic number at the end (truncated?)")
    _, _, pos = _block_handle(footer, 0)  # metaindex: unused by tensor bundles
    index_offset, index_size, _ = _block_handle(footer, pos)
    entries: list[tuple[bytes, bytes]] = []
    for _, handle in _block_entries(_read_block(table, index_offset, index_size)):
        offset, size, _ = _block_handle(handle, 0)
        entries.extend(_block_entries(_read_block(table, offset, size)))
    return entries


# --------------------------------------------------------------------------- bundle


def _prefix(prefix: str | os.PathLike[str]) -> Path:
    path = Path(prefix)
    if path.name.endswith(".index"):
        return path.with_name(path.name[: -len(".index")])
    match = re.fullmatch(r"(.*)\.data-\d{5}-of-\d{5}", path.name)
    return path.with_name(match.group(1)) if match else path


def read_tf_checkpoint(prefix: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Every tensor of a TF1 checkpoint, by variable name (e.g. ``actor/Conv1D/W``).

    ``prefix`` is the checkpoint path without extension (``.../nn_model_ep_9900.ckpt``;
    the ``.index`` path is accepted too). Arrays are returned in their native dtype
    and shape. A missing, truncated or corrupt file raises NetLLMError naming it.
    """
    prefix = _prefix(prefix)
    index_path = prefix.with_name(prefix.name + ".index")
    try:
        table = index_path.read_bytes()
    except OSError as err:
        raise NetLLMError(f"cannot read TensorFlow checkpoint index {index_path}: "
                          f"{err.strerror or err}") from None
    try:
        items = _read_table(table)
        if not items or items[0][0] != b"":
            raise _Corrupt("no bundle header (empty key)")
        header = dict(_fields(items[0][1]))
        num_shards = header.get(1, 1)
        if header.get(2, 0) != 0:
            raise _Corrupt("big-endian tensor bundles are not supported")
        entries = [(k.decode("utf-8"), _parse_entry(v)) for k, v in items[1:]]
    except (_Corrupt, UnicodeDecodeError) as err:
        raise NetLLMError(f"corrupt TensorFlow checkpoint index {index_path}: {err}") from None

    shards: dict[int, tuple[Path, bytes]] = {}
    tensors: dict[str, np.ndarray] = {}
    for name, entry in entries:
        shard = entry["shard_id"]
        if not 0 <= shard < num_shards:
            raise NetLLMError(f"corrupt TensorFlow checkpoint index {index_path}: "
                              f"tensor {name!r} is in shard {shard} of {num_shards}")
        if shard not in shards:
            path = prefix.with_name(f"{prefix.name}.data-{shard:05d}-of-{num_shards:05d}")
            try:
                shards[shard] = (path, path.read_bytes())
            except OSError as err:
                raise NetLLMError(f"cannot read TensorFlow checkpoint data {path}: "
                                  f"{err.strerror or err}") from None
        data_path, data = shards[shard]
        tensors[name] = _tensor(name, entry, data, data_path, index_path)
    return tensors


def _tensor(name: str, entry: dict, data: bytes, data_path: Path, index_path: Path) -> np.ndarray:
    offset, size, shape = entry["offset"], entry["size"], tuple(entry["shape"])
    if entry["slices"]:
        raise NetLLMError(f"{index_path}: tensor {name!r} is stored in slices (partitioned "
                          "variables are not supported)")
    if any(d < 0 for d in shape):
        raise NetLLMError(f"corrupt TensorFlow checkpoint index {index_path}: tensor {name!r} "
                          f"has shape {list(shape)}")
    if offset + size > len(data):
        raise NetLLMError(
            f"TensorFlow checkpoint data {data_path} is truncated or corrupt: tensor {name!r} "
            f"needs bytes {offset}..{offset + size} but the file has {len(data)}")
    raw = data[offset:offset + size]
    if entry["crc32c"] is not None and crc32c(raw) != _unmask(entry["crc32c"]):
        raise NetLLMError(f"TensorFlow checkpoint data {data_path} is corrupt: "
                          f"checksum mismatch for tensor {name!r}")
    count = int(np.prod(shape, dtype=np.int64))
    if entry["dtype"] == _DT_STRING:
        return _string_tensor(name, raw, count, shape, data_path)
    dtype = _DTYPES.get(entry["dtype"])
    if dtype is None:
        raise NetLLMError(f"{index_path}: tensor {name!r} has unsupported TensorFlow dtype "
                          f"enum {entry['dtype']}")
    if size != count * dtype.itemsize:
        raise NetLLMError(
            f"corrupt TensorFlow checkpoint index {index_path}: tensor {name!r} of shape "
            f"{list(shape)} and dtype {dtype} should take {count * dtype.itemsize} bytes, "
            f"the entry says {size}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _string_tensor(name: str, raw: bytes, count: int, shape: tuple[int, ...],
                   data_path: Path) -> np.ndarray:
    """DT_STRING: varint64 lengths, a 4-byte checksum of them, then the bytes."""
    try:
        lengths, pos = [], 0
        for _ in range(count):
            n, pos = _varint(raw, pos)
            lengths.append(n)
        pos += 4
        values = []
        for n in lengths:
            if pos + n > len(raw):
                raise _Corrupt("string runs past its entry")
            values.append(raw[pos:pos + n])
            pos += n
    except _Corrupt as err:
        raise NetLLMError(f"TensorFlow checkpoint data {data_path} is corrupt: "
                          f"string tensor {name!r}: {err}") from None
    out = np.empty(count, dtype=object)
    out[:] = values
    return out.reshape(shape)


# --------------------------------------------------------------------------- convert


def actor_arrays(
    tensors: dict[str, np.ndarray], source: str | os.PathLike[str]
) -> dict[str, np.ndarray]:
    """The Pensieve actor's weights under the npz keys (``actor/Conv1D/W`` ->
    ``Conv1D.W``), checked against the expected shapes; optimizer slots and the
    critic are left out."""
    out: dict[str, np.ndarray] = {}
    for key, shape in ACTOR_KEYS.items():
        name = _ACTOR_SCOPE + key.replace(".", "/")
        if name not in tensors:
            raise NetLLMError(f"{source} is not a Pensieve actor checkpoint: "
                              f"variable {name!r} is missing")
        array = tensors[name]
        if array.shape != shape or array.dtype != np.float32:
            raise NetLLMError(f"{source}: {name} is {array.dtype}{list(array.shape)}, "
                              f"expected float32{list(shape)}")
        out[key] = array
    return out


def convert_actor(prefix: str | os.PathLike[str], out_npz: str | os.PathLike[str]) -> None:
    """Write the actor of the TF1 checkpoint ``prefix`` as an npz (atomically)."""
    prefix = _prefix(prefix)
    arrays = actor_arrays(read_tf_checkpoint(prefix), prefix)
    with atomic_path(out_npz) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def _epoch(prefix: str) -> int:
    match = re.search(r"(\d+)\.ckpt$", prefix)
    return int(match.group(1)) if match else -1


def pick_checkpoint(folder: str | os.PathLike[str]) -> Path:
    """The checkpoint prefix to convert in one model folder: the one the upstream
    artifact uses (``CHECKPOINTS``), else the one with the highest epoch number."""
    folder = Path(folder)
    found = sorted(p.name[: -len(".index")] for p in folder.glob("*.ckpt.index"))
    wanted = CHECKPOINTS.get(folder.name)
    if wanted is not None:
        if wanted not in found:
            raise NetLLMError(f"{folder / wanted}.index is missing (fetch it with "
                              "'netllm data fetch abr')")
        return folder / wanted
    if not found:
        raise NetLLMError(f"{folder} holds no TensorFlow checkpoint (*.ckpt.index)")
    return folder / max(found, key=lambda name: (_epoch(name), name))


def convert_all(root: str | os.PathLike[str]) -> list[Path]:
    """Convert ``<root>/abr/upstream_checkpoints/<name>/`` into
    ``<root>/abr/pretrained/<name>_actor.npz`` for every model folder.

    Idempotent: an npz that already holds exactly the checkpoint's actor is left
    untouched. Returns the npz paths (converted or already up to date).
    """
    root = Path(root)
    source = root / "abr" / "upstream_checkpoints"
    if not source.is_dir():
        raise NetLLMError(f"{source} does not exist; fetch it with 'netllm data fetch abr'")
    written: list[Path] = []
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        prefix = pick_checkpoint(folder)
        out = root / "abr" / "pretrained" / f"{folder.name}_actor.npz"
        arrays = actor_arrays(read_tf_checkpoint(prefix), prefix)
        if not _same_npz(out, arrays):
            with atomic_path(out) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
        written.append(out)
    return written


def _same_npz(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as z:
            return set(z.files) == set(arrays) and all(
                z[k].dtype == a.dtype and np.array_equal(z[k], a) for k, a in arrays.items())
    except Exception:  # unreadable -> rewrite it
        return False
