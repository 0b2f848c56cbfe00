"""Synthetic MMSA-schema data (alignmamba.data.synthetic): schema, determinism, and that the
labels really depend on which word each audio/video cue co-occurs with."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from alignmamba.data import load_dataset, make_synthetic, write_synthetic
from alignmamba.data import synthetic as S
from alignmamba.errors import ConfigError, DataError

SMALL = {"n_train": 12, "n_valid": 5, "n_test": 6}


@pytest.mark.parametrize(
    "like, aligned, t_a, d_a, t_v, d_v",
    [
        ("mosi", False, 375, 5, 500, 20),
        ("mosi", True, 50, 5, 50, 20),
        ("mosei", False, 500, 74, 500, 35),
    ],
)
def test_schema_and_shapes(
    like: str, aligned: bool, t_a: int, d_a: int, t_v: int, d_v: int
) -> None:
    data = make_synthetic(like=like, aligned=aligned, seed=1, **SMALL)
    assert list(data) == ["train", "valid", "test"]
    for split, n in zip(data, SMALL.values()):
        d = data[split]
        keys = {
            "text",
            "text_bert",
            "audio",
            "vision",
            "regression_labels",
            "classification_labels",
            "annotations",
            "raw_text",
            "id",
        }
        assert set(d) == (keys if aligned else keys | {"audio_lengths", "vision_lengths"})
        assert d["text"].shape == (n, 50, 768) and d["text"].dtype == np.float32
        assert d["text_bert"].shape == (n, 3, 50) and d["text_bert"].dtype == np.int64
        assert d["audio"].shape == (n, t_a, d_a) and d["audio"].dtype == np.float32
        assert d["vision"].shape == (n, t_v, d_v) and d["vision"].dtype == np.float32
        assert d["regression_labels"].shape == (n,) and d["regression_labels"].dtype == np.float32
        assert len(d["raw_text"]) == len(d["id"]) == len(d["annotations"]) == n
        assert all(i.count("$_$") == 1 for i in d["id"]) and len(set(d["id"])) == n
        # roughly unit-scale features
        for m in ("text", "audio", "vision"):
            x = d[m][np.isfinite(d[m])]
            assert 0.3 < float(np.sqrt(np.mean(x[x != 0] ** 2))) < 3.0


def test_default_split_sizes() -> None:
    data = make_synthetic(like="mosi", n_train=2)
    assert [len(data[s]["id"]) for s in data] == [2, 229, 686]
    assert S.SHAPES["mosi"][2] == (1284, 229, 686) and S.SHAPES["mosei"][2] == (16326, 1871, 4659)
    with pytest.raises(ConfigError, match="n_valid=0"):
        make_synthetic(n_valid=0)
    with pytest.raises(ConfigError, match="like='iemocap'"):
        make_synthetic(like="iemocap")
    with pytest.raises(ConfigError, match="seed=-1"):
        make_synthetic(seed=-1)


def test_text_tokens_are_consistent() -> None:
    d = make_synthetic(seed=4, **SMALL)["train"]
    bert, text = d["text_bert"], d["text"]
    for i, sentence in enumerate(d["raw_text"]):
        words = sentence.split(" ")
        n = len(words)
        assert S.MIN_WORDS <= n <= S.MAX_WORDS
        ids = bert[i, 0]
        assert ids[0] == S.CLS_ID and ids[n + 1] == S.SEP_ID and not ids[n + 2 :].any()
        assert [S.VOCAB[t - S.WORD_ID_OFFSET] for t in ids[1 : n + 1]] == words
        assert bert[i, 1].tolist() == [1] * (n + 2) + [0] * (48 - n)
        assert not bert[i, 2].any()
        assert text[i, : n + 2].any(axis=1).all() and not text[i, n + 2 :].any()
        # the same word type has (nearly) the same text feature, another type does not
        emb = text[i, 1 : n + 1] / np.linalg.norm(text[i, 1 : n + 1], axis=1, keepdims=True)
        cos = emb @ emb.T
        same_type = np.array(words)[:, None] == np.array(words)[None, :]
        off_diagonal = ~np.eye(n, dtype=bool)
        assert (cos[same_type & off_diagonal] > 0.9).all()
        assert (np.abs(cos[~same_type]) < 0.3).all()


def test_frames_zero_beyond_lengths_and_neg_inf_inside() -> None:
    d = make_synthetic(seed=2, n_train=200, n_valid=1, n_test=1)["train"]
    for m in ("audio", "vision"):
        lengths = np.asarray(d[f"{m}_lengths"])
        t = d[m].shape[1]
        assert lengths.min() >= S.MIN_WORDS and lengths.max() <= t
        beyond = np.arange(t)[None, :] >= lengths[:, None]
        assert not d[m][beyond].any()
        assert d[m][~beyond].any(axis=-1).all()
    inf_rows, inf_frames, _ = np.nonzero(np.isinf(d["audio"]))
    assert inf_rows.size > 10 and np.isneginf(d["audio"][np.isinf(d["audio"])]).all()
    assert (inf_frames < np.asarray(d["audio_lengths"])[inf_rows]).all()
    assert not np.isinf(d["vision"]).any() and not np.isinf(d["text"]).any()


def test_deterministic_per_seed() -> None:
    a = make_synthetic(seed=7, **SMALL)
    b = make_synthetic(seed=7, **SMALL)
    c = make_synthetic(seed=8, **SMALL)
    for split in a:
        for key in ("text", "audio", "vision", "text_bert", "regression_labels"):
            np.testing.assert_array_equal(a[split][key], b[split][key])
        assert a[split]["audio_lengths"] == b[split]["audio_lengths"]
        assert list(a[split]["raw_text"]) == list(b[split]["raw_text"])
        assert not np.array_equal(a[split]["text"], c[split]["text"])
    # each split has its own stream: a larger train split leaves valid/test unchanged
    bigger = make_synthetic(seed=7, n_train=20, n_valid=5, n_test=6)
    np.testing.assert_array_equal(bigger["valid"]["vision"], a["valid"]["vision"])
    # MOSI- and MOSEI-like files with one seed are different samples
    mosei = make_synthetic(like="mosei", seed=7, **SMALL)
    assert list(mosei["train"]["raw_text"]) != list(a["train"]["raw_text"])


def test_label_distribution_is_mosi_like() -> None:
    lat = S.sample_latents(np.random.default_rng(0), 20000)
    y = S.latent_labels(lat)
    assert y.dtype == np.float32 and y.min() >= -3 and y.max() <= 3
    np.testing.assert_allclose(y * 5, np.round(y * 5), atol=1e-4)  # multiples of 0.2
    assert 1.3 < y.std() < 1.7
    assert 0.4 < np.mean(y > 0) < 0.55 and 0.4 < np.mean(y < 0) < 0.55
    assert 0.02 < np.mean(y == 0) < 0.1
    assert np.mean(np.abs(y) == 3) < 0.15
    d = make_synthetic(seed=0, n_train=300, n_valid=1, n_test=1)["train"]
    yd = d["regression_labels"]
    assert 1.2 < yd.std() < 1.8
    np.testing.assert_array_equal(d["classification_labels"], np.sign(yd) + 1)
    assert [a for a, v in zip(d["annotations"], yd) if v == 0] == ["Neutral"] * int(np.sum(yd == 0))


def _swap_emphasis(lat: S.Latents) -> tuple[S.Latents, np.ndarray, np.ndarray, np.ndarray]:
    """Per sample, move one video cue from a polar word to an uncued neutral word."""
    pol = np.where(lat.tokens >= 0, S._POLARITY[np.maximum(lat.tokens, 0)], 0.0)
    emphasis = lat.emphasis.copy()
    rows, src, dst = [], [], []
    for i in range(lat.tokens.shape[0]):
        cued_polar = np.flatnonzero(emphasis[i] & (pol[i] != 0))
        free_neutral = np.flatnonzero(~emphasis[i] & (pol[i] == 0) & (lat.tokens[i] >= 0))
        if cued_polar.size and free_neutral.size:
            emphasis[i, cued_polar[0]] = False
            emphasis[i, free_neutral[-1]] = True
            rows.append(i), src.append(cued_polar[0]), dst.append(free_neutral[-1])
    moved = S.Latents(lat.tokens, lat.n_words, lat.hesitation, emphasis, lat.noise)
    return moved, np.array(rows), np.array(src), np.array(dst)


def test_label_changes_when_the_video_cue_moves_to_another_word() -> None:
    lat = S.sample_latents(np.random.default_rng(3), 150)
    moved, rows, src, dst = _swap_emphasis(lat)
    assert rows.size > 50
    # the multiset of cues in each stream and the text are unchanged ...
    np.testing.assert_array_equal(moved.emphasis.sum(1), lat.emphasis.sum(1))
    y0, y1 = S.latent_labels(lat), S.latent_labels(moved)
    # ... yet the label moves by LABEL_SCALE * |contribution| of the polar word (up to clipping)
    contrib = S.word_contributions(lat)[rows, src]
    raw_shift = S.LABEL_SCALE * contrib / 2.0  # the word loses its doubling
    expected = np.clip(
        np.round(
            (S.LABEL_SCALE * S.word_contributions(lat).sum(1)[rows] - raw_shift + lat.noise[rows])
            * 5
        )
        / 5,
        -3,
        3,
    )
    np.testing.assert_allclose(y1[rows], expected, atol=1e-6)
    assert np.mean(y0[rows] != y1[rows]) > 0.85
    untouched = np.setdiff1d(np.arange(150), rows)
    np.testing.assert_array_equal(y0[untouched], y1[untouched])

    # At the feature level only the vision frames of the two words involved change.
    (out0, frames0), (out1, frames1) = (
        S.render_split(np.random.default_rng(9), x, "mosi", False) for x in (lat, moved)
    )
    np.testing.assert_array_equal(out0["text"], out1["text"])
    np.testing.assert_array_equal(out0["audio"], out1["audio"])
    np.testing.assert_array_equal(frames0["vision"], frames1["vision"])
    changed = (out0["vision"] != out1["vision"]).any(axis=-1)  # (N, T_v)
    fw = frames0["vision"]
    in_spans = np.zeros_like(changed)
    in_spans[rows] = (fw[rows] == src[:, None]) | (fw[rows] == dst[:, None])
    np.testing.assert_array_equal(changed, in_spans)
    # and the cue pattern really moved: the mean frame difference in the source span is the cue
    i = rows[0]
    diff = (out0["vision"][i] - out1["vision"][i])[fw[i] == src[0]]
    np.testing.assert_allclose(
        diff, np.broadcast_to(S.CUE_AMP * S._tables(5, 20)["vision_cue"], diff.shape), atol=1e-5
    )


def _r2(features: np.ndarray, y: np.ndarray) -> float:
    x = np.column_stack([np.ones(len(y)), features])
    beta, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(1 - np.var(y - x @ beta) / np.var(y))


def test_alignment_explains_what_unaligned_summaries_cannot() -> None:
    lat = S.sample_latents(np.random.default_rng(11), 20000)
    y = S.latent_labels(lat).astype(np.float64)
    aligned_sum = S.word_contributions(lat).sum(1)
    no_cues = S.Latents(
        lat.tokens, lat.n_words, np.zeros_like(lat.hesitation), np.zeros_like(lat.emphasis), lat.noise
    )
    text_sum = S.word_contributions(no_cues).sum(1)
    n_hes, n_emph, n = lat.hesitation.sum(1), lat.emphasis.sum(1), lat.n_words
    unaligned = np.column_stack(
        [
            text_sum,
            n_hes,
            n_emph,
            n,
            text_sum * n_hes / n,
            text_sum * n_emph / n,
            text_sum * n_hes * n_emph / n**2,
            text_sum * (1 - (1 - S.HESITATION_FACTOR) * n_hes / n) * (1 + n_emph / n),
        ]
    )
    r2_aligned, r2_unaligned = _r2(aligned_sum[:, None], y), _r2(unaligned, y)
    # The text decides most signs by design (README), so unaligned summaries explain much of
    # the variance; what they leave unexplained is several times what alignment leaves.
    assert r2_aligned > 0.9
    assert (1 - r2_unaligned) > 2.5 * (1 - r2_aligned)
    assert (1 - _r2(text_sum[:, None], y)) > 2.5 * (1 - r2_aligned)


@pytest.mark.parametrize(
    "like, modality, floor",
    [("mosi", "vision", 0.6), ("mosi", "audio", 0.25), ("mosei", "audio", 0.9)],
)
def test_frames_echo_the_spoken_word(like: str, modality: str, floor: float) -> None:
    """Scoring a frame against the (projected) words of its sentence finds the spoken word
    far above chance, which is what a cosine OT plan needs."""
    lat = S.sample_latents(np.random.default_rng(5), 60)
    out, frames = S.render_split(np.random.default_rng(6), lat, like, aligned=False)
    (_, d_a), (_, d_v), _ = S.SHAPES[like]
    echo = S._tables(d_a, d_v)[f"{modality}_echo"]
    x = np.where(np.isfinite(out[modality]), out[modality], 0.0)
    hits = total = 0
    chance = 0.0
    for i in range(60):
        words = lat.tokens[i, : lat.n_words[i]]
        types = np.unique(words)
        t = np.flatnonzero(frames[modality][i] >= 0)
        truth = words[frames[modality][i][t]]
        pred = types[np.argmax(x[i, t] @ echo[types].T, axis=1)]
        hits += int((pred == truth).sum())
        total += t.size
        chance += t.size / types.size
    assert chance / total < 0.1
    assert hits / total > floor


def test_aligned_frames_sit_on_word_positions() -> None:
    lat = S.sample_latents(np.random.default_rng(2), 30)
    out, frames = S.render_split(np.random.default_rng(3), lat, "mosi", aligned=True)
    for m in ("audio", "vision"):
        fw = frames[m]
        for i in range(30):
            n = lat.n_words[i]
            assert (
                fw[i, 0] == -1
                and fw[i, 1 : n + 1].tolist() == list(range(n))
                and (fw[i, n + 1 :] == -1).all()
            )
            x = np.where(np.isfinite(out[m][i]), out[m][i], 1.0)
            assert x[1 : n + 1].any(axis=1).all() and not x[0].any() and not x[n + 1 :].any()


def test_write_synthetic_is_atomic_and_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "syn.pkl"
    assert write_synthetic(target, like="mosi", aligned=True, seed=0, **SMALL) == target
    assert [p.name for p in tmp_path.iterdir()] == ["syn.pkl"]
    ds = load_dataset(target)
    assert ds.aligned and len(ds["train"]) == 12

    def broken_dump(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(pickle, "dump", broken_dump)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic(tmp_path / "other.pkl", seed=0, **SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["syn.pkl"]  # no partial file, no temp left
    with pytest.raises(DataError, match="does not exist"):
        write_synthetic(tmp_path / "missing" / "x.pkl", seed=0, **SMALL)
