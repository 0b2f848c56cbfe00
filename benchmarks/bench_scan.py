"""Benchmark the Triton selective scan against the card's copy bandwidth and the PyTorch path.

Default problem (issue 6): batch 8, D 1536, N 16, L 16384; u, delta, z, B, C bf16; A, D,
delta_bias fp32; softplus on. Prints a table and writes JSON (``--json``).

Bytes counted are those that must move: every input read once, every output written once
(the forward's state checkpoints and the backward's re-reads are overhead, not counted).
Run from the repository root: ``PYTHONPATH=. python benchmarks/bench_scan.py``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


INNER = 1  # calls per timed sample (--inner)


def median_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 3) -> float:
    """Median of ``reps`` CUDA-event timings after ``warmup`` untimed calls. Each sample is
    INNER back-to-back calls divided by INNER: with 1 (the default, and every figure before the
    fifth session) the host work before a call's first launch is included, as when the GPU
    waits for the caller; with more, the GPU stays busy and the figure is its own time per
    call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(INNER):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / INNER)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 4, device="cuda", dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), reps=20)
    return 2 * nbytes / ms / 1e6


def make_inputs(bsz: int, dim: int, dstate: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = torch.bfloat16

    def r(*shape, dtype=bf, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device="cuda", generator=g) * scale + shift).to(dtype)

    return {
        "u": r(bsz, dim, length), "delta": r(bsz, dim, length, scale=0.5, shift=-2.0),
        "A": -torch.arange(1, dstate + 1, device="cuda", dtype=torch.float32).repeat(dim, 1)
        * torch.exp(r(dim, 1, dtype=torch.float32, scale=0.1)),
        "B": r(bsz, dstate, length), "C": r(bsz, dstate, length), "D": r(dim, dtype=torch.float32),
        "z": r(bsz, dim, length), "delta_bias": r(dim, dtype=torch.float32, scale=0.5),
    }


def byte_counts(x: dict) -> dict[str, int]:
    def nb(t):
        return t.numel() * t.element_size()

    ins = sum(nb(x[k]) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    out = nb(x["u"])
    # backward reads the inputs and dout, writes one gradient per input
    return {"fwd": ins + out, "bwd": ins + out + ins}


def run_scan(fn, x, need_grad: bool):
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
              True, False)


def time_path(fn, x, dout, reps: int) -> dict[str, float]:
    leaves = {k: v.detach().requires_grad_(True) for k, v in x.items()}

    def fwd_infer():
        with torch.no_grad():
            run_scan(fn, x, False)

    def fwd_train():
        return run_scan(fn, leaves, True)

    def fwd_bwd():
        for v in leaves.values():
            v.grad = None
        out = run_scan(fn, leaves, True)
        out.backward(dout)

    res = {"fwd_ms": median_ms(fwd_infer, reps)}
    res["fwd_train_ms"] = median_ms(fwd_train, reps)
    res["fwd_bwd_ms"] = median_ms(fwd_bwd, reps)
    res["bwd_ms"] = res["fwd_bwd_ms"] - res["fwd_train_ms"]
    return res


def bwd_setup(x: dict) -> dict:
    """What a direct backward launch needs (``triton_scan._bwd``): the inputs, B/C as the
    backward takes them (``Bb``, ``Cb``), B/C grouped (``Bg``, ``Cg``) and the checkpoints of one
    default forward (``ckpt``)."""
    import alignmamba.ssm.triton_scan as ts

    s = {k: x[k] for k in ("u", "delta", "A", "D", "z", "delta_bias")}
    s["Bg"], s["Cg"], _ = ts._check(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                    x["delta_bias"], None)
    s["Bb"], s["Cb"] = ts._prep_bc(s["Bg"]), ts._prep_bc(s["Cg"])
    cf = ts.pick_fwd_config(x["u"].shape[1])
    _, _, s["ckpt"] = ts._fwd(x["u"], x["delta"], x["A"], s["Bg"], s["Cg"], x["D"], x["z"],
                              x["delta_bias"], None, True, False, True, cf)
    return s


def run_bwd(s: dict, dout, cfg, segments, kernel: str = "triton"):
    """One ``_bwd`` call on a :func:`bwd_setup` (no final-state gradient, no h0, softplus)."""
    import alignmamba.ssm.triton_scan as ts

    return ts._bwd(dout, None, s["u"], s["delta"], s["A"], s["Bb"], s["Cb"], s["D"], s["z"],
                   s["delta_bias"], None, s["ckpt"], True, cfg, segments, kernel)


def sweep(x, dout, configs_f: list, configs_b: list, reps: int) -> list[dict]:
    """Time kernel variants directly (forward, and backward from that forward's checkpoints)."""
    import alignmamba.ssm.triton_scan as ts

    u, delta, A, B, C, D, z, bias = (x[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                  "delta_bias"))
    Bg, Cg, _ = ts._check(u, delta, A, B, C, D, z, bias, None)
    rows = []
    for cf, seg in configs_f:
        t0 = time.time()

        def fwd(ck, cf=cf, seg=seg):
            return ts._fwd(u, delta, A, Bg, Cg, D, z, bias, None, True, False, ck, cf, seg)

        ms = median_ms(lambda: fwd(False), reps)
        ms_ck = median_ms(lambda: fwd(True), reps)
        rows.append({"kind": "fwd", "cfg": repr(cf), "segments": seg, "ms": ms,
                     "ms_with_ckpt": ms_ck, "wall_s": time.time() - t0})
        print(f"  fwd {cf} segments {seg}: {ms:.3f} ms (with checkpoints {ms_ck:.3f} ms)",
              flush=True)
    sb = bwd_setup(x)
    for cb, seg in configs_b:
        t0 = time.time()
        ms = median_ms(lambda cb=cb, seg=seg: run_bwd(sb, dout, cb, seg), reps)
        rows.append({"kind": "bwd", "cfg": repr(cb), "segments": seg, "ms": ms,
                     "wall_s": time.time() - t0})
        print(f"  bwd {cb} segments {seg}: {ms:.3f} ms", flush=True)
    return rows


def bwd_kernels(x, dout, segs: list[int], reps: int, chs: tuple[int, ...] = (128,),
                vers: tuple[int, ...] = (11,)) -> list[dict]:
    """The backward's main kernel, CUDA (NVRTC) of each version in ``vers`` (KERNEL_NOTES v9,
    at each block width in ``chs``, and v11) at each time-segment count in ``segs`` (0 = its
    own picker) and Triton at its default, from one forward's checkpoints, seeds pass included
    (each kernel's own); then the seeds pass alone, Triton and CUDA (v10), at those segment
    counts."""
    import alignmamba.ssm.triton_scan as ts

    sb = bwd_setup(x)
    cb = ts.pick_config(x["A"].shape[1], x["u"].shape[1], True, 4, 16)
    rows = []
    cs = ts.cuda_scan
    default_ch, default_ver = cs.CHANNELS_PER_BLOCK, cs.BWD_VERSION
    runs = [("triton", None, None, None)] + [
        ("cuda", s or None, ch, v) for v in vers
        for ch in (chs if v == 9 else (cs.BWD4_CHANNELS_PER_BLOCK,)) for s in segs]
    for kernel, seg, ch, ver in runs:
        cs.CHANNELS_PER_BLOCK = ch if ver == 9 else default_ch
        cs.BWD_VERSION = ver or default_ver
        try:
            ms = median_ms(lambda k=kernel, s=seg: run_bwd(sb, dout, cb, s, k), reps)
            auto = cs.pick_segments(*x["u"].shape[:2], 1, x["u"].shape[2], x["u"].device)
        finally:
            cs.CHANNELS_PER_BLOCK, cs.BWD_VERSION = default_ch, default_ver
        rows.append({"kernel": kernel, "version": ver, "segments": seg,
                     "auto_segments": auto if kernel == "cuda" else None,
                     "channels_per_block": ch, "ms": ms})
        print(f"  bwd kernel {kernel} v{ver or '-'} channels/block {ch or '-'} segments "
              f"{seg or f'auto ({auto})' if kernel == 'cuda' else '-'}: {ms:.3f} ms", flush=True)
    # the seeds pass alone (adjoint past each time segment's end; part of the times above)
    bsz, dim, length = x["u"].shape
    auto = cs.pick_segments(bsz, dim, 1, length, x["u"].device)
    At = x["A"].t().contiguous()
    for S in sorted({s or auto for s in segs} - {1}):
        for kernel in ("triton", "cuda"):
            ms = median_ms(lambda S=S, k=kernel: ts._bwd_seeds(
                dout, None, sb["delta"], sb["A"], At, sb["Cb"], sb["z"], sb["delta_bias"], True,
                cs.SEG, S, k), reps)
            rows.append({"kernel": f"seeds-{kernel}", "segments": S, "ms": ms})
            print(f"  bwd seeds pass alone ({kernel}), segments {S}: {ms:.3f} ms", flush=True)
    return rows


def fwd_kernels(x, segs: list[int], opts: list[str], reps: int) -> list[dict]:
    """The forward alone, called directly (``triton_scan._fwd``): Triton (v7) at its picker's
    segments, then CUDA (NVRTC, KERNEL_NOTES v10) at each segment count in ``segs`` (0 = its
    picker) and compile-time setting in ``opts`` ("MINB=4"; "" = defaults); inference
    and with checkpoints."""
    import alignmamba.ssm.triton_scan as ts

    u, delta, A, B, C, D, z, bias = (x[k] for k in ("u", "delta", "A", "B", "C", "D", "z",
                                                  "delta_bias"))
    Bg, Cg, _ = ts._check(u, delta, A, B, C, D, z, bias, None)
    cf = ts.pick_fwd_config(u.shape[1])
    rows = []
    runs = [("triton", None, "")] + [("cuda", s or None, o) for o in opts for s in segs]
    for kernel, seg, opt in runs:
        o = tuple(x for x in opt.split(",") if x)

        def fwd(ck, k=kernel, seg=seg, o=o):
            return ts._fwd(u, delta, A, Bg, Cg, D, z, bias, None, True, False, ck, cf, seg, k, o)

        ms, ms_ck = median_ms(lambda: fwd(False), reps), median_ms(lambda: fwd(True), reps)
        rows.append({"kernel": kernel, "segments": seg, "options": opt, "ms": ms,
                     "ms_with_ckpt": ms_ck})
        print(f"  fwd kernel {kernel} options {opt or '-'} segments {seg or 'auto'}: {ms:.3f} ms "
              f"(with checkpoints {ms_ck:.3f} ms)", flush=True)
    return rows


def load_module(path: str):
    """Another version of alignmamba/ssm/triton_scan.py (e.g. ``git show REV:path > F``), to
    time it beside the current one in the same run."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("triton_scan_other", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--dstate", type=int, default=16)
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch chunked path")
    ap.add_argument("--sweep", action="store_true", help="also time tile-shape variants")
    ap.add_argument("--deterministic", action="store_true",
                    help="also time the default path under torch.use_deterministic_algorithms")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--bwd-segs", type=int, nargs="*", default=None, metavar="S",
                    help="time the CUDA backward at these segment counts (0 = auto) beside "
                         "the Triton one")
    ap.add_argument("--bwd-ch", type=int, nargs="*", default=[128], metavar="CH",
                    help="channels per block of the v9 CUDA backward for --bwd-segs")
    ap.add_argument("--bwd-ver", type=int, nargs="*", default=[11], metavar="V",
                    help="CUDA backward versions for --bwd-segs: 11 (default), 9")
    ap.add_argument("--fwd-segs", type=int, nargs="*", default=None, metavar="S",
                    help="time the CUDA forward at these segment counts (0 = auto) beside "
                         "the Triton one")
    ap.add_argument("--fwd-opts", nargs="*", default=[""], metavar="OPTS",
                    help="compile-time settings of the CUDA forward for --fwd-segs, e.g. "
                         "MINB=4 ('' = defaults)")
    ap.add_argument("--inner", type=int, default=1, metavar="K",
                    help="back-to-back calls per timed sample (1: each call timed alone, host "
                         "work included; more: the GPU's own time per call)")
    ap.add_argument("--other", default=None, metavar="FILE",
                    help="also time this version of triton_scan.py (e.g. the previous commit's)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_scan: needs a CUDA device")
    global INNER
    INNER = max(1, args.inner)

    from alignmamba.ssm.triton_scan import FwdConfig, ScanConfig, selective_scan_triton

    dev = torch.cuda.get_device_name()
    copy_gbs = copy_bandwidth()
    x = make_inputs(args.batch, args.dim, args.dstate, args.length)
    dout = torch.randn_like(x["u"])
    nbytes = byte_counts(x)
    result = {"device": dev, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "inner": INNER,
              "shape": {"B": args.batch, "D": args.dim, "N": args.dstate, "L": args.length},
              "copy_GBps": copy_gbs, "bytes": nbytes}
    import triton

    result["triton"] = triton.__version__

    tri = time_path(selective_scan_triton, x, dout, args.reps)
    result["triton_scan"] = tri
    # the same with the Triton forward / backward kernel (CUDA is the default where it runs)
    result["triton_fwd_kernel"] = time_path(
        functools.partial(selective_scan_triton, fwd_kernel="triton"), x, dout, args.reps)
    result["triton_bwd_kernel"] = time_path(
        functools.partial(selective_scan_triton, bwd_kernel="triton"), x, dout, args.reps)
    if args.deterministic:  # the same calls under torch.use_deterministic_algorithms
        from alignmamba.train import deterministic_mode

        with deterministic_mode(True):
            det = time_path(selective_scan_triton, x, dout, args.reps)
        result["deterministic_scan"] = det
        print(f"  deterministic: bwd {det['bwd_ms']:.3f} ms against {tri['bwd_ms']:.3f} ms "
              f"({det['bwd_ms'] / tri['bwd_ms']:.2f}x), fwd+bwd {det['fwd_bwd_ms']:.3f} ms",
              flush=True)
    if args.fwd_segs is not None:
        result["fwd_kernels"] = fwd_kernels(x, args.fwd_segs, args.fwd_opts, args.reps)
    if args.bwd_segs is not None:
        result["bwd_kernels"] = bwd_kernels(x, dout, args.bwd_segs, args.reps,
                                            tuple(args.bwd_ch), tuple(args.bwd_ver))
    if not args.no_torch:
        from alignmamba.ssm.scan import selective_scan_chunked

        result["torch_chunked"] = time_path(selective_scan_chunked, x, dout, reps=3)
    if args.other:
        result["other_file"] = args.other
        result["other_scan"] = time_path(load_module(args.other).selective_scan_triton, x, dout,
                                         args.reps)

    if args.sweep:
        fwd_cfgs = [(FwdConfig(t, 64 // t, nw), seg)
                    for t, nw, seg in ((8, 4, 1), (4, 4, 1), (8, 4, 4), (8, 4, 9), (4, 4, 9),
                                       (8, 2, 9), (8, 4, 16))]
        bwd_cfgs = [(ScanConfig(4, 4, 4, 16, 8, 16, 4), seg) for seg in (1, 2, 3, 4, 6, 8, 12)]
        result["sweep"] = sweep(x, dout, fwd_cfgs, bwd_cfgs, args.reps)

    def gbs(nb, ms):
        return nb / ms / 1e6

    rows = [("triton fwd (inference)", tri["fwd_ms"], nbytes["fwd"]),
            ("triton fwd (saves ckpt)", tri["fwd_train_ms"], nbytes["fwd"]),
            ("triton bwd", tri["bwd_ms"], nbytes["bwd"]),
            ("triton fwd+bwd", tri["fwd_bwd_ms"], nbytes["fwd"] + nbytes["bwd"])]
    print(f"\n{dev} | copy {copy_gbs:.0f} GB/s | B={args.batch} D={args.dim} N={args.dstate} "
          f"L={args.length} bf16")
    print(f"{'path':28s} {'ms':>9s} {'GB/s':>8s} {'% copy':>7s} {'vs torch':>9s}")
    for name, ms, nb in rows:
        key = {"triton fwd (inference)": "fwd_ms", "triton fwd (saves ckpt)": "fwd_train_ms",
               "triton bwd": "bwd_ms", "triton fwd+bwd": "fwd_bwd_ms"}[name]
        sp = ""
        if "torch_chunked" in result:
            sp = f"{result['torch_chunked'][key] / ms:8.1f}x"
        print(f"{name:28s} {ms:9.3f} {gbs(nb, ms):8.0f} {100 * gbs(nb, ms) / copy_gbs:6.1f}% {sp}")
    tf = result["triton_fwd_kernel"]
    for key, name in (("fwd_ms", "fwd, Triton kernel"), ("fwd_train_ms", "fwd+ckpt, Triton kernel")):
        print(f"{name:28s} {tf[key]:9.3f} {gbs(nbytes['fwd'], tf[key]):8.0f} "
              f"{100 * gbs(nbytes['fwd'], tf[key]) / copy_gbs:6.1f}%  (default "
              f"{tri[key] / tf[key]:.2f}x its time)")
    tb = result["triton_bwd_kernel"]
    print(f"{'bwd, Triton kernel':28s} {tb['bwd_ms']:9.3f} {gbs(nbytes['bwd'], tb['bwd_ms']):8.0f} "
          f"{100 * gbs(nbytes['bwd'], tb['bwd_ms']) / copy_gbs:6.1f}%  (default {tri['bwd_ms'] / tb['bwd_ms']:.2f}x its time)")
    if "other_scan" in result:
        o = result["other_scan"]
        for key, name in (("fwd_ms", "fwd (inference)"), ("fwd_train_ms", "fwd (saves ckpt)"),
                          ("bwd_ms", "bwd"), ("fwd_bwd_ms", "fwd+bwd")):
            print(f"{'other ' + name:28s} {o[key]:9.3f}   (this version {tri[key] / o[key]:.2f}x "
                  f"its time)")
    if "torch_chunked" in result:
        t = result["torch_chunked"]
        print(f"{'torch chunked fwd':28s} {t['fwd_ms']:9.1f}")
        print(f"{'torch chunked fwd+bwd':28s} {t['fwd_bwd_ms']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
