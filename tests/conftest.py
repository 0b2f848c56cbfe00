"""Shared fixtures: tiny synthetic MMSA pickles (generated, never downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignmamba.data.synthetic import write_synthetic

TINY_SIZES = {"n_train": 24, "n_valid": 8, "n_test": 8}


@pytest.fixture(scope="session")
def tiny_mmsa_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MOSI-shaped unaligned MMSA pickle (24/8/8 samples). Treat as read-only."""
    return write_synthetic(
        tmp_path_factory.mktemp("data") / "unaligned_50.pkl", like="mosi", seed=0, **TINY_SIZES
    )


@pytest.fixture(scope="session")
def tiny_mmsa_aligned_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MOSI-shaped aligned MMSA pickle (24/8/8 samples, all modalities 50 steps). Read-only."""
    return write_synthetic(
        tmp_path_factory.mktemp("data") / "aligned_50.pkl",
        like="mosi",
        aligned=True,
        seed=0,
        **TINY_SIZES,
    )


@pytest.fixture
def mmd_calls(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """Spy on alignment.mmd2: the per-sample (B,) MMD^2 vectors the forward computes, in order."""
    from alignmamba import alignment as al

    seen: list[torch.Tensor] = []
    real = al.mmd2

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(al, "mmd2", spy)
    return seen
