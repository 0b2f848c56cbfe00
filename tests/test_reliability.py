"""Reliability and safety (issue 8): hostile and broken files, bad input, interrupted runs.

Everything a user can get wrong goes through the real CLI (``alignmamba.cli.main``): exit
code 2, one line on stderr naming the file, no traceback, nothing half-written in --out.
Interrupted runs are resumed and must end with the metrics of an uninterrupted run.
"""
from __future__ import annotations

import csv
import io
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import alignmamba.train as train_mod
import alignmamba.train_state as ts
from alignmamba.checkpoint import recover_dir, replace_dir
from alignmamba.cli import main
from alignmamba.data import MultimodalDataset, load_dataset
from alignmamba.data.synthetic import make_synthetic
from alignmamba.errors import DataError

# tiny everything: 64/32/32 synthetic samples, d=16, one layer, one thread
TINY = ["--quiet", "--set", "data.synthetic_n_train=64", "--set", "data.synthetic_n_valid=32",
        "--set", "data.synthetic_n_test=32", "--set", "model.d_model=16", "--set", "model.n_layers=1",
        "--set", "model.d_state=4", "--set", "train.threads=1", "--set", "data.batch_size=16"]
if torch.cuda.is_available():  # resumed runs must equal uninterrupted ones bit for bit
    TINY += ["--deterministic"]
TINY_FILE = ["--quiet", "--set", "model.d_model=16", "--set", "model.n_layers=1", "--set", "model.d_state=4",
             "--set", "train.threads=1", "--set", "data.batch_size=8"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    # train.threads=1 calls torch.set_num_threads for the whole process; give it back
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_cli(capsys: pytest.CaptureFixture, *args: Any) -> tuple[int, str, str]:
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *needles: str) -> str:
    """Exit code 2 and exactly one line on stderr that names each of ``needles``."""
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("alignmamba: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


# ------------------------------------------------------------------ small files

def clean_mmsa(seed: int = 0, n: tuple[int, int, int] = (8, 4, 4)) -> dict[str, dict[str, Any]]:
    """A MOSI-shaped MMSA dict without the generator's -inf dirt (so nothing is sanitized)."""
    d = make_synthetic(like="mosi", seed=seed, n_train=n[0], n_valid=n[1], n_test=n[2])
    for s in d.values():
        for m in ("text", "audio", "vision"):
            s[m][~np.isfinite(s[m])] = 0.0
    return d


def dump(path: Path, obj: Any, protocol: int = 4) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One epoch on a tiny clean file: its run directory and data file (read-only)."""
    root = tmp_path_factory.mktemp("trained")
    data = dump(root / "clean.pkl", clean_mmsa())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = torch.get_num_threads()
        rc = main(["train", "--data", str(data), "--epochs", "1", "--out", str(root / "run"), *TINY_FILE])
        torch.set_num_threads(n)
    assert rc == 0
    return {"run": root / "run", "best": root / "run" / "seed_1111" / "best", "data": data}


# ------------------------------------------------------------------ input validation at the boundary

def _bad_label_range(d): d["train"]["regression_labels"][2] = 4.5
def _bad_label_nan(d): d["valid"]["regression_labels"][1] = np.nan
def _bad_label_inf(d): d["test"]["regression_labels"][0] = -np.inf
def _length_too_long(d): d["train"]["audio_lengths"][3] = 999
def _length_negative(d): d["valid"]["vision_lengths"][0] = -1
def _count_mismatch(d): d["train"]["vision"] = d["train"]["vision"][:-1]
def _label_count_mismatch(d): d["test"]["regression_labels"] = d["test"]["regression_labels"][:-1]
def _empty_split(d):
    for k in ("text", "audio", "vision", "text_bert"):
        d["valid"][k] = d["valid"][k][:0]
    for k in ("regression_labels", "audio_lengths", "vision_lengths", "id", "raw_text"):
        d["valid"][k] = d["valid"][k][:0]
def _missing_key(d): del d["train"]["audio"]
def _not_a_dict(d): d["train"] = [1, 2, 3]


@pytest.mark.parametrize("mutate, needle", [
    (_bad_label_range, "labels lie outside [-3, 3]"),
    (_bad_label_nan, "labels are inf or NaN"),
    (_bad_label_inf, "labels are inf or NaN"),
    (_length_too_long, "audio lengths exceed the padded length 375"),
    (_length_negative, "vision lengths are negative"),
    (_count_mismatch, "'vision' has 7 samples but 'text' has 8"),
    (_label_count_mismatch, "'regression_labels' has 3 samples but the features have 4"),
    (_empty_split, "split is empty"),
    (_missing_key, "missing key 'audio'"),
    (_not_a_dict, "split 'train' is a list"),
])
def test_bad_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, mutate, needle):
    d = clean_mmsa()
    mutate(d)
    path = dump(tmp_path / "bad.pkl", d)
    out = tmp_path / "run"
    rc, _, err = run_cli(capsys, "train", "--data", path, "--out", out, "--epochs", "1", *TINY_FILE)
    assert_user_error(rc, err, str(path), needle)
    assert files_under(out) == []
    # the same file is refused the same way by `data inspect` (which still lists the raw contents)
    rc, report, err = run_cli(capsys, "data", "inspect", path)
    assert rc == 0 and f"PROBLEM: {path}" in report and needle in report


@pytest.mark.parametrize("kind", ["missing", "directory", "empty", "text", "truncated"])
def test_unreadable_data_files(tmp_path, capsys, kind):
    path = tmp_path / "f.pkl"
    needle = {"missing": "no such file", "directory": "is a directory", "empty": "empty file",
              "text": "not a readable pickle", "truncated": "not a readable pickle"}[kind]
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("text,audio,vision\n1,2,3\n")
    elif kind == "truncated":
        blob = pickle.dumps(clean_mmsa(), protocol=4)
        path.write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "run"
    for cmd in (["train", "--data", path, "--out", out, *TINY_FILE], ["data", "inspect", path]):
        rc, _, err = run_cli(capsys, *cmd)
        assert_user_error(rc, err, str(path), needle)
    assert files_under(out) == []


def test_nonfinite_features_refused_or_sanitized_with_counts(tmp_path, capsys):
    d = clean_mmsa()
    d["train"]["vision"][1, 0, :3] = np.nan  # 3 values in a real frame
    d["test"]["audio"][0, 0, 0] = np.inf
    path = dump(tmp_path / "dirty.pkl", d)
    out = tmp_path / "refused"
    rc, _, err = run_cli(capsys, "train", "--data", path, "--out", out, "--epochs", "1",
                         "--set", "data.nonfinite=refuse", *TINY_FILE)
    assert_user_error(rc, err, str(path), "4 inf/NaN feature values", "train/vision: 3", "test/audio: 1",
                      "data.nonfinite=refuse")
    assert files_under(out) == []

    # sanitize (the default): one warning with the counts, and training goes on
    ds = load_dataset(path)
    with pytest.warns(UserWarning) as rec:
        train_mod.check_nonfinite(ds, "sanitize")
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert str(path) in msgs[0] and "4 inf/NaN feature values set to 0" in msgs[0]
    assert "train/vision: 3" in msgs[0] and "test/audio: 1" in msgs[0]
    assert float(ds["train"].features["vision"][1, 0, :3].sum()) == 0.0


def test_zero_length_is_its_own_warning_and_trains(tmp_path, capsys):
    # real unaligned MOSEI files hold a few empty streams: they load as one zero frame, counted
    d = clean_mmsa()
    d["train"]["audio_lengths"][2] = 0
    d["train"]["audio_lengths"][5] = 0
    path = dump(tmp_path / "zero.pkl", d)
    with pytest.warns(UserWarning, match=r"samples with length 0 were given length 1.*train/audio: 2"):
        ds = load_dataset(path)
    assert int(ds["train"].lengths["audio"][2]) == 1
    rc, _, err = run_cli(capsys, "train", "--data", path, "--out", tmp_path / "run", "--epochs", "1", *TINY_FILE)
    assert rc == 0, err
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_feature_width_differs_from_checkpoint(tmp_path, capsys, trained):
    d = clean_mmsa(seed=3)
    for s in d.values():
        s["audio"] = np.concatenate([s["audio"], s["audio"][..., :1]], axis=-1)  # 5 -> 6
    path = dump(tmp_path / "wide.pkl", d)
    js, png = tmp_path / "m.json", tmp_path / "p.png"
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", trained["best"], "--data", path, "--json", js)
    assert_user_error(rc, err, str(path), "audio feature width 6 does not match the checkpoint's 5")
    rc, _, err = run_cli(capsys, "plot-plan", "--checkpoint", trained["best"], "--data", path, "--out", png)
    assert_user_error(rc, err, str(path), "audio feature width 6")
    assert not js.exists() and not png.exists()


# ------------------------------------------------------------------ hostile pickles

def _reduce_p0(module: str, name: str, arg: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n(V" + arg.encode() + b"\ntR."


def _reduce_p4(module: str, name: str, arg: str) -> bytes:
    def short(b: bytes) -> bytes:
        return b"\x8c" + bytes([len(b)]) + b
    return b"\x80\x04" + short(module.encode()) + short(name.encode()) + b"\x93" + short(arg.encode()) + b"\x85R."


class _Reduce:
    """Pickles as a call of the real ``fn(*args)`` (what a malicious author writes)."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _payloads(marker: Path) -> list[tuple[str, bytes, str]]:
    """(id, bytes, the global the error must name); each would create ``marker`` if run."""
    import subprocess as sp
    cmd = f"touch {shlex.quote(str(marker))}"
    py = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    out = [
        ("os.system-p0", _reduce_p0("os", "system", cmd), "os.system"),
        ("os.system-p4", _reduce_p4("os", "system", cmd), "os.system"),
        ("eval-p0", _reduce_p0("builtins", "eval", py), "builtins.eval"),
        ("exec-p4", _reduce_p4("builtins", "exec", py), "builtins.exec"),
        ("py2-eval", _reduce_p0("__builtin__", "eval", py), "__builtin__.eval"),
        ("importlib", _reduce_p4("importlib", "import_module", "antigravity"), "importlib.import_module"),
        ("runpy", _reduce_p0("runpy", "run_path", str(marker)), "runpy.run_path"),
        ("shutil", _reduce_p0("shutil", "rmtree", str(marker.parent / "nothing")), "shutil.rmtree"),
        ("numpy.load", _reduce_p0("numpy", "load", str(marker)), "numpy.load"),
        ("torch.load", _reduce_p4("torch", "load", str(marker)), "torch.load"),
        ("pickle.loads", _reduce_p0("pickle", "loads", "x"), "pickle.loads"),
        ("not-imported", _reduce_p0("this", "s", "x"), "this.s"),
    ]
    for proto in (0, 2, 5):
        out.append((f"system-obj-p{proto}", pickle.dumps(_Reduce(os.system, cmd), protocol=proto),
                    f"{os.system.__module__}.system"))
    out.append(("popen-obj", pickle.dumps(_Reduce(sp.Popen, ["touch", str(marker)]), protocol=4), "subprocess.Popen"))
    # hidden inside an otherwise valid MMSA file
    nested = clean_mmsa()
    nested["valid"]["id"] = _Reduce(eval, py)
    out.append(("inside-valid-file", pickle.dumps(nested, protocol=4), "builtins.eval"))
    return out


_LIVE = """
import pickle, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
for path in sys.argv[2:]:
    marker.unlink(missing_ok=True)
    pickle.loads(Path(path).read_bytes())
    for _ in range(100):  # Popen runs `touch` in the background
        if marker.exists():
            break
        time.sleep(0.02)
    print(path, marker.exists())
"""


def test_payloads_are_live(tmp_path):
    # the stock unpickler does run them (in a child process): the refusals are not vacuous
    marker = tmp_path / "marker"
    paths = []
    for name, blob, _ in _payloads(marker):
        if name in ("os.system-p0", "eval-p0", "exec-p4", "system-obj-p5", "popen-obj", "inside-valid-file"):
            paths.append(tmp_path / f"{name}.pkl")
            paths[-1].write_bytes(blob)
    proc = subprocess.run([sys.executable, "-c", _LIVE, str(marker), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [w for p in paths for w in (str(p), "True")]


def test_hostile_pickles_are_refused_naming_the_global(tmp_path, capsys):
    marker = tmp_path / "marker"
    this_before = "this" in sys.modules
    for name, blob, global_name in _payloads(marker):
        path = tmp_path / f"{name}.pkl"
        path.write_bytes(blob)
        out = tmp_path / f"run-{name}"
        for cmd in (["data", "inspect", path], ["train", "--data", path, "--out", out, *TINY_FILE]):
            rc, _, err = run_cli(capsys, *cmd)
            assert_user_error(rc, err, str(path), f"refused to load global '{global_name}'")
        with pytest.raises(DataError, match=f"refused to load global '{global_name}'"):
            load_dataset(path)
        assert files_under(out) == []
    time.sleep(0.2)  # a spawned process would have had time to touch the marker
    assert not marker.exists()
    assert ("this" in sys.modules) == this_before  # the named module was never imported


_HUGE = (2**27).to_bytes(4, "little")


@pytest.mark.parametrize("blob, needle", [
    # {'a': 1} memoized at index 2**27: the C unpickler sized its memo array by it (2 GiB here;
    # a 1 KB fuzzed file with LONG_BINPUT 875835693 took 15-27 s and ~14 GB)
    (b"\x80\x02}r" + _HUGE + b"X\x01\x00\x00\x00aK\x01s.", "LONG_BINPUT memo index 134217728"),
    (b"(dp134217728\nVa\nI1\ns.", "PUT memo index 134217728"),
    # payloads longer than the file: allocated from the declared length before reading (a
    # fuzzed BYTEARRAY8 of 597 GB got a 128 GB host's pickle test killed)
    (b"\x80\x05\x96" + (597 * 2**30).to_bytes(8, "little") + b"xx.", "BYTEARRAY8 of 641023"),
    (b"\x80\x04\x8e" + (2**40).to_bytes(8, "little") + b"xx.", "BINBYTES8 of 1099511627776"),
    (b"\x80\x04\x8d" + (2**40).to_bytes(8, "little") + b"xx.", "BINUNICODE8 of"),
    (b"\x80\x03B\xff\xff\xff\x7fxx.", "BINBYTES of 2147483647 bytes, 3 left"),
    (b"\x80\x04\x95" + (2**33).to_bytes(8, "little") + b"N.", "FRAME of 8589934592"),
], ids=["LONG_BINPUT", "PUT", "BYTEARRAY8", "BINBYTES8", "BINUNICODE8", "BINBYTES", "FRAME"])
def test_declared_sizes_are_checked_before_anything_is_allocated(tmp_path, blob, needle):
    import tracemalloc

    from alignmamba.data.safe_pickle import safe_load

    path = tmp_path / "bomb.pkl"
    path.write_bytes(blob)
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as info:
            safe_load(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, peak
    msg = str(info.value)
    assert msg.startswith(f"{path}: not a readable pickle") and needle in msg and "\n" not in msg, msg


def test_opcode_walk_accepts_real_pickles_and_rewinds():
    from alignmamba.data.safe_pickle import check_opcodes

    obj = {"a": [np.arange(5.0), "x" * 300, b"y" * 70000, bytearray(b"z" * 9), 2**70, 1.5],
           "b": (None, True, {1, 2}, frozenset([3]))}
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        blob = pickle.dumps([obj, obj["a"]], protocol=proto)  # shared references: memo GETs
        f = io.BytesIO(b"junk" + blob)
        f.seek(4)
        check_opcodes(f, len(blob) + 4)
        assert f.tell() == 4


def test_shared_reference_bomb_is_refused_quickly(tmp_path, capsys):
    # 2 KB of lists that each hold the previous one twice: 2**40 items once converted
    d = clean_mmsa()
    x: Any = [0.0, 0.0]
    for _ in range(40):
        x = [x, x]
    d["train"]["audio_lengths"] = x
    path = dump(tmp_path / "bomb.pkl", d)
    t0 = time.perf_counter()
    rc, _, err = run_cli(capsys, "data", "inspect", path)
    assert_user_error(rc, err, str(path), "shared references expand to more than")
    assert time.perf_counter() - t0 < 10
    # a legitimately shared row (a list repeated a few times) still loads
    d = clean_mmsa()
    d["train"]["raw_text"] = ["a b c"] * 8
    ds = load_dataset(dump(tmp_path / "ok.pkl", d))
    assert ds["train"].raw_text == ["a b c"] * 8


# --- property test: random and corrupted pickles -> a valid dataset or DataError, nothing else

def _tiny_mmsa(rng: np.random.Generator, n: int, aligned: bool) -> dict[str, Any]:
    t = {"text": 4, "audio": 4 if aligned else 5, "vision": 4 if aligned else 6}
    w = {"text": 3, "audio": 2, "vision": 2}
    s: dict[str, Any] = {m: rng.standard_normal((n, t[m], w[m])).astype(np.float32) for m in t}
    s["regression_labels"] = rng.uniform(-3, 3, n).astype(np.float32)
    if not aligned:
        s["audio_lengths"] = [int(v) for v in rng.integers(1, 6, n)]
        s["vision_lengths"] = rng.integers(1, 7, n)
    s["id"] = [f"v{i}$_$1" for i in range(n)]
    s["raw_text"] = np.array(["good movie"] * n, dtype=object)
    return s


def _bases() -> list[bytes]:
    rng = np.random.default_rng(0)
    out = []
    for proto, aligned in ((2, False), (4, False), (5, True), (0, False)):
        obj = {s: _tiny_mmsa(rng, 3, aligned) for s in ("train", "valid", "test")}
        out.append(pickle.dumps(obj, protocol=proto))
    mult = {s: {"text": rng.standard_normal((2, 4, 3)).astype(np.float32),
                "audio": rng.standard_normal((2, 4, 2)).astype(np.float32),
                "vision": rng.standard_normal((2, 4, 2)).astype(np.float32),
                "labels": rng.uniform(-3, 3, (2, 1, 1)).astype(np.float32)} for s in ("train", "valid", "test")}
    out.append(pickle.dumps(mult, protocol=4))
    return out


BASES = _bases()
FUZZ_MARKER = Path(tempfile.gettempdir()) / f"alignmamba-fuzz-marker-{os.getpid()}"
_CMD = f"touch {FUZZ_MARKER}".encode()
_PY = f"open({str(FUZZ_MARKER)!r}, 'w')".encode()
# fragments a corruption may insert: single opcodes and pieces of real payloads
INSERTS = [bytes([c]) for c in b"(.0123456789:<=>?@BCEFGIJKLMNPQRSTUVX]abcdeghijklopqrstu}~"
                                 b"\x80\x81\x82\x83\x84\x85\x86\x87\x88\x89\x8a\x8b\x8c\x8d\x8e\x8f"
                                 b"\x90\x91\x92\x93\x94\x95\x96\x97\x98"] + [
    b"cos\nsystem\n(V" + _CMD + b"\ntR", b"cbuiltins\neval\n(V" + _PY + b"\ntR",
    b"(V" + _CMD + b"\nios\nsystem\n", b"\x8c\x02os\x8c\x06system\x93\x8c" + bytes([len(_CMD)]) + _CMD + b"\x85R",
    b"cnumpy\nndarray\n", b"cbuiltins\nbytearray\nJ\x00\x00\x00\x7fR", b"\x8e\xff\xff\xff\xff\xff\xff\x00\x00",
    b"B\xff\xff\xff\x7f", b"X\xff\xff\xff\x7f", b"\x96\x00\x00\x00\x00\x00\x01\x00\x00", b"h\x00", b"j\x00\x00\x00\x00",
]


@st.composite
def hostile_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "flip", "truncate", "insert", "overwrite"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    base = bytearray(draw(st.sampled_from(BASES)))
    if kind == "truncate":
        return bytes(base[: draw(st.integers(0, len(base) - 1))])
    if kind == "flip":
        for pos, bit in draw(st.lists(st.tuples(st.integers(0, len(base) - 1), st.integers(0, 7)),
                                      min_size=1, max_size=8)):
            base[pos] ^= 1 << bit
        return bytes(base)
    if kind == "insert":
        for pos, frag in draw(st.lists(st.tuples(st.integers(0, len(base)),
                                                 st.sampled_from(INSERTS) | st.binary(min_size=1, max_size=9)),
                                       min_size=1, max_size=4)):
            base[pos:pos] = frag
        return bytes(base)
    pos = draw(st.integers(0, len(base) - 1))
    frag = draw(st.binary(min_size=1, max_size=16))
    base[pos: pos + len(frag)] = frag
    return bytes(base)


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=hostile_bytes())
def test_fuzzed_pickles_load_or_raise_data_error(fuzz_dir: Path, blob: bytes) -> None:
    path = fuzz_dir / "f.pkl"
    path.write_bytes(blob)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, 10.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = load_dataset(path)
    except DataError as e:
        msg = str(e)
        assert msg.startswith(str(path)) and "\n" not in msg
    except _Hang:
        pytest.fail(f"load_dataset hung on {blob[:80]!r}...")
    else:
        assert isinstance(ds, MultimodalDataset)
        for name, split in ds.splits.items():
            split.validate(name)  # the loaders' invariants hold for whatever got through
            for m in split.modalities:
                assert np.isfinite(split.features[m]).all()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert not FUZZ_MARKER.exists(), "a fuzzed pickle executed code"


def test_fuzz_bases_are_valid_datasets(fuzz_dir: Path):
    # the corruptions start from files that do load (so "corrupted valid pickle" means that)
    for i, blob in enumerate(BASES):
        path = fuzz_dir / f"base{i}.pkl"
        path.write_bytes(blob)
        assert isinstance(load_dataset(path), MultimodalDataset)


# ------------------------------------------------------------------ hostile / broken checkpoints

def test_checkpoint_shapes_never_fall_back_to_a_real_build():
    """Shapes come from a meta-device build only: when that fails, the config is refused, not
    built for real (d_model = 10**9 got a 128 GB host's test process killed that way)."""
    from alignmamba.checkpoint import _expected_shapes

    devices = []

    def build(cfg):
        devices.append(torch.empty(0).device.type)
        raise RuntimeError("Storage size calculation overflowed")

    with pytest.raises(RuntimeError, match="overflowed"):
        _expected_shapes(None, build)
    assert devices == ["meta"]


def test_checkpoint_shapes_stop_counting_past_the_limit():
    """The meta build stops once it registers more parameters than the caller allows."""
    from alignmamba.checkpoint import CheckpointError, _expected_shapes

    built = []

    def build(n):
        layers = torch.nn.ModuleList()
        for _ in range(n):
            layers.append(torch.nn.Linear(2, 2))  # 2 parameters each
            built.append(1)
        return layers

    assert len(_expected_shapes(10, build, max_params=20)) == 20
    with pytest.raises(CheckpointError, match="registers more than 20 parameters"):
        _expected_shapes(10**6, build, max_params=20)
    assert len(built) == 10 + 10  # the second build stopped inside its 11th layer


def _copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _edit_config(ck: Path, fn) -> None:
    p = ck / "config.json"
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def _first_float32_offset(ck: Path) -> int:
    """File offset of the first value of a float32 tensor of model.safetensors."""
    blob = (ck / "model.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8: 8 + n])
    start = min(v["data_offsets"][0] for k, v in header.items()
                if k != "__metadata__" and v["dtype"] == "F32" and v["data_offsets"][1] > v["data_offsets"][0])
    return 8 + n + start


CKPT_CASES = {
    "config-not-json": (lambda ck: (ck / "config.json").write_text("{model: nope"), "config.json", "invalid JSON"),
    "config-binary": (lambda ck: (ck / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "config.json",
                      "invalid JSON"),
    "config-list": (lambda ck: (ck / "config.json").write_text("[1, 2]"), "config.json", "no 'model' section"),
    "config-unknown-key": (lambda ck: _edit_config(ck, lambda d: d["model"].update(evil=1)), "config.json",
                           "unknown key 'evil'"),
    "config-wrong-width": (lambda ck: _edit_config(ck, lambda d: d["model"]["input_dims"].update(audio=7)),
                           "model.safetensors", "config.json implies"),
    "config-bad-modality": (lambda ck: _edit_config(ck, lambda d: d["model"].update(
        modalities=["text", "audio", "smell"])), "config.json", "smell"),
    "config-wrong-type": (lambda ck: _edit_config(ck, lambda d: d["model"].update(d_model="wide")),
                          "config.json", "d_model"),
    "config-unknown-model": (lambda ck: _edit_config(ck, lambda d: d["model"].update(model="evil")),
                             "config.json", "unknown model 'evil'"),
    "config-huge": (lambda ck: _edit_config(ck, lambda d: d["model"].update(d_model=10**9)),
                    "config.json", "cannot be built"),
    "config-large": (lambda ck: _edit_config(ck, lambda d: d["model"].update(d_model=50_000)),
                     "model.safetensors", "config.json implies"),
    # a million layers: the meta build would take about an hour; it stops at the file's count
    "config-deep": (lambda ck: _edit_config(ck, lambda d: d["model"].update(n_layers=10**6)),
                    "config.json", "registers more than"),
    "weights-missing": (lambda ck: (ck / "model.safetensors").unlink(), "model.safetensors", "missing"),
    "weights-empty": (lambda ck: (ck / "model.safetensors").write_bytes(b""), "model.safetensors", "unreadable"),
    "weights-truncated": (lambda ck: (ck / "model.safetensors").write_bytes(
        (ck / "model.safetensors").read_bytes()[:-100]), "model.safetensors", "unreadable"),
    "weights-random": (lambda ck: (ck / "model.safetensors").write_bytes(os.urandom(4096)), "model.safetensors",
                       "unreadable"),
    "weights-pickle": (lambda ck: (ck / "model.safetensors").write_bytes(_reduce_p0("os", "system", "true")),
                       "model.safetensors", "unreadable"),
    "weights-header-garbage": (lambda ck: _patch(ck, 8, b"\x00{]\x07"), "model.safetensors", "unreadable"),
    "weights-nan": (lambda ck: _patch(ck, _first_float32_offset(ck), b"\x00\x00\xc0\x7f"), "model.safetensors",
                    "inf/NaN"),
    "weights-renamed-tensor": (lambda ck: _rename_tensor(ck), "model.safetensors", "tensor"),
}


def _patch(ck: Path, offset: int, data: bytes) -> None:
    b = bytearray((ck / "model.safetensors").read_bytes())
    b[offset: offset + len(data)] = data
    (ck / "model.safetensors").write_bytes(bytes(b))


def _rename_tensor(ck: Path) -> None:
    from safetensors.torch import load_file, save_file
    state = load_file(str(ck / "model.safetensors"))
    k = min(state)
    state["x" + k] = state.pop(k)
    save_file(state, str(ck / "model.safetensors"))


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_broken_checkpoints_are_one_line_errors(tmp_path, capsys, trained, case):
    mutate, culprit, needle = CKPT_CASES[case]
    ck = _copy_ckpt(trained["best"], tmp_path / "ck")
    mutate(ck)
    js = tmp_path / "m.json"
    t0 = time.perf_counter()
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", ck, "--data", trained["data"], "--json", js)
    assert_user_error(rc, err, str(ck / culprit), needle)
    assert time.perf_counter() - t0 < 20  # "config-huge"/"config-large" allocate nothing
    assert not js.exists()


def test_intact_checkpoint_copy_evaluates(tmp_path, capsys, trained):
    # the control for the cases above: the unmodified copy works
    ck = _copy_ckpt(trained["best"], tmp_path / "ck")
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", ck, "--data", trained["data"],
                         "--json", tmp_path / "m.json")
    assert rc == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["split"] == "test"


# ------------------------------------------------------------------ non-finite loss

def _nan_on_training_call(monkeypatch, which: int) -> None:
    """Make the ``which``-th training-step loss (1-based, counted over the run) NaN."""
    real = train_mod.task_loss
    calls = {"n": 0}

    def task_loss(pred, label, mcfg, loss):
        out = real(pred, label, mcfg, loss)
        if pred.requires_grad:  # a training step, not validation/test
            calls["n"] += 1
            if calls["n"] == which:
                return out * float("nan")
        return out

    monkeypatch.setattr(train_mod, "task_loss", task_loss)


def test_nonfinite_loss_stops_keeping_best(tmp_path, capsys, monkeypatch):
    _nan_on_training_call(monkeypatch, 6)  # 4 steps per epoch: epoch 2, step 2
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "train", "--out", out, "--epochs", "3", *TINY)
    assert rc == 0, err
    assert "seed 1111 epoch 2 step 2: non-finite loss (nan); stopping, best checkpoint kept" in stdout
    rec = json.loads((out / "metrics.json").read_text())["seeds"][0]
    assert rec["stop_reason"] == "nonfinite_loss" and rec["best_epoch"] == 1 and rec["epochs_run"] == 1
    best = json.loads((out / "seed_1111" / "best" / "config.json").read_text())
    assert best["epoch"] == 1
    assert np.isfinite(list(rec["test"].values())).all()


def test_nonfinite_loss_skip(tmp_path, capsys, monkeypatch):
    _nan_on_training_call(monkeypatch, 6)
    out = tmp_path / "run"
    rc, stdout, err = run_cli(capsys, "train", "--out", out, "--epochs", "2",
                              "--set", "train.on_nonfinite_loss=skip", *TINY)
    assert rc == 0, err
    assert "warning: seed 1111 epoch 2 step 2: non-finite loss (nan); step skipped" in stdout
    rec = json.loads((out / "metrics.json").read_text())["seeds"][0]
    assert rec["stop_reason"] == "max_epochs" and rec["epochs_run"] == 2


def test_nonfinite_loss_before_any_checkpoint(tmp_path, capsys, monkeypatch):
    _nan_on_training_call(monkeypatch, 1)
    rc, _, err = run_cli(capsys, "train", "--out", tmp_path / "run", "--epochs", "2", *TINY)
    assert_user_error(rc, err, "seed 1111", "no usable checkpoint")


# ------------------------------------------------------------------ durable outputs

def test_every_output_file_is_written_under_a_temporary_name(tmp_path, capsys, monkeypatch, trained):
    """No file inside the output directory is ever opened for writing under its final name."""
    import builtins
    out = tmp_path / "run"
    direct: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def final_name(p: Any) -> str | None:
        try:
            rel = Path(os.fspath(p)).resolve().relative_to(tmp_path.resolve())
        except (TypeError, ValueError):
            return None
        return None if any(part.startswith(".") for part in rel.parts) else str(rel)

    def spy_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and final_name(file):
            direct.append(final_name(file))
        return real_open(file, mode, *a, **k)

    def spy_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR) and final_name(path):
            direct.append(final_name(path))
        return real_os_open(path, flags, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    rc, _, err = run_cli(capsys, "train", "--out", out, "--epochs", "2", "--seeds", "1", *TINY)
    assert rc == 0, err
    best = out / "seed_1" / "best"
    rc, _, err = run_cli(capsys, "evaluate", "--checkpoint", best, "--json", tmp_path / "m.json")
    assert rc == 0, err
    rc, _, err = run_cli(capsys, "plot-plan", "--checkpoint", best, "--out", tmp_path / "p.png")
    assert rc == 0, err
    monkeypatch.undo()
    assert direct == []
    names = files_under(out)
    assert not [n for n in names if Path(n).name.startswith(".")], names  # no temporaries left
    for s in ("seed_1",):
        assert {"best/config.json", "best/model.safetensors", "last/config.json", "last/model.safetensors",
                f"last/{ts.STATE_JSON}", f"last/{ts.STATE_TENSORS}", "log.csv", "result.json",
                "test_predictions.csv"} <= {n[len(s) + 1:] for n in names if n.startswith(s + "/")}
    assert (tmp_path / "m.json").is_file() and (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    # no pickles anywhere: the training state is JSON + safetensors
    assert not [n for n in names if n.endswith((".pt", ".pth", ".pkl", ".bin"))]


def test_replace_dir_never_leaves_a_half_directory(tmp_path, monkeypatch):
    d = tmp_path / "ck"
    replace_dir(d, {"a": b"old-a", "b": b"old-b"})
    # killed while writing the new files: the old directory is untouched, the temporary removed
    real_open = open

    def failing_open(file, mode="r", *a, **k):
        if "w" in mode and Path(file).name == "b":
            raise KeyboardInterrupt
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(d, {"a": b"new-a", "b": b"new-b"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert (d / "a").read_bytes() == b"old-a" and (d / "b").read_bytes() == b"old-b"

    # killed between the two renames: the old one waits under .ck.old and is put back
    real_rename = os.rename
    calls = {"n": 0}

    def rename_then_die(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(d, {"a": b"new-a"})
    monkeypatch.undo()
    assert not d.exists() and (tmp_path / ".ck.old").is_dir()
    assert recover_dir(d) is True
    assert (d / "a").read_bytes() == b"old-a" and (d / "b").read_bytes() == b"old-b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    replace_dir(d, {"a": b"new-a"})
    assert sorted(p.name for p in d.iterdir()) == ["a"] and (d / "a").read_bytes() == b"new-a"


def test_state_codec_round_trip_and_refusals():
    from safetensors.torch import load, save

    from alignmamba.errors import CheckpointError
    obj = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(2, 3)}}, "groups": [{"betas": (0.9, 0.99)}],
           "inf": float("inf"), "nan": float("nan"), "np": np.arange(5, dtype=np.uint32), "py": (3, (1, 2), None),
           "__tuple__": 1}
    tensors: dict[str, torch.Tensor] = {}
    text = json.dumps(ts.encode_state(obj, tensors, "x"), allow_nan=False)
    back = ts.decode_state(json.loads(text), load(save(tensors)), "f")
    assert back["state"][0]["m"].equal(obj["state"][0]["m"]) and back["state"][0]["step"].item() == 3.0
    assert back["groups"][0]["betas"] == (0.9, 0.99) and back["py"] == (3, (1, 2), None)
    assert back["inf"] == float("inf") and np.isnan(back["nan"]) and back["__tuple__"] == 1
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == list(range(5))
    for bad in ({"__tensor__": "nope"}, {"__float__": "1e999"}, {"__ndarray__": [1], "dtype": "O"},
                {"__dict__": 3}, {"__tuple__": 3}):
        with pytest.raises(CheckpointError):
            ts.decode_state(bad, {}, "f")
    with pytest.raises(TypeError):
        ts.encode_state({"f": lambda: 0}, {}, "x")


# ------------------------------------------------------------------ resume

def _metrics(d: Path) -> dict[str, Any]:
    return json.loads((d / "metrics.json").read_text())


def _log_rows(d: Path) -> list[dict[str, str]]:
    with open(d / "log.csv") as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def assert_same_run(a: Path, b: Path, seeds=(1111,)) -> None:
    ma, mb = _metrics(a), _metrics(b)
    for key in ("test", "valid"):
        assert ma[key].keys() == mb[key].keys()
        for k in ma[key]:
            assert mb[key][k] == pytest.approx(ma[key][k], abs=1e-6, rel=1e-6, nan_ok=True), (key, k)
    for ra, rb in zip(ma["seeds"], mb["seeds"]):
        for k in ("seed", "best_epoch", "epochs_run", "stop_reason"):
            assert ra[k] == rb[k], k
        assert rb["test_loss"] == pytest.approx(ra["test_loss"], abs=1e-6)
    for s in seeds:
        ra, rb = _log_rows(a / f"seed_{s}"), _log_rows(b / f"seed_{s}")
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):  # every epoch's losses, not only the end: the path is the same
            for k in x:
                assert float(y[k]) == pytest.approx(float(x[k]), abs=1e-6, rel=1e-6, nan_ok=True), k


@pytest.fixture(scope="module")
def reference_3ep(tmp_path_factory) -> Path:
    """Uninterrupted 3-epoch run (seed 1111), the target of the resume tests."""
    out = tmp_path_factory.mktemp("ref") / "run"
    n = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--out", str(out), "--epochs", "3", *TINY]) == 0
    torch.set_num_threads(n)
    return out


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path, capsys, reference_3ep):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "alignmamba", "train", "--out", str(out), "--epochs", "3", *TINY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    state = out / "seed_1111" / "last" / ts.STATE_JSON
    try:
        deadline = time.monotonic() + 120
        while not state.exists():  # epoch 1 is saved ...
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        line = proc.stdout.readline()  # ... and its line printed: epoch 2 is under way
        assert b"epoch   1" in line, line
        time.sleep(0.15)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "metrics.json").exists()  # it really was killed before the end
    epoch_saved = json.loads(state.read_text())["loop"]["epoch"]
    assert epoch_saved in (1, 2)
    rc, stdout, err = run_cli(capsys, "train", "--resume", out)
    assert rc == 0, err
    assert f"seed 1111: resuming after epoch {epoch_saved}" in stdout
    assert_same_run(reference_3ep, out)


def _interrupt(monkeypatch, target: str, when) -> None:
    """Raise KeyboardInterrupt (the CLI's exit 130) instead of calling ``target`` when ``when(args)``."""
    mod, name = target.rsplit(".", 1)
    module = {"ts": ts, "train": train_mod}[mod]
    real = getattr(module, name)

    def wrapper(*a, **k):
        if when(a, k):
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("where", ["before-last", "before-commit", "before-result"])
def test_interrupt_at_each_commit_point_then_resume(tmp_path, capsys, monkeypatch, reference_3ep, where):
    out = tmp_path / "run"
    with monkeypatch.context() as mp:
        if where == "before-last":  # epoch 2 staged a best (or not), last/ still says epoch 1
            _interrupt(mp, "ts.save_last", lambda a, k: a[6]["epoch"] == 2)
        elif where == "before-commit":  # last/ names epoch 2 but .best.pending is not yet best/
            _interrupt(mp, "ts.commit_best", lambda a, k: True)
        else:  # all epochs done, the seed's record not yet written
            _interrupt(mp, "train._write_predictions", lambda a, k: True)
        rc, _, err = run_cli(capsys, "train", "--out", out, "--epochs", "3", *TINY)
        assert rc == 130, err
    assert not (out / "metrics.json").exists()
    rc, _, err = run_cli(capsys, "train", "--resume", out)
    assert rc == 0, err
    assert_same_run(reference_3ep, out)
    seed_dir = out / "seed_1111"
    assert json.loads((seed_dir / "best" / "config.json").read_text())["epoch"] == _metrics(out)["seeds"][0]["best_epoch"]
    assert not [p.name for p in seed_dir.iterdir() if p.name.startswith(".")]


def test_resume_skips_finished_seeds_and_ignores_an_older_run(tmp_path, capsys, monkeypatch):
    ref = tmp_path / "ref"
    args = ["--epochs", "1", "--seeds", "7", "8", "9", *TINY]
    rc, _, err = run_cli(capsys, "train", "--out", ref, *args)
    assert rc == 0, err
    out = tmp_path / "run"
    # an older, finished run with other settings sits in the directory ...
    rc, _, err = run_cli(capsys, "train", "--out", out, "--epochs", "1", "--seeds", "9", "--set", "optim.lr=0.05",
                         *TINY)
    assert rc == 0, err
    old_record = json.loads((out / "seed_9" / "result.json").read_text())
    # ... then a new run is interrupted in seed 8's first epoch, before it reached seed 9
    with monkeypatch.context() as mp:
        _interrupt(mp, "ts.reseed_epoch", lambda a, k: a[1] == 8)
        rc, _, err = run_cli(capsys, "train", "--out", out, *args)
        assert rc == 130, err
    assert (out / "seed_7" / "result.json").is_file()
    assert not (out / "seed_9" / "result.json").exists() and not (out / "seed_9" / "best").exists()
    trained_seeds = []
    real = train_mod.train_one_seed
    monkeypatch.setattr(train_mod, "train_one_seed", lambda cfg, ds, seed, *a, **k: (
        trained_seeds.append(seed), real(cfg, ds, seed, *a, **k))[1])
    rc, stdout, err = run_cli(capsys, "train", "--resume", out)
    assert rc == 0, err
    assert trained_seeds == [8, 9] and "seed 7: already finished" in stdout
    assert_same_run(ref, out, seeds=(7, 8, 9))
    assert _metrics(out)["seeds"][2]["test"] != old_record["test"]


def test_resume_errors_are_one_line(tmp_path, capsys, reference_3ep):
    rc, _, err = run_cli(capsys, "train", "--resume", reference_3ep, "--epochs", "5")
    assert_user_error(rc, err, "--resume", "takes no other options", "--epochs")
    rc, _, err = run_cli(capsys, "train", "--resume", reference_3ep, "--set", "optim.lr=1")
    assert_user_error(rc, err, "--set")
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path / "nope")
    assert_user_error(rc, err, "no such directory")
    rc, _, err = run_cli(capsys, "train", "--resume", tmp_path)
    assert_user_error(rc, err, str(tmp_path), "no config.json")

    def copy_run(name: str) -> Path:
        import shutil
        dst = tmp_path / name
        shutil.copytree(reference_3ep, dst)
        (dst / "seed_1111" / "result.json").unlink()  # unfinished: --resume reads last/
        return dst

    d = copy_run("changed")  # config.json edited since last/ was written
    cfg = json.loads((d / "config.json").read_text())
    cfg["optim"]["lr"] = 0.5
    (d / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_cli(capsys, "train", "--resume", d)
    assert_user_error(rc, err, str(d / "seed_1111" / "last" / "config.json"), "different experiment", "optim.lr")

    d = copy_run("bad-state")
    (d / "seed_1111" / "last" / ts.STATE_JSON).write_text("{not json")
    rc, _, err = run_cli(capsys, "train", "--resume", d)
    assert_user_error(rc, err, str(d / "seed_1111" / "last" / ts.STATE_JSON), "invalid JSON")

    d = copy_run("bad-tensors")
    (d / "seed_1111" / "last" / ts.STATE_TENSORS).write_bytes(b"\x00" * 10)
    rc, _, err = run_cli(capsys, "train", "--resume", d)
    assert_user_error(rc, err, str(d / "seed_1111" / "last" / ts.STATE_TENSORS), "unreadable")

    d = copy_run("bad-record")
    (d / "seed_1111" / "result.json").write_text('{"seed": 5}')
    rc, _, err = run_cli(capsys, "train", "--resume", d)
    assert_user_error(rc, err, str(d / "seed_1111" / "result.json"), "not the record of seed 1111")


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Outputs must be readable like any file the user creates (mkstemp alone gives 0600)."""
    import os
    import stat

    from alignmamba.checkpoint import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
