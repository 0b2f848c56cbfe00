"""Efficiency benchmark (alignmamba/bench.py): points, subprocess isolation, OOM, JSON schema."""
from __future__ import annotations

import json

import pytest
import torch

from alignmamba import bench
from alignmamba.baselines import TransformerSingle
from alignmamba.cli import main

TINY = bench.BenchSettings(device="cpu", batch=2, d_model=16, layers=1, repeats=2, warmup=1, threads=1)
RECORD_KEYS = {"model", "length", "time_ms", "peak_mem_bytes", "status", "ratio_time", "ratio_mem"}


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("total", [3, 24, 925, 6400, 65536])
def test_split_length(total):
    parts = bench.split_length(total)
    assert list(parts) == ["text", "audio", "vision"] and sum(parts.values()) == total
    assert min(parts.values()) >= 1
    if total >= 925:  # MOSI proportions 50 : 375 : 500, up to rounding
        assert abs(parts["text"] - total * 50 / 925) <= 1 and abs(parts["audio"] - total * 375 / 925) <= 1


@pytest.mark.parametrize("mode", ["inference", "train"])
def test_measure_point_in_process(mode):
    s = bench.BenchSettings(**{**TINY.__dict__, "mode": mode})
    for name in ("alignmamba", "transformer_single"):
        rec = bench.measure_point(name, 24, s)
        assert rec["status"] == "ok" and rec["model"] == name and rec["length"] == 24
        assert rec["time_ms"] > 0 and isinstance(rec["peak_mem_bytes"], int) and rec["peak_mem_bytes"] >= 0


def test_subprocess_point():
    rec = bench.measure_point_subprocess("mamba_single", 4000, TINY, timeout=120)
    assert rec["status"] == "ok" and rec["time_ms"] > 0 and set(rec) >= RECORD_KEYS - {"ratio_time", "ratio_mem"}
    # A fresh process sees this point's activations (2 x 4000 tokens, inner width 32, 16 states:
    # tens of MB), however much earlier points in the parent process used. (Tiny points can
    # read 0: RSS growth cannot see memory the allocator already held after imports.)
    assert isinstance(rec["peak_mem_bytes"], int) and rec["peak_mem_bytes"] > 2 * 2**20


def test_cli_json_schema_and_ratios(tmp_path, capsys):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--device", "cpu", "--lengths", "24,48", "--models", "alignmamba,transformer_single",
               "mamba_multi", "--batch", "2", "--d-model", "16", "--layers", "1", "--repeats", "2",
               "--warmup", "1", "--threads", "1", "--in-process", "--json", str(js), "--plot", str(png)])
    assert rc == 0
    rep = json.loads(js.read_text())
    for key in ("device", "device_name", "torch_version", "dtype", "batch", "d_model", "layers", "results"):
        assert key in rep
    assert rep["device"] == "cpu" and rep["dtype"] == "fp32" and rep["batch"] == 2 and rep["d_model"] == 16
    assert rep["torch_version"] == torch.__version__ and rep["command"].startswith("alignmamba ")
    assert [(r["model"], r["length"]) for r in rep["results"]] == [
        (m, n) for n in (24, 48) for m in ("alignmamba", "transformer_single", "mamba_multi")]
    for r in rep["results"]:
        assert set(r) >= RECORD_KEYS and r["status"] == "ok"
        ref = next(x for x in rep["results"] if x["model"] == "alignmamba" and x["length"] == r["length"])
        assert r["ratio_time"] == pytest.approx(r["time_ms"] / ref["time_ms"])
        if r["model"] == "alignmamba":
            assert r["ratio_time"] == 1.0
    assert png.is_file() and png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "| model | tokens | status |" in out and "| transformer_single | 48 | ok |" in out


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: "
                 "you tried to allocate 1 bytes (out of memory)"),
])
def test_oom_is_recorded_not_raised(monkeypatch, error):
    def boom(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(TransformerSingle, "forward", boom)
    rep = bench.run_bench(TINY, ["alignmamba", "transformer_single"], [24, 48], isolate=False, log=lambda s: None)
    res = {(r["model"], r["length"]): r for r in rep["results"]}
    for n in (24, 48):
        oom = res[("transformer_single", n)]
        assert oom["status"] == "oom" and oom["time_ms"] is None and oom["peak_mem_bytes"] is None
        assert oom["ratio_time"] is None and oom["ratio_mem"] is None
        assert res[("alignmamba", n)]["status"] == "ok"
    assert "not run" in res[("transformer_single", 48)]["note"]  # not retried at a longer length


def test_other_errors_are_not_hidden(monkeypatch):
    def bug(self, *args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(TransformerSingle, "forward", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.measure_point("transformer_single", 24, TINY)


def test_peak_rss_sees_each_interval():
    # Blocks above glibc's largest mmap threshold (32 MiB) are fresh pages, never recycled heap
    # that is already resident, so their growth is visible whatever ran before in this process.
    big = torch.ones(160 * 2**20 // 4)  # an earlier, larger peak must not hide the next interval's
    del big
    rss = bench.PeakRSS()
    rss.start()
    x = torch.ones(80 * 2**20 // 4)
    x += 1  # touch the pages
    grown = rss.stop()
    del x
    if rss.method == "VmHWM":
        assert 75 * 2**20 <= grown <= 100 * 2**20
    else:  # ru_maxrss (no /proc): the earlier 160 MiB peak hides the 80 MiB one
        assert grown >= 0


def test_add_ratios():
    res = [{"model": "alignmamba", "length": 10, "time_ms": 2.0, "peak_mem_bytes": 100, "status": "ok"},
           {"model": "x", "length": 10, "time_ms": 5.0, "peak_mem_bytes": 50, "status": "ok"},
           {"model": "x", "length": 20, "time_ms": 5.0, "peak_mem_bytes": 50, "status": "ok"},
           {"model": "alignmamba", "length": 30, "time_ms": None, "peak_mem_bytes": None, "status": "oom"},
           {"model": "x", "length": 30, "time_ms": 1.0, "peak_mem_bytes": 1, "status": "ok"}]
    bench.add_ratios(res)
    assert (res[1]["ratio_time"], res[1]["ratio_mem"]) == (2.5, 0.5)
    assert res[2]["ratio_time"] is None and res[4]["ratio_mem"] is None  # no reference at that length


def test_cli_errors(capsys):
    assert main(["bench", "--device", "cpu", "--models", "nope"]) == 2
    assert "--models: unknown model 'nope'" in capsys.readouterr().err
    assert main(["bench", "--device", "cpu", "--lengths", "8,x"]) == 2
    assert "--lengths" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err
