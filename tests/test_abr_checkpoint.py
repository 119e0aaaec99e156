"""TF1 checkpoint reader and Pensieve actor conversion (no TensorFlow)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from netllm.data import default_manifest
from netllm.tasks.abr import checkpoint as ck
from netllm.utils import NetLLMError

NAMES = ("genet", "udr_1", "udr_2", "udr_3", "udr_real")


def _slow_crc32c(data: bytes) -> int:
    register = 0xFFFFFFFF
    for b in data:
        register ^= b
        for _ in range(8):
            register = (register >> 1) ^ (0x82F63B78 if register & 1 else 0)
    return register ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------- a tiny bundle writer


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _block(items: list[tuple[bytes, bytes]], restart_interval: int = 2) -> bytes:
    out, restarts, last = bytearray(), [], b""
    for i, (key, value) in enumerate(items):
        shared = 0
        if i % restart_interval:
            while shared < min(len(key), len(last)) and key[shared] == last[shared]:
                shared += 1
        else:
            restarts.append(len(out))
        out += _varint(shared) + _varint(len(key) - shared) + _varint(len(value))
        out += key[shared:] + value
        last = key
    for r in restarts:
        out += struct.pack("<I", r)
    return bytes(out + struct.pack("<I", len(restarts)))


def _snappy_literal(data: bytes) -> bytes:
    """A valid snappy stream made of literal elements only."""
    out = bytearray(_varint(len(data)))
    for i in range(0, len(data), 60):
        part = data[i:i + 60]
        out.append((len(part) - 1) << 2)
        out += part
    return bytes(out)


def _write_bundle(prefix: Path, tensors: dict[str, np.ndarray], snappy: bool) -> None:
    data = bytearray()
    items = [(b"", _field(1, 1) + _field(3, _field(1, 1)))]  # num_shards=1, version
    for name in sorted(tensors):
        array = np.asarray(tensors[name])  # (ascontiguousarray would make a scalar 1-d)
        dtype = {np.float32: 1, np.float64: 2, np.int32: 3, np.int64: 9}[array.dtype.type]
        raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
        shape = b"".join(_field(2, _field(1, d)) for d in array.shape)
        entry = (_field(1, dtype) + _field(2, shape) + _field(4, len(data)) + _field(5, len(raw))
                 + _varint(6 << 3 | 5) + struct.pack("<I", _mask(_slow_crc32c(raw))))
        items.append((name.encode(), entry))
        data += raw
    table = bytearray()

    def put(contents: bytes) -> bytes:
        kind = 0
        if snappy:
            contents, kind = _snappy_literal(contents), 1
        handle = _varint(len(table)) + _varint(len(contents))
        trailer = bytes([kind])
        crc = _mask(_slow_crc32c(contents + trailer))
        table.extend(contents + trailer + struct.pack("<I", crc))
        return handle

    index = []
    for i in range(0, len(items), 2):  # two entries per data block: several blocks
        chunk = items[i:i + 2]
        index.append((chunk[-1][0] + b"\xff", put(_block(chunk))))
    meta = put(_block([]))
    index_handle = put(_block(index))
    footer = (meta + index_handle).ljust(40, b"\0") + struct.pack("<Q", 0xDB4775248B80FB57)
    prefix.with_name(prefix.name + ".index").write_bytes(bytes(table) + footer)
    prefix.with_name(prefix.name + ".data-00000-of-00001").write_bytes(bytes(data))


# ----------------------------------------------------------------- unit tests


def test_crc32c_known_values_and_long_inputs() -> None:
    assert ck.crc32c(b"123456789") == 0xE3069283
    assert ck.crc32c(b"") == 0
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()
    for n in (1, 511, 512, 4095, 4096, 4097, 20000):  # the vectorised path starts at 4096
        assert ck.crc32c(data[:n]) == _slow_crc32c(data[:n])


def test_snappy_literals_and_overlapping_copies() -> None:
    # "ab" then copy (1-byte offset 2, length 8) then copy (2-byte offset 10, length 3)
    stream = bytes([13, 0x04]) + b"ab" + bytes([0x11, 2]) + bytes([0x0A, 10, 0])
    assert ck._snappy_decompress(stream) == b"ababababab" + b"aba"
    with pytest.raises(ck._Corrupt):
        ck._snappy_decompress(bytes([5, 0x04]) + b"ab")  # decodes to 2 bytes, not 5


@pytest.mark.parametrize("snappy", [False, True])
def test_synthetic_bundle_round_trip(tmp_path: Path, snappy: bool) -> None:
    tensors = {
        "a/float": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        "a/double": np.linspace(-1, 1, 5),
        "b/int32": np.array([[1, -2], [3, 2**31 - 1]], dtype=np.int32),
        "b/int64": np.array([-(2**40), 5], dtype=np.int64),
        "scalar": np.array(2.5, dtype=np.float32),
        "big": np.random.default_rng(1).normal(size=(64, 100)),
    }
    prefix = tmp_path / "model.ckpt"
    _write_bundle(prefix, tensors, snappy)
    got = ck.read_tf_checkpoint(prefix)
    assert set(got) == set(tensors)
    for name, array in tensors.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape
        assert np.array_equal(got[name], array)
    # the .index path is accepted as well
    assert set(ck.read_tf_checkpoint(str(prefix) + ".index")) == set(tensors)


# ----------------------------------------------------------------- real checkpoints


def _upstream(root: Path) -> Path:
    folder = root / "abr" / "upstream_checkpoints"
    if not folder.is_dir():
        pytest.skip(f"no upstream ABR checkpoints in {root}")
    return folder


def test_real_checkpoint_contents(real_data: Path) -> None:
    tensors = ck.read_tf_checkpoint(_upstream(real_data) / "genet" / "nn_model_ep_9900.ckpt")
    assert tensors["actor/Conv1D/W"].shape == (4, 1, 6, 128)
    assert tensors["actor/FullyConnected_4/W"].shape == (128, 3)
    assert tensors["critic/FullyConnected_4/W"].shape == (128, 1)
    assert tensors["actor/FullyConnected_3/W/RMSProp_1"].shape == (768, 128)
    assert tensors["is_training"].dtype == np.bool_
    assert all(a.dtype == np.float32 for n, a in tensors.items() if n != "is_training")


def test_pick_checkpoint_udr_1_is_the_upstream_epoch(real_data: Path) -> None:
    folder = _upstream(real_data) / "udr_1"
    assert ck.pick_checkpoint(folder).name == "nn_model_ep_57600.ckpt"
    other = ck.actor_arrays(ck.read_tf_checkpoint(folder / "nn_model_ep_57400.ckpt"), "57400")
    with np.load(real_data / "abr" / "pretrained" / "udr_1_actor.npz") as ref:
        assert not np.array_equal(other["FullyConnected_4.W"], ref["FullyConnected_4.W"])


@pytest.mark.parametrize("name", NAMES)
def test_convert_actor_matches_reference_npz(real_data: Path, tmp_path: Path, name: str) -> None:
    out = tmp_path / f"{name}_actor.npz"
    ck.convert_actor(ck.pick_checkpoint(_upstream(real_data) / name), out)
    with np.load(out) as got, np.load(real_data / "abr" / "pretrained" / out.name) as ref:
        assert set(got.files) == set(ref.files) == set(ck.ACTOR_KEYS)
        for key in ref.files:
            assert got[key].dtype == ref[key].dtype and got[key].shape == ref[key].shape
            assert np.array_equal(got[key], ref[key]), key
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_convert_all_reproduces_manifest_bytes_and_is_idempotent(
        real_data: Path, tmp_path: Path) -> None:
    (tmp_path / "abr").mkdir()
    (tmp_path / "abr" / "upstream_checkpoints").symlink_to(_upstream(real_data).resolve())
    outs = ck.convert_all(tmp_path)
    assert [p.name for p in outs] == [f"{n}_actor.npz" for n in NAMES]
    manifest = default_manifest()
    for path in outs:
        expected = manifest[f"abr/pretrained/{path.name}"].sha256
        assert hashlib.sha256(path.read_bytes()).hexdigest() == expected, path.name
    stamps = [p.stat().st_mtime_ns for p in outs]
    assert ck.convert_all(tmp_path) == outs
    assert [p.stat().st_mtime_ns for p in outs] == stamps  # up to date: not rewritten


# ----------------------------------------------------------------- broken files


@pytest.fixture
def genet_copy(real_data: Path, tmp_path: Path) -> Path:
    src = _upstream(real_data) / "genet"
    for f in src.iterdir():
        shutil.copyfile(f, tmp_path / f.name)
        os.chmod(tmp_path / f.name, 0o644)
    return tmp_path / "nn_model_ep_9900.ckpt"


@pytest.mark.parametrize("keep", [0, 10, 0.5, -1, -30])
def test_truncated_index_names_the_file(genet_copy: Path, keep: float) -> None:
    index = genet_copy.with_name(genet_copy.name + ".index")
    raw = index.read_bytes()
    if isinstance(keep, float):
        cut = int(len(raw) * keep)
    else:
        cut = keep if keep >= 0 else len(raw) + keep
    index.write_bytes(raw[:cut])
    with pytest.raises(NetLLMError, match=re.escape(str(index))):
        ck.read_tf_checkpoint(genet_copy)


def test_corrupt_index_block_is_detected(genet_copy: Path) -> None:
    index = genet_copy.with_name(genet_copy.name + ".index")
    raw = bytearray(index.read_bytes())
    raw[100] ^= 0x40
    index.write_bytes(bytes(raw))
    with pytest.raises(NetLLMError, match=re.escape(str(index))):
        ck.read_tf_checkpoint(genet_copy)


def test_truncated_or_corrupt_data_names_the_file(genet_copy: Path, tmp_path: Path) -> None:
    data = genet_copy.with_name(genet_copy.name + ".data-00000-of-00001")
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(NetLLMError, match=re.escape(str(data)) + ".*truncated"):
        ck.read_tf_checkpoint(genet_copy)
    with pytest.raises(NetLLMError, match=re.escape(str(data))):
        ck.convert_actor(genet_copy, tmp_path / "out.npz")
    assert not (tmp_path / "out.npz").exists()
    flipped = bytearray(raw)
    flipped[1000] ^= 1
    data.write_bytes(bytes(flipped))
    with pytest.raises(NetLLMError, match=re.escape(str(data)) + ".*checksum"):
        ck.read_tf_checkpoint(genet_copy)
    data.unlink()
    with pytest.raises(NetLLMError, match=re.escape(str(data))):
        ck.read_tf_checkpoint(genet_copy)


def test_missing_checkpoint_and_not_an_actor(tmp_path: Path) -> None:
    with pytest.raises(NetLLMError, match="nope.ckpt.index"):
        ck.read_tf_checkpoint(tmp_path / "nope.ckpt")
    prefix = tmp_path / "other.ckpt"
    _write_bundle(prefix, {"x": np.zeros(3, np.float32)}, snappy=False)
    with pytest.raises(NetLLMError, match="actor/"):
        ck.convert_actor(prefix, tmp_path / "out.npz")
    with pytest.raises(NetLLMError, match="upstream_checkpoints"):
        ck.convert_all(tmp_path)
