"""``alignmamba bench``: time and peak memory of AlignMamba against the baselines vs length.

The paper's efficiency comparison (SPEC section 4: 6.4k tokens, single- and multi-stream
Transformers) as a command. For every model and total token length L:

* the L tokens are split over text / audio / vision in MOSI's unaligned proportions
  50 : 375 : 500 (text = round(L 50/925), audio = round(L 375/925), vision = the rest),
  with MOSI's feature widths (768, 5, 20), random values, no padding;
* time: median over ``repeats`` calls after ``warmup`` calls, of one forward pass
  (``inference``, under ``torch.inference_mode``) or one training step (``train``:
  forward, backward, AdamW step); CUDA events on the GPU, ``perf_counter`` on the CPU;
* peak memory: on CUDA the caching allocator's peak (``max_memory_allocated`` after
  ``reset_peak_memory_stats``, weights and inputs included); on the CPU the growth of the
  process's peak resident set (:class:`PeakRSS`: the kernel's VmHWM, reset at the baseline,
  or ``ru_maxrss``) over a baseline taken after imports, model build, input creation and
  one call on a few tokens (which absorbs the libraries' lazy set-up), in a fresh
  subprocess per point (memory freed by an earlier point stays resident in the C heap and
  would hide this one's). The CPU figure counts activations and temporaries, not weights,
  and misses memory the C allocator already held (a few MB: tiny points can read 0);
* a point that runs out of memory is recorded with status ``"oom"`` (time and memory
  null) and the model is not tried at longer lengths;
* ``ratio_time`` / ``ratio_mem``: the model's figure over AlignMamba's at the same length
  in the same run (null when either is missing).

Nothing here depends on a particular scan kernel: the Mamba layers use whatever the scan
dispatcher picks (``--scan-backend`` forces one).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ["alignmamba", "transformer_single", "transformer_multi", "mamba_single", "mamba_multi"]
GPU_LENGTHS = [800, 1600, 3200, 6400, 12800, 25600, 65536]
CPU_LENGTHS = [256, 512, 1024, 2048]
# MOSI unaligned: 50 text steps, 375 audio frames, 500 video frames (SPEC section 2).
PROPORTIONS = {"text": 50, "audio": 375, "vision": 500}
WIDTHS = {"text": 768, "audio": 5, "vision": 20}
RESULT_MARKER = "ALIGNMAMBA_BENCH_RESULT "


@dataclass
class BenchSettings:
    """What every point of one run shares."""

    device: str = "cpu"  # "cpu" | "cuda"
    dtype: str = "fp32"  # "fp32" | "bf16" (bf16 = autocast, weights stay fp32)
    mode: str = "inference"  # "inference" | "train"
    batch: int = 1
    d_model: int = 256
    layers: int = 4
    repeats: int = 5
    warmup: int = 2
    scan_backend: str | None = None  # None: the dispatcher's choice
    threads: int = 0  # torch CPU threads; 0 = torch's default
    seed: int = 0
    cuda_graphs: bool = False  # inference on CUDA: capture one forward in a CUDA graph, time replays


def split_length(total: int) -> dict[str, int]:
    """Tokens per modality for a total length, MOSI proportions 50:375:500 (each >= 1)."""
    s = sum(PROPORTIONS.values())
    text = max(1, round(total * PROPORTIONS["text"] / s))
    audio = max(1, round(total * PROPORTIONS["audio"] / s))
    return {"text": text, "audio": audio, "vision": max(1, total - text - audio)}


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def _build(model_name: str, s: BenchSettings):
    from .model import AlignMambaConfig, build_model

    cfg = AlignMambaConfig(model=model_name, modalities=list(PROPORTIONS), input_dims=dict(WIDTHS),
                           d_model=s.d_model, n_layers=s.layers, scan_backend=s.scan_backend)
    return build_model(cfg)


def _rss_peak_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB, macOS bytes


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    raise OSError(f"/proc/self/status has no {key}")


class PeakRSS:
    """Peak resident-set growth of this process between ``start()`` and ``stop()`` (bytes).

    Linux: resets the kernel's high-water mark (write "5" to /proc/self/clear_refs) and reads
    VmHWM, so the figure belongs to this interval alone. ``ru_maxrss`` is not enough there:
    a child inherits its parent's maxrss across fork + exec, which hides the growth of a
    worker whose peak stays below its parent's resident size. Elsewhere: ru_maxrss growth.
    """

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
            self.base = _proc_status_bytes("VmRSS")
        except OSError:
            self.method = "ru_maxrss"
            self.base = _rss_peak_bytes()

    def stop(self) -> int:
        peak = _proc_status_bytes("VmHWM") if self.method == "VmHWM" else _rss_peak_bytes()
        return max(0, peak - self.base)


def measure_point(model_name: str, length: int, s: BenchSettings) -> dict[str, Any]:
    """Build ``model_name``, run ``s.warmup`` + ``s.repeats`` calls at ``length`` total tokens.

    Returns ``{"model", "length", "time_ms", "peak_mem_bytes", "status"}`` with status
    "ok" or "oom" (time and memory None then). Runs in the calling process; on the CPU
    the memory figure is the growth of this process's peak RSS, which is only a lower
    bound when an earlier point in the same process peaked higher (see ``run_bench``).
    """
    import torch

    rec: dict[str, Any] = {"model": model_name, "length": int(length), "time_ms": None,
                           "peak_mem_bytes": None, "status": "ok"}
    device = torch.device(s.device)
    cuda = device.type == "cuda"
    if s.threads > 0:
        torch.set_num_threads(s.threads)
    model = opt = feats = step = None
    try:
        torch.manual_seed(s.seed)
        model = _build(model_name, s).to(device)
        lens = split_length(length)
        g = torch.Generator(device="cpu").manual_seed(s.seed)
        feats = {m: torch.randn(s.batch, n, WIDTHS[m], generator=g).to(device) for m, n in lens.items()}
        # No padding, and every model is told so by masks=None: that spares the baselines'
        # padding checks (host syncs, which would also block CUDA-graph capture).
        if s.mode == "train":
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        else:
            model.eval()

        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.dtype == "bf16")

        def step() -> None:
            if s.mode == "inference":
                with torch.inference_mode(), autocast():
                    model(feats, None)
                return
            with autocast():
                out = model(feats, None)
            loss = out.pred.float().square().mean() + out.align_loss.float()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        graphed = False
        if cuda and s.cuda_graphs and s.mode == "inference":
            # the replays allocate nothing: the peak is that of the warm-up and the capture
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step, graphed, note = _graphed(step, device)
            rec["cuda_graph"] = graphed
            if note:
                rec["note"] = note
        if cuda:
            torch.cuda.synchronize(device)
        else:
            # One call on a few tokens first, so that the libraries' one-off lazy set-up (kernel
            # code pages, thread pools, workspaces: ~15 MB) is not counted as this point's memory.
            small = split_length(min(12, length))
            with torch.inference_mode():
                model({m: x[:, :small[m]] for m, x in feats.items()}, None)
        rss = PeakRSS()
        rss.start()
        for _ in range(s.warmup):
            step()
        times: list[float] = []
        if cuda:
            torch.cuda.synchronize(device)
            if not graphed:
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(s.repeats):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            peak = int(torch.cuda.max_memory_allocated(device))
        else:
            for _ in range(s.repeats):
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) * 1e3)
            peak = rss.stop()
        rec["time_ms"] = float(statistics.median(times))
        rec["peak_mem_bytes"] = peak
    except Exception as e:  # only out-of-memory is recorded; anything else is a bug and propagates
        if not _is_oom(e):
            raise
        rec["status"] = "oom"
    finally:
        # drop the references before freeing the cache, so an OOM point leaves the device clean
        model = opt = feats = step = None  # step may hold a CUDA graph and its memory pool
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rec


def _graphed(step, device):
    """(replay, True, None) for ``step`` captured in a CUDA graph (fixed inputs and shapes, so
    one capture serves every timed call), or (step, False, why) when the forward cannot be
    captured (a host sync or a data-dependent shape, as in the baselines' padding packing)."""
    from .graphs import capture_failure, capture_graph

    try:
        graph, _ = capture_graph(step, device)
    except Exception as e:  # noqa: BLE001 - any capture failure means "run it eagerly"
        return step, False, f"{capture_failure(e)}; eager"
    return graph.replay, True, None


def measure_point_subprocess(model_name: str, length: int, s: BenchSettings,
                             timeout: float | None = None) -> dict[str, Any]:
    """:func:`measure_point` in a fresh Python process (clean peak-RSS baseline).

    A worker killed by SIGKILL (the kernel's out-of-memory killer) is recorded as "oom";
    any other failure raises with the worker's last lines of stderr.
    """
    payload = json.dumps({"model": model_name, "length": int(length), "settings": asdict(s)})
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-m", "alignmamba.bench", "--point", payload],
                          capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if proc.returncode == -9:
        return {"model": model_name, "length": int(length), "time_ms": None, "peak_mem_bytes": None,
                "status": "oom", "note": "worker killed (SIGKILL, presumably the OOM killer)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"bench worker for {model_name} at {length} tokens failed "
                           f"(exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARKER):])


def _worker_main(argv: list[str]) -> int:
    """Entry of ``python -m alignmamba.bench --point JSON`` (one point, result on stdout)."""
    if len(argv) != 2 or argv[0] != "--point":
        print("usage: python -m alignmamba.bench --point JSON", file=sys.stderr)
        return 2
    spec = json.loads(argv[1])
    rec = measure_point(spec["model"], spec["length"], BenchSettings(**spec["settings"]))
    print(RESULT_MARKER + json.dumps(rec), flush=True)
    return 0


def add_ratios(results: list[dict[str, Any]], reference: str = "alignmamba") -> None:
    """Set ``ratio_time`` / ``ratio_mem`` of every record: its value over ``reference``'s at
    the same length (None when either is not "ok" or the reference was not run)."""
    ref = {r["length"]: r for r in results if r["model"] == reference and r["status"] == "ok"}
    for r in results:
        base = ref.get(r["length"])
        for key, out in (("time_ms", "ratio_time"), ("peak_mem_bytes", "ratio_mem")):
            ok = base is not None and r["status"] == "ok" and r[key] is not None and base[key]
            r[out] = float(r[key] / base[key]) if ok else None


def device_name(device: str) -> str:
    """A human-readable name of the device (GPU model, or CPU model and core count)."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores)"


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def run_bench(settings: BenchSettings, models: list[str], lengths: list[int], isolate: bool | None = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every (length, model) point; returns the report dict written as JSON.

    ``isolate`` (default: True on the CPU and with CUDA graphs, False otherwise on CUDA) runs
    each point in a fresh subprocess; eager CUDA needs no isolation because its allocator peak
    is reset per point.
    """
    import torch

    if isolate is None:
        # CUDA graphs keep private memory pools that are not handed back inside one process:
        # without a fresh process per point their memory would pile up from point to point
        isolate = settings.device == "cpu" or settings.cuda_graphs
    load_before = _load_average()
    results: list[dict[str, Any]] = []
    oom_at: dict[str, int] = {}
    for length in lengths:
        for name in models:
            if name in oom_at:
                rec = {"model": name, "length": int(length), "time_ms": None, "peak_mem_bytes": None,
                       "status": "oom", "note": f"not run: out of memory at {oom_at[name]} tokens"}
            elif isolate:
                rec = measure_point_subprocess(name, length, settings)
            else:
                rec = measure_point(name, length, settings)
            if rec["status"] == "oom":
                oom_at.setdefault(name, int(length))
            results.append(rec)
            t = f"{rec['time_ms']:.2f} ms" if rec["time_ms"] is not None else "-"
            mem = f"{rec['peak_mem_bytes'] / 2**20:.1f} MiB" if rec["peak_mem_bytes"] is not None else "-"
            log(f"  {name:<20} L={length:<6} {rec['status']:<4} {t:>12} {mem:>14}")
    add_ratios(results)
    if settings.device == "cpu":
        probe = PeakRSS()
        probe.start()
        method = (f"cpu_peak_rss_growth_subprocess ({probe.method})" if isolate else
                  f"cpu_peak_rss_growth_in_process ({probe.method}; a lower bound: memory freed by "
                  "earlier points stays in the C heap)")
    else:
        method = "cuda_max_memory_allocated (weights and inputs included)"
    return {
        "device": settings.device,
        "device_name": device_name(settings.device),
        "torch_version": torch.__version__,
        "dtype": settings.dtype,
        "batch": settings.batch,
        "d_model": settings.d_model,
        "layers": settings.layers,
        "mode": settings.mode,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "scan_backend": settings.scan_backend,
        "cuda_graphs": settings.cuda_graphs,
        "threads": settings.threads or torch.get_num_threads(),
        "token_split": "text:audio:vision = 50:375:500 (MOSI unaligned)",
        "memory_method": method,
        # 1-minute load average before and after: other work on the machine skews CPU timings
        "load_average": [load_before, _load_average()],
        "date": _dt.date.today().isoformat(),
        "command": None,  # filled in by the CLI
        "models": list(models),
        "lengths": [int(x) for x in lengths],
        "results": results,
    }


def format_markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table (one row per point, grouped by length)."""
    unit = "step" if report["mode"] == "train" else "forward"
    header = (f"| model | tokens | status | time/{unit} (ms) | peak mem (MiB) | time / AlignMamba | "
              "mem / AlignMamba |")
    lines = [header, "|---|---:|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        t = f"{r['time_ms']:.2f}" if r["time_ms"] is not None else "-"
        m = f"{r['peak_mem_bytes'] / 2**20:.1f}" if r["peak_mem_bytes"] is not None else "-"
        rt = f"{r['ratio_time']:.2f}x" if r.get("ratio_time") is not None else "-"
        rm = f"{r['ratio_mem']:.2f}x" if r.get("ratio_mem") is not None else "-"
        lines.append(f"| {r['model']} | {r['length']} | {r['status']} | {t} | {m} | {rt} | {rm} |")
    return "\n".join(lines)


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Time and peak memory against total tokens, log-log, one line per model (PNG)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .errors import AlignMambaError
        raise AlignMambaError(f"--plot {path}: drawing needs matplotlib (pip install 'alignmamba[plot]')") from None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in report["models"]:
        rows = [r for r in report["results"] if r["model"] == name and r["status"] == "ok"]
        if not rows:
            continue
        x = [r["length"] for r in rows]
        axes[0].plot(x, [r["time_ms"] for r in rows], marker="o", label=name)
        mem = [(r["length"], r["peak_mem_bytes"] / 2**20) for r in rows if r["peak_mem_bytes"] > 0]
        if mem:
            axes[1].plot(*zip(*mem), marker="o", label=name)
    unit = "step" if report["mode"] == "train" else "forward"
    axes[0].set_ylabel(f"median time per {unit} (ms)")
    axes[1].set_ylabel("peak memory (MiB)" + (" (RSS growth)" if report["device"] == "cpu" else ""))
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("total tokens (text:audio:vision = 50:375:500)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    threads = f", {report['threads']} thread(s)" if report["device"] == "cpu" and report.get("threads") else ""
    fig.suptitle(f"{report['device_name']}{threads}, {report['dtype']}, batch {report['batch']}, "
                 f"d {report['d_model']}, {report['layers']} layers, {report['mode']}", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------ CLI

def _int_list(text: str, arg: str) -> list[int]:
    from .errors import ConfigError
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise ConfigError(f"{arg} {text!r}: expected comma-separated integers, e.g. 800,1600,3200") from None
    if not vals or any(v < 3 for v in vals):
        raise ConfigError(f"{arg} {text!r}: every length must be >= 3 (one token per modality)")
    return vals


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``alignmamba bench``."""
    p = sub.add_parser("bench", help="time and peak memory of AlignMamba and the baselines against length")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--lengths", help="comma-separated total token counts (default: "
                   f"{','.join(map(str, GPU_LENGTHS))} on cuda, {','.join(map(str, CPU_LENGTHS))} on cpu)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--models", nargs="+", help=f"models to measure (default: {' '.join(DEFAULT_MODELS)})")
    p.add_argument("--mode", choices=["inference", "train"], default="inference")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--d-model", dest="d_model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per point (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--scan-backend", dest="scan_backend", help="force a Mamba scan backend (default: auto)")
    p.add_argument("--cuda-graphs", dest="cuda_graphs", action="store_true",
                   help="inference on cuda: time replays of a CUDA graph of the forward (every model; one "
                        "that cannot be captured runs eagerly and says so in the JSON 'note')")
    p.add_argument("--in-process", dest="in_process", action="store_true",
                   help="on cpu, measure in this process (faster; memory then a lower bound)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--plot", help="write a PNG of time and memory against length (log-log)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(a: argparse.Namespace) -> int:
    """Run the benchmark from parsed CLI arguments."""
    import torch

    from . import baselines  # noqa: F401  (registers the baselines in MODELS)
    from .errors import ConfigError
    from .model import MODELS

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    models: list[str] = []
    for item in a.models or DEFAULT_MODELS:
        models += [m for m in item.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ConfigError(f"--models: unknown model '{unknown[0]}' (known: {', '.join(sorted(MODELS))})")
    lengths = _int_list(a.lengths, "--lengths") if a.lengths else (GPU_LENGTHS if device == "cuda" else CPU_LENGTHS)
    for name in ("batch", "d_model", "layers", "repeats"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(a, name)}")
    if a.threads < 0:
        raise ConfigError(f"--threads: must be >= 0, got {a.threads}")
    if a.warmup < 0:
        raise ConfigError(f"--warmup: must be >= 0, got {a.warmup}")
    s = BenchSettings(device=device, dtype=a.dtype or ("bf16" if device == "cuda" else "fp32"), mode=a.mode,
                      batch=a.batch, d_model=a.d_model, layers=a.layers, repeats=a.repeats, warmup=a.warmup,
                      scan_backend=a.scan_backend, threads=a.threads, cuda_graphs=a.cuda_graphs)
    print(f"bench on {device_name(device)}: {s.mode}, {s.dtype}, batch {s.batch}, d {s.d_model}, "
          f"{s.layers} layers, lengths {lengths}, load average {_load_average()}", flush=True)
    report = run_bench(s, models, lengths, isolate=False if a.in_process else None,
                       log=lambda line: print(line, flush=True))
    report["command"] = "alignmamba " + " ".join(sys.argv[1:])
    print()
    print(format_markdown(report))
    if a.json:
        from .checkpoint import atomic_write_json
        atomic_write_json(a.json, report)
        print(f"wrote {a.json}")
    if a.plot:
        plot_report(report, a.plot)
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
