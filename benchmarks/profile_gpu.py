"""Where does AlignMamba's GPU time go? torch.profiler tables for one inference call.

Usage (repository root): ``PYTHONPATH=. python benchmarks/profile_gpu.py --length 65536 [--model alignmamba]``.
Prints the kernels sorted by total CUDA time and a per-stage split (CUDA events around the
encoders, each source's alignment + MMD, and the Mamba stack), batch 1, d 256, 4 layers, bf16
autocast: the settings of ``alignmamba bench`` in BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from alignmamba import alignment as al
from alignmamba.bench import WIDTHS, BenchSettings, _build, split_length


def stage_times(model, feats, masks, reps: int = 5) -> dict[str, float]:
    """Median ms of the forward's stages, each timed alone with CUDA events (same order as forward)."""
    cfg = model.config
    out: dict[str, list[float]] = {}

    def timed(name, fn, *args):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        r = fn(*args)
        b.record()
        b.synchronize()
        out.setdefault(name, []).append(a.elapsed_time(b))
        return r

    for _ in range(reps + 2):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            h = timed("encoders", lambda: {m: model.encoders[m](feats[m], masks[m]) for m in cfg.modalities})
            anc, am = h[cfg.anchor], masks[cfg.anchor]
            al_out = {}
            for m in cfg.sources:
                al_out[m] = timed(f"ot_align[{m}]", al.relaxed_ot_align, h[m], anc, masks[m], am, 0.0,
                                  cfg.ot_normalize)
                timed(f"mmd[{m}]", al.mmd2, al_out[m], anc, cfg.mmd_sigma, am, am, cfg.mmd_bandwidth)
            al_out[cfg.anchor] = anc
            x = torch.stack([al_out[m] for m in cfg.interleave_order], 2).flatten(1, 2)
            mm = am[:, :, None].expand(-1, -1, 3).flatten(1, 2)
            timed("mamba_stack", model.backbone, x, mm)
            timed("whole_forward", lambda: model(feats, masks))
    return {k: sorted(v[2:])[len(v[2:]) // 2] for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=65536)
    ap.add_argument("--model", default="alignmamba")
    ap.add_argument("--rows", type=int, default=30)
    a = ap.parse_args()
    s = BenchSettings(device="cuda", dtype="bf16", batch=1)
    torch.manual_seed(0)
    model = _build(a.model, s).cuda().eval()
    lens = split_length(a.length)
    feats = {m: torch.randn(1, n, WIDTHS[m], device="cuda") for m, n in lens.items()}
    masks = {m: torch.ones(1, n, dtype=torch.bool, device="cuda") for m, n in lens.items()}
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} lengths {lens}")
    if a.model == "alignmamba":
        for k, v in stage_times(model, feats, masks).items():
            print(f"stage {k:24s} {v:9.3f} ms")
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(feats, masks)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(feats, masks)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.rows, max_name_column_width=60))
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(f"CUDA kernels launched: {len(kern)}")


if __name__ == "__main__":
    main()
