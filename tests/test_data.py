"""Loaders, restricted unpickler, dataset/collate (alignmamba.data)."""

from __future__ import annotations

import copy
import os
import pickle
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignmamba.data import (
    MultimodalSplit,
    SplitDataset,
    collate,
    detect_schema,
    inspect_report,
    labels_to_classes,
    load_dataset,
    load_mmsa,
    make_loader,
    make_synthetic,
    safe_load,
)
from alignmamba.errors import ConfigError, DataError

MODS = ("text", "audio", "vision")


def _dump(path: Path, obj: Any, protocol: int = 4) -> Path:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


def _tiny(aligned: bool = False, seed: int = 3) -> dict:
    return make_synthetic(like="mosi", aligned=aligned, seed=seed, n_train=10, n_valid=4, n_test=4)


# --------------------------------------------------------------------------- MMSA round trip


@pytest.mark.parametrize("aligned", [False, True])
def test_mmsa_round_trip(tmp_path: Path, aligned: bool) -> None:
    raw = _tiny(aligned)
    original = copy.deepcopy(raw)
    path = _dump(tmp_path / "mmsa.pkl", raw)
    ds = load_dataset(path)
    assert ds.schema == "mmsa" and ds.aligned is aligned and ds.source == str(path)
    assert ds.modalities == list(MODS)
    assert ds.input_dims == {"text": 768, "audio": 5, "vision": 20}
    assert ds.max_lengths == (
        {"text": 50, "audio": 50, "vision": 50}
        if aligned
        else {"text": 50, "audio": 375, "vision": 500}
    )
    n_inf = 0
    for name in ("train", "valid", "test"):
        s, r = ds[name], original[name]
        text_len = r["text_bert"][:, 1].sum(axis=1)
        expected = {"text": text_len}
        if aligned:
            expected.update(audio=text_len, vision=text_len)
        else:
            expected.update(
                audio=np.asarray(r["audio_lengths"]), vision=np.asarray(r["vision_lengths"])
            )
        np.testing.assert_array_equal(s.labels, r["regression_labels"])
        assert s.ids == list(r["id"]) and s.raw_text == list(r["raw_text"])
        np.testing.assert_array_equal(s.text_bert, r["text_bert"])
        for m in MODS:
            x = s.features[m]
            assert x.dtype == np.float32 and x.shape == r[m].shape
            np.testing.assert_array_equal(s.lengths[m], expected[m])
            mask = s.mask(m)
            # inside the true length: the stored values, -inf replaced by 0; beyond: exactly 0
            want = np.where(np.isfinite(r[m]), r[m], 0.0) * mask[..., None]
            np.testing.assert_array_equal(x, want)
            assert np.isfinite(x).all()
        n_inf += int(np.isinf(r["audio"]).sum())
        assert ds.sanitized.get(f"{name}/audio", 0) == int(np.isinf(r["audio"]).sum())
    assert n_inf > 0, "synthetic audio should contain -inf so that the sanitiser is exercised"
    assert ds.zero_lengths == {}


def test_float64_and_list_inputs_are_cast(tmp_path: Path) -> None:
    raw = _tiny(False)
    for split in raw.values():
        for m in MODS:
            split[m] = split[m].astype(np.float64)
        split["regression_labels"] = split["regression_labels"].astype(np.float64)[:, None]
        split["audio_lengths"] = np.asarray(split["audio_lengths"], dtype=np.float64)
        split["text_bert"] = split["text_bert"].astype(np.float64)
    ds = load_dataset(_dump(tmp_path / "f64.pkl", raw))
    s = ds["train"]
    for m in MODS:
        assert s.features[m].dtype == np.float32 and s.lengths[m].dtype == np.int64
    assert s.labels.dtype == np.float32 and s.labels.shape == (10,)
    assert s.text_bert.dtype == np.int64
    np.testing.assert_array_equal(
        s.lengths["audio"], raw["train"]["audio_lengths"].astype(np.int64)
    )
    np.testing.assert_allclose(
        s.features["vision"],
        raw["train"]["vision"].astype(np.float32) * s.mask("vision")[..., None],
    )


def test_load_mmsa_modifies_input_only_when_inplace() -> None:
    raw = _tiny(False)
    audio = raw["train"]["audio"]
    audio[0, 0, 0] = -np.inf
    ds = load_mmsa(raw, "in-memory")
    assert np.isneginf(audio[0, 0, 0]) and ds["train"].features["audio"][0, 0, 0] == 0.0
    ds = load_mmsa(raw, "in-memory", inplace=True)
    assert audio[0, 0, 0] == 0.0 and ds["train"].features["audio"] is audio


def test_text_length_without_text_bert_uses_nonzero_rows(tmp_path: Path) -> None:
    raw = _tiny(True)
    want = {s: raw[s]["text_bert"][:, 1].sum(axis=1) for s in raw}
    for split in raw.values():
        del split["text_bert"]
    ds = load_dataset(_dump(tmp_path / "nobert.pkl", raw))
    for s in raw:
        for m in MODS:
            np.testing.assert_array_equal(ds[s].lengths[m], want[s])
        assert ds[s].text_bert is None


def test_zero_length_becomes_one_with_counted_warning(tmp_path: Path) -> None:
    raw = _tiny(False)
    raw["train"]["vision_lengths"][2] = 0
    raw["train"]["vision_lengths"][5] = 0
    raw["test"]["audio_lengths"][0] = 0
    with pytest.warns(
        UserWarning, match="length 0 were given length 1.*test/audio: 1, train/vision: 2"
    ):
        ds = load_dataset(_dump(tmp_path / "zero.pkl", raw))
    assert ds.zero_lengths == {"train/vision": 2, "test/audio": 1}
    assert ds["train"].lengths["vision"][2] == 1 and ds["test"].lengths["audio"][0] == 1
    # the single remaining frame is zero padding, not the stored first frame
    assert not ds["train"].features["vision"][2].any()


# --------------------------------------------------------------------------- MulT


def _mult_dict(rng: np.random.Generator, aligned: bool) -> tuple[dict, dict]:
    """A MulT-schema dict with known true lengths (trailing zero rows) and the lengths."""
    t = (
        {"text": 50, "audio": 50, "vision": 50}
        if aligned
        else {"text": 50, "audio": 375, "vision": 500}
    )
    d = {"text": 300, "audio": 5, "vision": 20}
    obj, lengths = {}, {}
    for split, n in (("train", 7), ("valid", 3), ("test", 4)):
        feats, lens = {}, {}
        shared = rng.integers(1, 51, size=n)
        for m in MODS:
            ln = shared.copy() if aligned else rng.integers(1, t[m] + 1, size=n)
            x = rng.standard_normal((n, t[m], d[m]))
            x[np.arange(t[m])[None, :] >= ln[:, None]] = 0.0
            feats[m], lens[m] = x, ln
        if aligned:
            # a zero (out-of-vocabulary) GloVe word inside the sentence keeps its slot,
            # and a sentence whose last word has no GloVe vector is still that long
            feats["text"][0, 0] = 0.0
            feats["text"][1, shared[1] - 1] = 0.0
        feats["audio"][0, 0, 1] = -np.inf
        # a last frame that is -inf everywhere is a real frame, not padding
        if not aligned:
            feats["audio"][1, lens["audio"][1] - 1] = -np.inf
        labels = rng.uniform(-3, 3, size=(n, 1, 1))
        ids = np.array([[f"vid{i}", str(i)] for i in range(n)], dtype=object)
        obj[split] = {**feats, "labels": labels, "id": ids}
        lengths[split] = lens
    return obj, lengths


@pytest.mark.parametrize("aligned", [True, False])
def test_mult_round_trip(tmp_path: Path, aligned: bool) -> None:
    obj, lengths = _mult_dict(np.random.default_rng(1), aligned)
    original = copy.deepcopy(obj)
    ds = load_dataset(
        _dump(tmp_path / ("mosi_data.pkl" if aligned else "mosi_data_noalign.pkl"), obj, protocol=2)
    )
    assert ds.schema == "mult" and ds.aligned is aligned
    assert ds.input_dims == {"text": 300, "audio": 5, "vision": 20}
    for split in ("train", "valid", "test"):
        s = ds[split]
        for m in MODS:
            np.testing.assert_array_equal(s.lengths[m], lengths[split][m])
            want = np.where(np.isfinite(original[split][m]), original[split][m], 0.0).astype(
                np.float32
            )
            np.testing.assert_array_equal(s.features[m], want)
        np.testing.assert_allclose(
            s.labels, original[split]["labels"].reshape(-1).astype(np.float32)
        )
        assert s.ids[2] == "vid2$_$2"
        assert s.text_bert is None and s.raw_text is None
    assert ds.sanitized["train/audio"] == (1 if aligned else 1 + 5)


def test_mult_all_zero_sample_gets_length_one(tmp_path: Path) -> None:
    obj, _ = _mult_dict(np.random.default_rng(2), aligned=False)
    obj["valid"]["vision"][1] = 0.0
    with pytest.warns(UserWarning, match="valid/vision: 1"):
        ds = load_dataset(_dump(tmp_path / "zero.pkl", obj))
    assert ds["valid"].lengths["vision"][1] == 1 and ds.zero_lengths == {"valid/vision": 1}


# --------------------------------------------------------------------------- validation


def _set(split: str, key: str, fn: Callable[[Any], Any]) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        obj[split][key] = fn(obj[split][key])

    return mutate


def _del(split: str, key: str) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        del obj[split][key]

    return mutate


def _empty_valid(obj: dict) -> None:
    for key, value in list(obj["valid"].items()):
        obj["valid"][key] = value[:0]


def _nan_label(labels: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    labels[[1, 3]] = np.nan
    return labels


def _big_label(labels: np.ndarray) -> np.ndarray:
    labels = labels.copy()
    labels[0] = 3.5
    return labels


def _long(lengths: list) -> list:
    return [376] + lengths[1:]


def _neg(lengths: list) -> list:
    return [-1] + lengths[1:]


def _bad_mask(tb: np.ndarray) -> np.ndarray:
    tb = tb.copy()
    tb[0, 1, 3] = 2
    return tb


def _hole_mask(tb: np.ndarray) -> np.ndarray:
    tb = tb.copy()
    tb[0, 1, 3] = 0
    return tb


def _narrow_test_audio(obj: dict) -> None:
    obj["test"]["audio"] = obj["test"]["audio"][:, :, :4]


def _drop_valid(obj: dict) -> None:
    del obj["valid"]


def _valid_is_list(obj: dict) -> None:
    obj["valid"] = [1, 2]


def _unaligned_without_lengths(obj: dict) -> None:
    for split in obj.values():
        del split["audio_lengths"], split["vision_lengths"]


MMSA_CASES: dict[str, tuple[Callable[[dict], None], str]] = {
    "missing_split": (_drop_valid, "missing split 'valid'"),
    "split_not_dict": (_valid_is_list, "split 'valid' is a list"),
    "missing_key": (_del("train", "audio"), "missing key 'audio'"),
    "wrong_rank": (_set("train", "vision", lambda x: x[:, :, 0]), "'vision' must have rank 3"),
    "count_mismatch": (
        _set("valid", "vision", lambda x: x[:-1]),
        "'vision' has 3 samples but 'text' has 4",
    ),
    "label_count": (
        _set("test", "regression_labels", lambda y: y[:-1]),
        "has 3 samples but the features have 4",
    ),
    "length_too_long": (
        _set("train", "audio_lengths", _long),
        "audio lengths exceed the padded length 375",
    ),
    "length_negative": (_set("train", "vision_lengths", _neg), "vision lengths are negative"),
    "length_count": (
        _set("train", "audio_lengths", lambda v: v[:-1]),
        "'audio_lengths' must hold 10 lengths",
    ),
    "label_nan": (_set("train", "regression_labels", _nan_label), "2 of 10 labels are inf or NaN"),
    "label_range": (
        _set("train", "regression_labels", _big_label),
        "1 of 10 labels lie outside [-3, 3]",
    ),
    "label_shape": (
        _set("train", "regression_labels", lambda y: np.stack([y, y], 1)),
        "only one sentiment score",
    ),
    "empty_split": (_empty_valid, "split 'valid': split is empty"),
    "half_lengths": (
        _del("train", "vision_lengths"),
        "has 'audio_lengths' but no 'vision_lengths'",
    ),
    "aligned_shape": (_unaligned_without_lengths, "'audio' has 375 time steps and 'text' 50"),
    "bert_shape": (
        _set("train", "text_bert", lambda t: t[:, :2]),
        "'text_bert' must have shape (10, 3, 50)",
    ),
    "bert_mask_values": (
        _set("train", "text_bert", _bad_mask),
        "attention mask) must hold only 0 and 1",
    ),
    "bert_mask_hole": (_set("train", "text_bert", _hole_mask), "has a 1 after a 0"),
    "not_numeric": (_set("train", "audio", lambda x: x.astype(str)), "'audio' must be numeric"),
    "width_differs": (_narrow_test_audio, "audio width differs between splits"),
}


@pytest.mark.parametrize("case", sorted(MMSA_CASES))
def test_mmsa_validation_errors(tmp_path: Path, case: str) -> None:
    mutate, expected = MMSA_CASES[case]
    obj = _tiny(False)
    mutate(obj)
    path = _dump(tmp_path / f"bad_{case}.pkl", obj)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a refused file must not also warn
        with pytest.raises(DataError) as info:
            load_dataset(path)
    msg = str(info.value)
    assert msg.startswith(str(path) + ":") and "\n" not in msg
    assert expected in msg


def _bad_text(ids: np.ndarray) -> np.ndarray:
    # UCS4 data beyond U+10FFFF: numpy raises SystemError when an item becomes a str
    return np.frombuffer(b"\xff" * 4 * len(ids), dtype="U1").copy()


def test_ids_that_are_not_text(tmp_path: Path) -> None:
    for mutate, expected in (
        (_set("train", "id", _bad_text), "'id' holds entries that are not text (SystemError)"),
        (_set("train", "raw_text", lambda v: 7), "'raw_text' must be a sequence of 10 entries"),
        (_set("train", "id", lambda v: list(v)[:3]), "'id' has 3 entries but the split has 10"),
    ):
        obj = _tiny(False)
        mutate(obj)
        path = _dump(tmp_path / "ids.pkl", obj)
        with pytest.raises(DataError) as info:
            load_dataset(path)
        assert str(info.value).startswith(f"{path}: split 'train': ") and expected in str(
            info.value
        )


@pytest.mark.parametrize(
    "obj, expected",
    [
        ([1, 2, 3], "top level is a list"),
        ({"train": {"x": np.zeros(3)}, "valid": {}, "test": {}}, "unknown layout"),
    ],
)
def test_layout_errors(tmp_path: Path, obj: Any, expected: str) -> None:
    path = _dump(tmp_path / "layout.pkl", obj)
    with pytest.raises(DataError, match=expected) as info:
        load_dataset(path)
    assert str(info.value).startswith(str(path))


def test_mult_refuses_emotion_labels(tmp_path: Path) -> None:
    obj, _ = _mult_dict(np.random.default_rng(0), aligned=True)
    obj["train"]["labels"] = np.zeros((7, 4, 2))
    path = _dump(tmp_path / "iemocap_data.pkl", obj)
    with pytest.raises(
        DataError, match=r"'labels' has shape \(7, 4, 2\); only one sentiment score"
    ) as info:
        load_dataset(path)
    assert str(info.value).startswith(str(path))


def test_detect_schema() -> None:
    assert detect_schema({"train": {"regression_labels": 0}}, "f") == "mmsa"
    assert detect_schema({"test": {"labels": 0}}, "f") == "mult"
    with pytest.raises(DataError, match="f: unknown layout"):
        detect_schema({"train": {}}, "f")


# --------------------------------------------------------------------------- dataset / collate


def test_labels_to_classes_conventions() -> None:
    y = np.array([-3.0, -2.5, -1.5, -0.5, -0.2, 0.0, 0.2, 0.5, 1.5, 2.5, 3.0])
    np.testing.assert_array_equal(labels_to_classes(y, 2), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(labels_to_classes(y, 3), [0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2])
    # half to even: -2.5 -> -2, -1.5 -> -2, -0.5 -> 0, 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    np.testing.assert_array_equal(labels_to_classes(y, 7), [0, 1, 1, 3, 3, 3, 3, 3, 5, 5, 6])
    np.testing.assert_array_equal(labels_to_classes(y, 5), [0, 0, 0, 2, 2, 2, 2, 2, 4, 4, 4])
    with pytest.raises(ConfigError, match="num_classes=4"):
        labels_to_classes(y, 4)


def _split(rng: np.random.Generator, n: int = 6) -> MultimodalSplit:
    t, d = {"text": 9, "audio": 13, "vision": 11}, {"text": 4, "audio": 3, "vision": 2}
    feats, lens = {}, {}
    for m in MODS:
        ln = rng.integers(1, t[m] + 1, size=n).astype(np.int64)
        x = rng.standard_normal((n, t[m], d[m])).astype(np.float32)
        x[np.arange(t[m])[None, :] >= ln[:, None]] = 0.0
        feats[m], lens[m] = x, ln
    bert = rng.integers(0, 500, size=(n, 3, t["text"])).astype(np.int64)
    labels = rng.uniform(-3, 3, size=n).astype(np.float32)
    return MultimodalSplit(feats, lens, labels, [f"v$_${i}" for i in range(n)], text_bert=bert)


def test_collate_trims_and_masks() -> None:
    split = _split(np.random.default_rng(0))
    ds = SplitDataset(split)
    picks = [4, 1, 3]
    batch = collate([ds[i] for i in picks])
    assert batch["index"].tolist() == picks and batch["index"].dtype == torch.int64
    assert batch["label"].dtype == torch.float32
    torch.testing.assert_close(batch["label"], torch.from_numpy(split.labels[picks]))
    for m in MODS:
        lens = split.lengths[m][picks]
        x, mask = batch["features"][m], batch["masks"][m]
        assert x.shape == (3, lens.max(), split.features[m].shape[2]) and x.dtype == torch.float32
        assert mask.dtype == torch.bool and mask.sum(1).tolist() == lens.tolist()
        np.testing.assert_array_equal(x.numpy(), split.features[m][picks, : lens.max()])
    t_text = int(split.lengths["text"][picks].max())
    np.testing.assert_array_equal(batch["text_bert"].numpy(), split.text_bert[picks, :, :t_text])


def test_classification_targets_and_loader_determinism() -> None:
    split = _split(np.random.default_rng(1), n=20)
    cls = SplitDataset(split, task="classification", num_classes=7)
    batch = collate([cls[i] for i in range(5)])
    assert batch["label"].dtype == torch.int64
    np.testing.assert_array_equal(batch["label"].numpy(), labels_to_classes(split.labels[:5], 7))

    def order(seed: int) -> list[int]:
        return torch.cat([b["index"] for b in make_loader(split, 4, True, seed)]).tolist()

    assert order(3) == order(3) and sorted(order(3)) == list(range(20))
    assert order(3) != order(4)
    loader = make_loader(split, 8, False, 0, drop_last=True)
    assert [len(b["index"]) for b in loader] == [8, 8]
    with pytest.raises(ConfigError, match="either shuffle=True or a sampler"):
        make_loader(split, 4, True, 0, sampler=[0, 1])
    with pytest.raises(ConfigError, match="task='ranking'"):
        SplitDataset(split, task="ranking")
    with pytest.raises(ConfigError, match="num_classes=None"):
        SplitDataset(split, task="classification")


def test_loader_over_loaded_file(tiny_mmsa_path: Path) -> None:
    ds = load_dataset(tiny_mmsa_path)
    seen = []
    for batch in make_loader(ds["train"], 5, True, 0):
        for m in MODS:
            lens = batch["masks"][m].sum(1)
            assert int(lens.max()) == batch["features"][m].shape[1]
            # padding positions are exactly zero
            assert not batch["features"][m][~batch["masks"][m]].any()
        seen += batch["index"].tolist()
    assert sorted(seen) == list(range(24))


# --------------------------------------------------------------------------- restricted unpickler


def _system_payload(command: str, protocol: int) -> bytes:
    if protocol == 0:  # GLOBAL + REDUCE
        return b"cos\nsystem\n(V" + command.encode() + b"\ntR."
    if protocol == 1:  # INST opcode
        return b"(S'" + command.encode() + b"'\nios\nsystem\n."

    # protocol 4: STACK_GLOBAL inside an otherwise legitimate dict of arrays
    class Payload:
        def __reduce__(self) -> tuple:
            return (os.system, (command,))

    return pickle.dumps({"train": {"text": np.zeros((2, 3))}, "x": Payload()}, protocol=4)


@pytest.mark.parametrize("protocol", [0, 1, 4])
def test_refuses_os_system(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / f"marker{protocol}"
    payload = _system_payload(f"touch {shlex.quote(str(marker))}", protocol)
    path = tmp_path / "evil.pkl"
    path.write_bytes(payload)
    with pytest.raises(DataError) as info:
        safe_load(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: refused to load global '")
    assert (
        "'os.system'" in msg or "'posix.system'" in msg
    ) and "numpy arrays and plain containers" in msg
    assert not marker.exists()
    if sys.platform != "win32":
        # the payload is live: the stock unpickler does run it
        pickle.loads(payload)
        assert marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("builtins", "eval"),
        ("builtins", "exec"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("__builtin__", "eval"),
        ("subprocess", "Popen"),
        ("numpy", "load"),
        ("numpy.lib.npyio", "load"),
        ("torch", "load"),
        ("collections", "OrderedDict"),
        ("this", "s"),
    ],
)
def test_refuses_other_globals_without_importing(tmp_path: Path, module: str, name: str) -> None:
    imported_before = module in sys.modules
    path = tmp_path / "g.pkl"
    path.write_bytes(b"c" + module.encode() + b"\n" + name.encode() + b"\n(V1+1\ntR.")
    with pytest.raises(DataError, match=rf"refused to load global '{module}\.{name}'"):
        safe_load(path)
    assert (module in sys.modules) == imported_before


def test_refuses_hostile_use_of_allowed_names(tmp_path: Path) -> None:
    # numpy.ndarray called directly (would allocate from the shape), bytearray(int), _codecs.encode
    # with another codec: all refused before they run.
    payloads = [
        b"cnumpy\nndarray\n(I100000000000\ntR.",
        b"cbuiltins\nbytearray\n(I100000000000\ntR.",
        b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(I100000000000\ntC\x01btR.",
        b"c_codecs\nencode\n(Vabc\nVrot13\ntR.",
    ]
    for i, payload in enumerate(payloads):
        path = tmp_path / f"h{i}.pkl"
        path.write_bytes(payload)
        with pytest.raises(DataError, match="not a readable pickle") as info:
            safe_load(path)
        assert str(info.value).startswith(str(path))


_CRASH_SCRIPT = r"""
import pickle, sys
import numpy as np
from numpy._core.multiarray import _reconstruct
from alignmamba.data.safe_pickle import safe_load
from alignmamba.errors import DataError

class Array:  # numpy's own reduce, with a state numpy trusts blindly
    def __init__(self, dtype, data, shape=(2,)):
        self.args = (dtype, data, shape)
    def __reduce__(self):
        dtype, data, shape = self.args
        return (_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, False, data))

class Dtype:
    def __init__(self, state):
        self.state = state
    def __reduce__(self):
        return (np.dtype, ("V8", False, True), self.state)

f8 = np.dtype("f8")
payloads = {
    # ndarray.__setstate__ segfaults on an object array with too few items
    "short_object_list": Array(np.dtype(object), [1]),
    "object_from_bytes": Array(np.dtype(object), b"A" * 16),
    # dtype.__setstate__ accepts a field beyond the item size (out-of-bounds reads)
    "field_out_of_bounds": Array(Dtype((3, "|", None, ("a",), {"a": (f8, 100)}, 8, 1, 0)), b"0" * 8, (1,)),
    # ... and a subarray far larger than the item size (segfault on access)
    "subarray_lie": Array(Dtype((3, "|", (f8, (10**9,)), None, None, 8, 1, 0)), b"0" * 8, (1,)),
    "object_flag_lie": Array(Dtype((3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0)), [1], (1,)),
    "data_too_short": Array(f8, b"0" * 8),
}
for name, payload in payloads.items():
    path = sys.argv[1] + "/" + name + ".pkl"
    with open(path, "wb") as f:
        pickle.dump({"train": {"audio": payload}}, f, protocol=2)
    try:
        safe_load(path)
    except DataError as exc:
        assert str(exc).startswith(path + ": not a readable pickle"), str(exc)
        print("refused", name)
    else:
        print("LOADED", name)
"""


def test_refuses_states_that_crash_or_mislead_numpy(tmp_path: Path) -> None:
    # In a child process: were a guard to regress, a segfault must not take the suite down.
    result = subprocess.run(
        [sys.executable, "-c", _CRASH_SCRIPT, str(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [
        w
        for name in (
            "short_object_list",
            "object_from_bytes",
            "field_out_of_bounds",
            "subarray_lie",
            "object_flag_lie",
            "data_too_short",
        )
        for w in ("refused", name)
    ]


def test_refuses_shared_reference_memory_bomb(tmp_path: Path) -> None:
    # 40 levels, each a list holding the previous level twice: a few hundred bytes on disk
    # (pickle memoises shared objects), 2**40 strings once flattened by a loader
    bomb: Any = "ab"
    for _ in range(40):
        bomb = [bomb, bomb]
    obj = _tiny(False)
    obj["train"]["raw_text"] = [bomb] * 10
    path = _dump(tmp_path / "bomb.pkl", obj)
    with pytest.raises(DataError, match="shared references expand to more than") as info:
        safe_load(path)
    assert str(info.value).startswith(f"{path}: ")
    # the same values without sharing are fine: the bound is relative to the file size
    obj["train"]["raw_text"] = [f"sentence {i}" for i in range(10)]
    assert safe_load(_dump(tmp_path / "fine.pkl", obj))["train"]["raw_text"][3] == "sentence 3"


def test_refuses_structured_dtypes(tmp_path: Path) -> None:
    path = _dump(tmp_path / "rec.pkl", {"x": np.zeros(2, dtype=[("a", "f4"), ("b", "i8")])})
    with pytest.raises(DataError, match="only plain dtypes"):
        safe_load(path)


def test_guards_are_replaced_by_plain_numpy_objects(tmp_path: Path) -> None:
    arr = np.arange(6.0).reshape(2, 3)
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.arange(2), np.arange(3.0)
    loop: list = [1]
    loop.append(loop)
    obj = {
        "a": arr,
        "b": arr,
        "ragged": ragged,
        "dt": np.dtype(">i4"),
        np.dtype("f2"): "key",
        "loop": loop,
    }
    for protocol in (2, 4, 5):
        out = safe_load(_dump(tmp_path / f"p{protocol}.pkl", obj, protocol=protocol))
        assert type(out["a"]) is np.ndarray and out["a"] is out["b"] and out["a"].flags.writeable
        np.testing.assert_array_equal(out["a"], arr)
        assert type(out["ragged"]) is np.ndarray and out["ragged"].dtype == object
        assert [type(x) for x in out["ragged"]] == [np.ndarray, np.ndarray]
        np.testing.assert_array_equal(out["ragged"][1], np.arange(3.0))
        assert type(out["dt"]) is type(np.dtype(">i4")) and out["dt"] == np.dtype(">i4")
        assert out[np.dtype("f2")] == "key"
        assert out["loop"][1] is out["loop"]
        # the result pickles again with no trace of the guards
        again = pickle.dumps(out, protocol=4)
        assert b"alignmamba" not in again


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_content_round_trips_every_protocol(tmp_path: Path, protocol: int) -> None:
    rng = np.random.default_rng(protocol)
    obj = {
        "f32": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "f64_fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "i64": np.arange(5),
        "strs": np.array(["a$_$1", "b$_$2"], dtype=object),
        "ustr": np.array(["xy", "z"]),
        "scalar": np.float64(2.5),
        "containers": [
            (1, 2.0, None, True),
            {"k": "v"},
            {1, 2},
            frozenset({3}),
            b"",
            b"ab",
            bytearray(b"c"),
        ],
    }
    loaded = safe_load(_dump(tmp_path / "ok.pkl", obj, protocol=protocol))
    for key in ("f32", "f64_fortran", "i64", "strs", "ustr"):
        assert loaded[key].dtype == obj[key].dtype
        np.testing.assert_array_equal(loaded[key], obj[key])
    assert loaded["scalar"] == 2.5 and type(loaded["scalar"]) is np.float64
    assert loaded["containers"] == obj["containers"]


def test_file_errors(tmp_path: Path) -> None:
    valid = pickle.dumps({"a": np.arange(10.0)}, protocol=4)
    cases = {
        "missing.pkl": (None, "no such file"),
        "empty.pkl": (b"", "empty file"),
        "truncated.pkl": (valid[: len(valid) // 2], "not a readable pickle"),
        "text.pkl": (b"hello, this is not a pickle\n", "not a readable pickle"),
    }
    for name, (content, expected) in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(DataError) as info:
            load_dataset(path)
        msg = str(info.value)
        assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg
    with pytest.raises(DataError, match="is a directory"):
        safe_load(tmp_path)


def _corpus() -> list[bytes]:
    obj = {
        "train": {
            "x": np.arange(12, dtype=np.float32).reshape(3, 4),
            "id": np.array(["a", "b"], dtype=object),
            "l": [1, 2.5, "s", (None, True)],
            "s": np.int64(7),
        }
    }
    return [pickle.dumps(obj, protocol=p) for p in range(6)]


_CORPUS = _corpus()
_FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _only_data_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.pkl"  # rewritten by every example
    path.write_bytes(content)
    try:
        safe_load(path)
    except DataError as exc:
        assert str(exc).startswith(str(path)) and "\n" not in str(exc)


@_FUZZ
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_raise_only_data_error(tmp_path: Path, content: bytes) -> None:
    _only_data_errors(tmp_path, content)


@_FUZZ
@given(
    st.integers(0, len(_CORPUS) - 1),
    st.integers(0, 10_000),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_truncated_and_corrupted_pickles_raise_only_data_error(
    tmp_path: Path, which: int, cut: int, flips: list
) -> None:
    data = bytearray(_CORPUS[which])
    for pos, value in flips:
        data[pos % len(data)] = value
    _only_data_errors(tmp_path, bytes(data[: cut % (len(data) + 1)]))


def test_every_truncation_of_a_valid_pickle_is_a_data_error(tmp_path: Path) -> None:
    data = _CORPUS[4]
    path = tmp_path / "cut.pkl"
    for cut in range(len(data)):  # the full pickle minus at least its STOP opcode
        path.write_bytes(data[:cut])
        with pytest.raises(DataError):
            safe_load(path)


# --------------------------------------------------------------------------- inspect


def test_inspect_report(tmp_path: Path) -> None:
    raw = _tiny(False)
    raw["train"]["vision_lengths"][0] = 0
    raw["test"]["id"][0] = raw["train"]["id"][0]
    raw["train"]["vision"] = raw["train"]["vision"].astype(np.float64)
    path = _dump(tmp_path / "unaligned_50.pkl", raw)
    report = inspect_report(path)
    n_inf = int(np.isinf(raw["train"]["audio"]).sum())
    assert f"file: {path}" in report
    assert "schema: MMSA, unaligned" in report
    assert re.search(r"\n  vision +\(10, 500, 20\) +float64\n", report)
    assert "train: 10 samples" in report and "valid: 4 samples" in report
    assert f"train/audio: {n_inf} inf/NaN values" in report or n_inf == 0
    assert "train/vision: 1 samples of length 0" in report
    assert "test: 1 ids also occur in split 'train'" in report
    y = raw["train"]["regression_labels"]
    assert f"min {y.min():.4g}  mean {y.mean():.4g}" in report

    raw["valid"]["regression_labels"][0] = 9.0
    bad = inspect_report(_dump(tmp_path / "bad.pkl", raw))
    assert bad.splitlines()[-1].startswith("PROBLEM: ") and "outside [-3, 3]" in bad
    with pytest.raises(DataError, match="no such file"):
        inspect_report(tmp_path / "nope.pkl")


def test_inspect_report_clean_file(tiny_mmsa_aligned_path: Path) -> None:
    report = inspect_report(tiny_mmsa_aligned_path)
    assert "schema: MMSA, aligned" in report
    # only the deliberate -inf dirt is reported
    findings = report.split("suspicious:")[1].strip().splitlines()
    assert findings and all("inf/NaN values" in f for f in findings)


def test_safe_load_reads_from_any_pathlike(tmp_path: Path) -> None:
    path = _dump(tmp_path / "p.pkl", {"a": 1})
    assert safe_load(str(path)) == {"a": 1} and safe_load(path) == {"a": 1}
