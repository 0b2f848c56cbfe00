"""Offline sm_90 compile of the forward scan kernel: layouts, SASS counts and load-to-use distance.

No GPU needed: ``triton.compile`` with a ``GPUTarget("cuda", 90, 32)`` runs Triton's passes and
the ptxas shipped in the Triton wheel; ``cuobjdump`` (also in the wheel) disassembles the cubin.
For each variant of ``_ssm_fwd_kernel`` (the passes the issue-6 shape can launch; the time
tile T of ``--T``) it prints:

* registers and local-memory (spill) bytes per thread;
* the TTGIR layouts of the loaded tiles and of the loop-carried values, and how many layout
  conversions sit inside the time loop;
* the SASS of the time loop (the backward branch's range): instruction count by opcode and
  per state update per thread;
* for every global load in the loop, how far its first consumer is: the instruction that
  waits on the load's scoreboard (decoded from the Volta+ control bits: stall 4 bits at 105,
  write barrier 3 bits at 110, wait mask 6 bits at 116), in instructions and in the sum of
  the stall counts in between (a lower bound on the issue cycles that hide the load). Without
  prefetch the wait sits a few instructions after the loads; with it the wait should come
  after the chunk's arithmetic, i.e. across the loop's back edge. (KERNEL_NOTES v6 used this on
  the earlier 5-D kernel; v7 reads the same numbers for the one-channel-per-thread kernel.)

Usage (from the repository root; any machine with the Triton wheel, GPU or not):
``PYTHONPATH=. python benchmarks/sass_count.py [--out DIR] [--variants pass2,single,pass1] [--T 8]``.
Artifacts (ttgir, ptx, sass per variant) go to DIR (default: a temp directory).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
    # the interpreter replaces the JIT functions; offline compilation needs the real ones
    os.environ["TRITON_INTERPRET"] = "0"

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton
from triton.backends.compiler import GPUTarget

import alignmamba.ssm.triton_scan as ts

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def build(fn, args: dict, consts: dict, num_warps: int):
    """triton.compile for sm_90 with the launcher's specialisation: integer 1 -> constexpr,
    multiples of 16 and pointers -> divisibility 16."""
    params = list(inspect.signature(fn.fn).parameters)
    sig, cexpr, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p in consts:
            sig[p] = "constexpr"
            cexpr[(i,)] = consts[p]
            continue
        v = args[p]
        if isinstance(v, str):
            sig[p] = "*" + v
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif v == 1:
            sig[p] = "constexpr"
            cexpr[(i,)] = 1
        else:
            sig[p] = "i32" if abs(v) < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=cexpr, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def fwd_args(B=8, D=1536, N=16, L=16384, S=9, G=1, cfg=None, dt="bf16") -> dict:
    """Arguments of ``_launch_fwd`` for the issue-6 problem (bf16 streams; B, C as
    ``_rows_bc`` makes them: (B, G, L_pad + 1, N) fp32; A as (N, D)); h0/last per segment
    (B, S, D, N), checkpoints (B, n, N, D)."""
    step = cfg.T * cfg.CK
    n_ck = ts._cdiv(L, step)
    seg_len = ts._cdiv(ts._cdiv(L, S), step) * step  # as in ts._fwd
    n_blk_g = ts._cdiv(D // G, cfg.block_d)
    rows = ts._cdiv(L, cfg.T) * cfg.T + 1
    ptrs = {k: dt for k in ("u_ptr", "dt_ptr", "z_ptr", "out_ptr")}
    ptrs.update({k: "fp32" for k in ("A_ptr", "B_ptr", "C_ptr", "D_ptr", "bias_ptr", "h0_ptr",
                                     "last_ptr", "ckpt_ptr", "dsum_ptr")})
    ints = {
        "L": L, "N": N, "Dg": D // G, "n_blk_g": n_blk_g, "seg_len": seg_len,
        "s_ub": D * L, "s_ud": L, "s_ul": 1, "s_tb": D * L, "s_td": L, "s_tl": 1,
        "s_ad": 1, "s_an": D,
        "s_bb": G * rows * N, "s_bg": rows * N, "s_bl": N,
        "s_cb": G * rows * N, "s_cg": rows * N, "s_cl": N,
        "s_zb": D * L, "s_zd": L, "s_zl": 1, "s_ob": D * L, "s_od": L, "s_ol": 1,
        "s_hb": S * D * N, "s_hs": D * N, "s_hd": N, "s_hn": 1,
        "s_kb": n_ck * N * D, "s_kc": N * D, "s_kn": D, "s_sb": S * D, "s_ss": D,
    }
    return {**ptrs, **ints}


# the launches of the issue-6 forward (9 segments: pick_segments on 132 SMs, 96 programs)
VARIANTS = {
    # pass 2 of the segment-parallel forward, training (saves checkpoints)
    "pass2": {"STORE_OUT": True, "HAS_H0": True, "STORE_LAST": False, "STORE_CKPT": True,
              "STORE_DSUM": False},
    # one segment, inference (the v3 kernel as such)
    "single": {"STORE_OUT": True, "HAS_H0": False, "STORE_LAST": True, "STORE_CKPT": False,
               "STORE_DSUM": False},
    # pass 1: local final state and delta sums only (no C, z, out)
    "pass1": {"STORE_OUT": False, "HAS_H0": False, "STORE_LAST": True, "STORE_CKPT": False,
              "STORE_DSUM": True},
}

_INS = re.compile(r"/\*([0-9a-f]{4,6})\*/\s+(.*?);\s*/\*\s*(0x[0-9a-f]{16})\s*\*/")
_HI = re.compile(r"^\s*/\*\s*(0x[0-9a-f]{16})\s*\*/\s*$")


def parse_sass(sass: str) -> list[dict]:
    """Instructions with address, text, opcode and the decoded control bits."""
    out: list[dict] = []
    pending = None
    for line in sass.splitlines():
        m = _INS.search(line)
        if m:
            text = m.group(2).strip()
            pred = re.match(r"@!?U?P\w+\s+", text)
            body = text[pred.end():] if pred else text
            pending = {"addr": int(m.group(1), 16), "text": text,
                       "op": body.split()[0] if body else "", "lo": int(m.group(3), 16)}
            continue
        m = _HI.match(line)
        if m and pending is not None:
            hi = int(m.group(1), 16)
            pending.update(stall=(hi >> 41) & 0xF, wbar=(hi >> 46) & 7, rbar=(hi >> 49) & 7,
                           wait=(hi >> 52) & 0x3F)
            out.append(pending)
            pending = None
    return out


def waits_on(ins: dict, sb: int) -> bool:
    if ins["wait"] >> sb & 1:
        return True
    m = re.match(r"DEPBAR(\.LE)?\s+SB(\d)", ins["text"])
    return bool(m and int(m.group(2)) == sb)


def loop_ranges(ins: list[dict]) -> list[tuple[int, int]]:
    """(first, last) instruction index of every backward branch's range."""
    idx = {x["addr"]: i for i, x in enumerate(ins)}
    res = []
    for i, x in enumerate(ins):
        m = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?(0x[0-9a-f]+)", x["text"])
        if x["op"].startswith("BRA") and m:
            tgt = int(m.group(1), 16)
            if tgt < x["addr"] and tgt in idx:
                res.append((idx[tgt], i))
    return res


def analyse_loop(ins: list[dict], lo: int, hi: int, updates_per_thread: int) -> dict:
    body = ins[lo:hi + 1]
    ops = Counter(x["op"].split(".")[0] for x in body)
    n = len(body)
    loads = []
    for k, x in enumerate(body):
        if not x["op"].startswith("LDG") or x["wbar"] == 7:
            continue
        sb = x["wbar"]
        stall = 0
        for step in range(1, 2 * n):  # walk forward, around the back edge
            y = body[(k + step) % n]
            if waits_on(y, sb):
                loads.append({"at": k, "sb": sb, "dist": step, "stall_cycles": stall,
                              "wrapped": k + step >= n, "consumer": y["text"][:60]})
                break
            stall += y["stall"]
    return {"n": n, "ops": ops, "per_update": n / max(1, updates_per_thread), "loads": loads,
            "stall": sum(x["stall"] for x in body),
            "waits": sum(1 for x in body if x["wait"])}


def resources(cubin_path: str) -> str:
    res = subprocess.run([f"{BIN}/cuobjdump", "-res-usage", cubin_path], capture_output=True,
                         text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
    return m.group(0) if m else res.strip()[:200]


def ttgir_summary(ttgir: str) -> list[str]:
    """Layout aliases, the scf.for's carried types, and what happens to loads in the loop."""
    lines = ttgir.splitlines()
    out = [ln.strip() for ln in lines if re.match(r"#(blocked|linear|shared)\d*\s*=", ln)]
    depth, start = 0, None
    loop = []
    for i, ln in enumerate(lines):
        if start is None and "scf.for" in ln:
            start, depth = i, 0
        if start is not None:
            loop.append(ln)
            depth += ln.count("{") - ln.count("}")
            if depth <= 0 and i > start:
                break
    if loop:
        head = loop[0].strip()
        out.append("scf.for: " + (head if len(head) < 600 else head[:600] + " ..."))
        kinds = Counter()
        for ln in loop:
            m = re.search(r"=\s*(\"?[a-z_]+\.[a-z_]+)", ln)
            if m:
                kinds[m.group(1).strip('"')] += 1
        out.append("ops in loop: " + ", ".join(f"{k}:{v}" for k, v in kinds.most_common(16)))
        for ln in loop:
            if "tt.load" in ln:
                out.append("  load -> " + ln.strip().split(":")[-1].strip()[:160])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for ttgir/ptx/sass (default: temp)")
    ap.add_argument("--variants", default="pass2,single,pass1")
    ap.add_argument("--T", type=int, default=8, help="time steps per chunk")
    args = ap.parse_args()
    out = args.out or tempfile.mkdtemp(prefix="sass_count_")
    os.makedirs(out, exist_ok=True)
    cfg = ts.pick_fwd_config(1536, args.T)
    print(f"Triton {triton.__version__}, sm_90 offline; {cfg}; issue-6 shape B=8 D=1536 N=16 "
          f"L=16384 bf16; artifacts in {out}")
    # updates per thread per chunk: T steps x N states (one channel per thread)
    upd = cfg.T * 16
    summary = []
    for var in args.variants.split(","):
        consts = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, FAST=True, NP=16,
                      **VARIANTS[var], **cfg.meta())
        name = f"fwd_{var}_T{cfg.T}"
        c = build(ts._ssm_fwd_kernel, fwd_args(cfg=cfg), consts, cfg.num_warps)
        cub = os.path.join(out, name + ".cubin")
        with open(cub, "wb") as f:
            f.write(c.asm["cubin"])
        for key in ("ttgir", "ptx"):
            with open(os.path.join(out, f"{name}.{key}"), "w") as f:
                f.write(c.asm[key])
        sass = subprocess.run([f"{BIN}/cuobjdump", "-sass", cub], capture_output=True,
                              text=True, check=True).stdout
        with open(os.path.join(out, name + ".sass"), "w") as f:
            f.write(sass)
        res = resources(cub)
        print(f"\n== {name}: {res}")
        for ln in ttgir_summary(c.asm["ttgir"]):
            print("  " + ln)
        ins = parse_sass(sass)
        loops = loop_ranges(ins)
        if not loops:
            print("  no backward branch found in the SASS")
            continue
        lo, hi = max(loops, key=lambda r: r[1] - r[0])  # the time loop is the big one
        a = analyse_loop(ins, lo, hi, upd)
        print(f"  time loop {ins[lo]['addr']:#x}-{ins[hi]['addr']:#x}: {a['n']} SASS instr "
              f"per chunk, {a['per_update']:.1f} per state update per thread ({upd}/chunk)")
        print("  ops: " + ", ".join(f"{k}:{v}" for k, v in a["ops"].most_common(18)))
        print(f"  static stall cycles per iteration (one warp, no scoreboard waits): "
              f"{a['stall']}; instructions that wait on a scoreboard: {a['waits']}")
        for ld in a["loads"]:
            print(f"  LDG @{ld['at']:4d} SB{ld['sb']}: first wait {ld['dist']:4d} instr later"
                  f" (>= {ld['stall_cycles']:4d} stall cycles){' across the back edge' if ld['wrapped'] else ''}"
                  f"  [{ld['consumer']}]")
        d = [ld["stall_cycles"] for ld in a["loads"]]
        summary.append((name, res, a["n"], a["stall"], a["ops"].get("LDG", 0),
                        min(d) if d else None, max(d) if d else None))
    print("\nvariant            resources                              loop instr  stall cyc  LDG"
          "  load->first wait, stall cycles (min / max)")
    for name, res, n, st, nld, mind, maxd in summary:
        print(f"{name:18s} {res:38s} {n:10d} {st:10d} {nld:4d}  {mind} / {maxd}")


if __name__ == "__main__":
    main()
