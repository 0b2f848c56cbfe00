"""MOSI/MOSEI-shaped synthetic data in the exact MMSA pickle schema, where alignment matters.

Real features cannot be downloaded here, so this generator stands in for them. It keeps
the file layout, shapes, dtypes and known dirt (-inf in audio) of MMSA's
``aligned_50.pkl`` / ``unaligned_50.pkl``, and builds labels that a model can only
predict well if it relates each audio/video frame to the word spoken at that time.

Generative story, per sample (SPEC.md section 1 motivates the token-level alignment):

1. A sentence of ``n`` words (10..48) from a small vocabulary: neutral words (polarity
   0), positive/negative words (polarity +-1 or +-2), intensifiers ("very": the next
   word counts 1.5 times) and negations ("not": the next word flips).
2. Each word gets a random span of audio frames and, independently, of video frames:
   a random monotone time warp (gamma-distributed durations, leading/trailing silence),
   different for the two streams, so frame index says little about the word index.
3. Cues placed on random words (independently of the word type): a "hesitant tone" in
   the audio during the word's span halves its weight; an "intense expression" in the
   video during the word's span doubles it. A cue on a neutral word does nothing.
   (The text decides the sign of most labels, about 88% of the non-zero ones; the cues
   decide the rest and most of the magnitude: knowing where they fall takes the best
   possible MAE from about 0.59 to about 0.21.)
4. label = clip(round5(scale * sum_k polarity_k * text_mod_k * hesitation_k * emphasis_k
   + noise), -3, 3), rounded to multiples of 0.2 like MOSI's averaged annotator scores
   (so exact zeros and ties occur). With the defaults the spread is MOSI-like
   (std about 1.5, about half positive).
5. Features, all roughly unit scale: text = a fixed random 768-d embedding per word type
   (like frozen BERT) plus small noise, at [CLS] w_1 .. w_n [SEP]; audio/video frames =
   a weak noisy echo of the spoken word (a fixed random projection of its embedding into
   d_a / d_v, like lip movement or phonetic content) + the cue pattern during cued spans
   + noise (uniform, cheaper to draw than Gaussian for MOSEI-sized files). Silence
   carries noise only; padding is zero.

Because cues are placed independently of the word type, the bag of words plus the
number of cues in each stream leaves much of the label unexplained; knowing which word
each cue co-occurs with explains almost all of it (``tests/test_synthetic.py`` checks
both). The echo lets a cosine-similarity OT plan between learned projections find the
co-occurring word.

The vocabulary, embeddings, projections and cue patterns are fixed (independent of
``seed``), so files made with different seeds share one "language".
"""

from __future__ import annotations

import os
import pickle
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, DataError

__all__ = [
    "SHAPES",
    "VOCAB",
    "Latents",
    "latent_labels",
    "make_synthetic",
    "render_split",
    "sample_latents",
    "write_synthetic",
]

# like -> (audio (T_a, d_a), vision (T_v, d_v), (n_train, n_valid, n_test)); SPEC.md section 2.
SHAPES: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int, int]]] = {
    "mosi": ((375, 5), (500, 20), (1284, 229, 686)),
    "mosei": ((500, 74), (500, 35), (16326, 1871, 4659)),
}
T_TEXT = 50
D_TEXT = 768
MIN_WORDS, MAX_WORDS = 10, T_TEXT - 2  # [CLS] and [SEP] take two text positions
CLS_ID, SEP_ID, WORD_ID_OFFSET = 101, 102, 2000

_NEUTRAL = (
    "the",
    "a",
    "movie",
    "film",
    "it",
    "was",
    "is",
    "i",
    "this",
    "and",
    "plot",
    "actor",
    "story",
    "scene",
    "to",
    "of",
    "that",
    "with",
    "just",
    "but",
    "about",
    "watch",
    "think",
    "character",
    "ending",
    "music",
    "he",
    "she",
    "they",
    "there",
    "um",
    "uh",
)
_POLAR = {
    "good": 1,
    "nice": 1,
    "fun": 1,
    "funny": 1,
    "great": 2,
    "love": 2,
    "amazing": 2,
    "best": 2,
    "bad": -1,
    "boring": -1,
    "dull": -1,
    "weak": -1,
    "awful": -2,
    "hate": -2,
    "terrible": -2,
    "worst": -2,
}
_INTENSIFIERS = ("very", "really", "so")
_NEGATIONS = ("not", "never")

VOCAB: tuple[str, ...] = _NEUTRAL + tuple(_POLAR) + _INTENSIFIERS + _NEGATIONS
_V = len(VOCAB)
_POLARITY = np.array([_POLAR.get(w, 0) for w in VOCAB], dtype=np.float64)
_IS_INTENSIFIER = np.array([w in _INTENSIFIERS for w in VOCAB])
_IS_NEGATION = np.array([w in _NEGATIONS for w in VOCAB])
# Token sampling probabilities per group: neutral, polar, intensifier, negation.
_GROUP_P = {"neutral": 0.57, "polar": 0.35, "intensifier": 0.04, "negation": 0.04}
_TOKEN_P = np.concatenate(
    [
        np.full(len(_NEUTRAL), _GROUP_P["neutral"] / len(_NEUTRAL)),
        np.full(len(_POLAR), _GROUP_P["polar"] / len(_POLAR)),
        np.full(len(_INTENSIFIERS), _GROUP_P["intensifier"] / len(_INTENSIFIERS)),
        np.full(len(_NEGATIONS), _GROUP_P["negation"] / len(_NEGATIONS)),
    ]
)

HESITATION_P = 0.25  # chance that the audio carries the hesitant tone during a word
HESITATION_FACTOR = 0.5  # a hesitant word counts half
EMPHASIS_P = 0.4  # chance that the video carries the intense expression during a word
LABEL_SCALE = 0.26  # calibrated so that the label std is about 1.5 (MOSI: about 1.5)
LABEL_NOISE = 0.3
TEXT_NOISE = 0.2
ECHO_AMP, CUE_AMP, FRAME_NOISE = 0.6, 1.0, 0.6
NEG_INF_P = 0.15  # share of samples with one -inf audio value (COVAREP has them)
_FIXED_SEED = 20250601  # the "language": embeddings, projections, cue patterns
_CHUNK = 1024  # samples rendered at a time (bounds temporaries for MOSEI)


@dataclass
class Latents:
    """What the labels are computed from; ``(N, 48)`` arrays are indexed by word position.

    tokens: word type ids (-1 beyond ``n_words``); hesitation / emphasis: cue flags (False
    beyond ``n_words``); noise: the label noise ``(N,)``.
    """

    tokens: np.ndarray
    n_words: np.ndarray
    hesitation: np.ndarray
    emphasis: np.ndarray
    noise: np.ndarray


def sample_latents(rng: np.random.Generator, n: int) -> Latents:
    """Draw ``n`` sentences with their cue placements and label noise."""
    n_words = rng.integers(MIN_WORDS, MAX_WORDS + 1, size=n)
    valid = np.arange(MAX_WORDS)[None, :] < n_words[:, None]
    tokens = np.where(valid, rng.choice(_V, size=(n, MAX_WORDS), p=_TOKEN_P), -1)
    hesitation = valid & (rng.random((n, MAX_WORDS)) < HESITATION_P)
    emphasis = valid & (rng.random((n, MAX_WORDS)) < EMPHASIS_P)
    noise = rng.normal(0.0, LABEL_NOISE, size=n)
    return Latents(tokens, n_words, hesitation, emphasis, noise)


def word_contributions(lat: Latents) -> np.ndarray:
    """``(N, 48)``: polarity x text modifier x audio cue x video cue, per word (step 4)."""
    tok = np.maximum(lat.tokens, 0)
    valid = lat.tokens >= 0
    pol = np.where(valid, _POLARITY[tok], 0.0)
    prev = np.concatenate([np.full((tok.shape[0], 1), -1), lat.tokens[:, :-1]], axis=1)
    prev_ok = prev >= 0
    prev_t = np.maximum(prev, 0)
    text_mod = np.where(prev_ok & _IS_INTENSIFIER[prev_t], 1.5, 1.0)
    text_mod = np.where(prev_ok & _IS_NEGATION[prev_t], -1.0, text_mod)
    return pol * text_mod * np.where(lat.hesitation, HESITATION_FACTOR, 1.0) * np.where(lat.emphasis, 2.0, 1.0)


def latent_labels(lat: Latents) -> np.ndarray:
    """``(N,)`` float32 labels in [-3, 3], multiples of 0.2 (step 4 of the module docstring)."""
    raw = LABEL_SCALE * word_contributions(lat).sum(axis=1) + lat.noise
    return np.clip(np.round(raw * 5.0) / 5.0, -3.0, 3.0).astype(np.float32)


@lru_cache(maxsize=4)
def _tables(d_a: int, d_v: int) -> dict[str, np.ndarray]:
    """Fixed embeddings (rows: vocabulary, then [CLS], [SEP]), echo projections, cue patterns."""
    rng = np.random.default_rng([_FIXED_SEED, d_a, d_v])
    emb = rng.standard_normal((_V + 2, D_TEXT))
    out = {"text": emb.astype(np.float32)}
    for name, d in (("audio", d_a), ("vision", d_v)):
        proj = emb[:_V] @ rng.standard_normal((D_TEXT, d))
        # per-element RMS 1, so the echo amplitude is ECHO_AMP whatever d is
        proj *= np.sqrt(d) / np.linalg.norm(proj, axis=1, keepdims=True)
        cue = rng.standard_normal(d)
        cue *= np.sqrt(d) / np.linalg.norm(cue)
        out[f"{name}_echo"] = proj.astype(np.float32)
        out[f"{name}_cue"] = cue.astype(np.float32)
    return out


def _frame_to_word(
    rng: np.random.Generator, n_words: np.ndarray, t_max: int
) -> tuple[np.ndarray, np.ndarray]:
    """Random monotone time warp: ``(N, T)`` word position per frame (-1: silence/padding)
    and the ``(N,)`` true lengths."""
    n = n_words.shape[0]
    hi = (t_max - 8) / MAX_WORDS  # frames per word; the longest sentence still fits
    rate = rng.uniform(0.6 * hi, hi, size=n)
    lead = rng.integers(0, 5, size=n)
    trail = rng.integers(0, 5, size=n)
    spoken = np.maximum(np.round(n_words * rate).astype(np.int64), n_words)
    spoken = np.minimum(spoken, t_max - lead - trail)
    lengths = lead + spoken + trail
    gam = rng.gamma(3.0, size=(n, MAX_WORDS))
    frame_word = np.full((n, t_max), -1, dtype=np.int64)
    for i in range(n):
        k = int(n_words[i])
        cum = np.cumsum(gam[i, :k])
        # boundary_j = j + floor(extra * cum_j / total) is strictly increasing: every word
        # gets at least one frame
        ends = np.arange(1, k + 1) + np.floor((spoken[i] - k) * cum / cum[-1]).astype(np.int64)
        ends[-1] = spoken[i]  # exact, whatever the float rounding of cum / cum[-1]
        durations = np.diff(ends, prepend=0)
        frame_word[i, lead[i] : lead[i] + spoken[i]] = np.repeat(np.arange(k), durations)
    return frame_word, lengths


def _lookup_plus_noise(
    rng: np.random.Generator,
    table: np.ndarray,
    index: np.ndarray,
    real: np.ndarray,
    noise_std: float,
    out: np.ndarray,
) -> None:
    """``out = (table[index] + noise) * real``; ``out`` (c, T, d), ``index``/``real`` (c, T).

    The noise is uniform with standard deviation ``noise_std``: drawing it is several times
    cheaper than Gaussian noise, which matters for MOSEI-sized files (1.5e9 values).
    """
    np.take(table, index, axis=0, out=out)
    noise = rng.random(out.shape, dtype=np.float32)
    noise -= np.float32(0.5)
    noise *= np.float32(noise_std * np.sqrt(12.0))
    out += noise
    out *= real[..., None]


def _render_stream(
    rng: np.random.Generator,
    lat: Latents,
    frame_word: np.ndarray,
    real: np.ndarray,
    echo: np.ndarray,
    cue: np.ndarray,
    cue_flags: np.ndarray,
    noise_std: float,
) -> np.ndarray:
    """``(N, T, d)`` float32: echo of the spoken word + cue pattern on cued words + noise
    where ``real`` (N, T) is True, zero elsewhere."""
    n, t = frame_word.shape
    # rows 0..V-1: echo of word v; V..2V-1: echo + cue; 2V: silence (noise only)
    table = np.concatenate(
        [ECHO_AMP * echo, ECHO_AMP * echo + CUE_AMP * cue, np.zeros((1, echo.shape[1]))]
    )
    table = table.astype(np.float32)
    out = np.empty((n, t, echo.shape[1]), dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        fw = frame_word[lo:hi]
        rows = np.arange(lo, hi)[:, None]
        pos = np.maximum(fw, 0)
        index = np.where(fw >= 0, lat.tokens[rows, pos] + _V * cue_flags[rows, pos], 2 * _V)
        _lookup_plus_noise(rng, table, index, real[lo:hi], noise_std, out[lo:hi])
    return out


def render_split(
    rng: np.random.Generator, lat: Latents, like: str, aligned: bool
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Features, token ids and lengths for the sentences in ``lat`` (MMSA key names).

    Also returns the ground-truth alignment ``{"audio"|"vision": (N, T_m) int64}``: the word
    position (0-based, the text position minus 1 for [CLS]) spoken at each frame, -1 for
    silence, [CLS]/[SEP] and padding. It is what a perfect transport plan would recover.
    """
    (t_a, d_a), (t_v, d_v), _ = SHAPES[like]
    tab = _tables(d_a, d_v)
    n = lat.tokens.shape[0]
    # text positions: 0 = [CLS], 1..n = words, n+1 = [SEP]
    ids = np.full((n, T_TEXT), -1, dtype=np.int64)
    ids[:, 0] = _V
    ids[:, 1 : MAX_WORDS + 1] = lat.tokens
    ids[np.arange(n), lat.n_words + 1] = _V + 1
    real = ids >= 0
    text = np.empty((n, T_TEXT, D_TEXT), dtype=np.float32)
    for lo in range(0, n, _CHUNK):
        hi = min(lo + _CHUNK, n)
        index = np.maximum(ids[lo:hi], 0)
        _lookup_plus_noise(rng, tab["text"], index, real[lo:hi], TEXT_NOISE, text[lo:hi])
    bert = np.zeros((n, 3, T_TEXT), dtype=np.int64)
    bert[:, 0] = np.where(
        ids == _V, CLS_ID, np.where(ids == _V + 1, SEP_ID, np.where(real, ids + WORD_ID_OFFSET, 0))
    )
    bert[:, 1] = real
    out: dict[str, Any] = {"text": text, "text_bert": bert}

    streams = (("audio", t_a, lat.hesitation), ("vision", t_v, lat.emphasis))
    frames: dict[str, np.ndarray] = {}
    for name, t_max, flags in streams:
        if aligned:
            # one "frame" per word, on the word's text position (frame noise averaged over its span)
            fw = np.where(
                (np.arange(T_TEXT)[None, :] >= 1) & real & (ids < _V),
                np.arange(T_TEXT)[None, :] - 1,
                -1,
            )
            # [CLS]/[SEP] positions have no audio/video frame: zero rows
            x = _render_stream(
                rng,
                lat,
                fw,
                fw >= 0,
                tab[f"{name}_echo"],
                tab[f"{name}_cue"],
                flags,
                FRAME_NOISE / 2,
            )
        else:
            fw, lengths = _frame_to_word(rng, lat.n_words, t_max)
            real = np.arange(t_max)[None, :] < lengths[:, None]
            x = _render_stream(
                rng, lat, fw, real, tab[f"{name}_echo"], tab[f"{name}_cue"], flags, FRAME_NOISE
            )
            out[f"{name}_lengths"] = [int(v) for v in lengths]
        out[name] = x
        frames[name] = fw
    # COVAREP-like dirt: one -inf in a real audio frame of some samples (aligned: on a word)
    hit = np.flatnonzero(rng.random(n) < NEG_INF_P)
    if aligned:
        frame = 1 + (rng.random(hit.size) * lat.n_words[hit]).astype(np.int64)
    else:
        frame = (rng.random(hit.size) * np.asarray(out["audio_lengths"])[hit]).astype(np.int64)
    dim = rng.integers(0, d_a, size=hit.size)
    out["audio"][hit, frame, dim] = -np.inf
    return out, frames


def _split_sizes(
    like: str, n_train: int | None, n_valid: int | None, n_test: int | None
) -> dict[str, int]:
    default = SHAPES[like][2]
    sizes = {}
    for name, given, d in zip(("train", "valid", "test"), (n_train, n_valid, n_test), default):
        value = d if given is None else given
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"n_{name}={given!r}: must be a positive integer")
        sizes[name] = int(value)
    return sizes


def make_synthetic(
    like: str = "mosi",
    aligned: bool = False,
    seed: int = 0,
    n_train: int | None = None,
    n_valid: int | None = None,
    n_test: int | None = None,
) -> dict[str, dict[str, Any]]:
    """A dict in the MMSA pickle schema (module docstring; SPEC.md section 2).

    Per split: text (N, 50, 768) float32, text_bert (N, 3, 50) int64, audio (N, T_a, d_a)
    and vision (N, T_v, d_v) float32 (50 each when ``aligned``), audio_lengths /
    vision_lengths (unaligned only), regression_labels (N,) float32 in [-3, 3],
    classification_labels (N,) float32 (0 negative, 1 neutral, 2 positive), annotations,
    raw_text, id ("video$_$clip"). Split sizes default to the real ones for ``like``.
    Deterministic per ``seed``; each split has its own stream, so changing one split's
    size leaves the others unchanged.
    """
    if like not in SHAPES:
        raise ConfigError(f"like={like!r}: expected one of {sorted(SHAPES)}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"seed={seed!r}: must be a non-negative integer")
    sizes = _split_sizes(like, n_train, n_valid, n_test)
    # `like` is mixed in so that MOSI- and MOSEI-like files made with one seed differ
    streams = np.random.SeedSequence([int(seed), sorted(SHAPES).index(like)]).spawn(len(sizes))
    data: dict[str, dict[str, Any]] = {}
    for (split, n), stream in zip(sizes.items(), streams):
        rng = np.random.default_rng(stream)
        lat = sample_latents(rng, n)
        labels = latent_labels(lat)
        d, _ = render_split(rng, lat, like, aligned)
        d["regression_labels"] = labels
        d["classification_labels"] = (np.sign(labels) + 1).astype(np.float32)
        d["annotations"] = np.array(
            [("Negative", "Neutral", "Positive")[int(c)] for c in np.sign(labels) + 1], dtype=object
        )
        d["raw_text"] = np.array(
            [" ".join(VOCAB[t] for t in row[:k]) for row, k in zip(lat.tokens, lat.n_words)],
            dtype=object,
        )
        # ~12 clips per video, like MOSI (2,199 clips from 93 videos)
        d["id"] = np.array(
            [f"syn{seed}{split[:2]}{i // 12:04d}$_${i % 12 + 1}" for i in range(n)], dtype=object
        )
        data[split] = d
    return data


def write_synthetic(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Write ``make_synthetic(**kwargs)`` to ``path`` as a pickle, atomically (temp + rename)."""
    target = Path(path)
    if target.is_dir():
        raise DataError(f"{target}: is a directory, expected a file name for the pickle")
    parent = target.parent
    if not parent.is_dir():
        raise DataError(f"{target}: directory {parent} does not exist")
    data = make_synthetic(**kwargs)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(data, f, protocol=4)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
