"""Checkpoint conversion on the GPU (`nvfp4-cupy convert`, docs/checkpoints.md):
the rate in GB/s of bf16 weights and the peak host memory, against the
targets >= 1 GB/s and < about 2x the largest tensor.

Builds a model directory of bf16 safetensors in a temporary directory
(--tensors shards of one [rows, 32768] Linear weight each, --tensor-gb GiB
per tensor; default 4 x [16384, 32768] = 4 GiB), reads it once so that the
input is in the page cache, then converts it with --format modelopt and
--format compressed-tensors, each in a subprocess of its own. The subprocess
compiles the kernels on a small weight first (not timed), then times
convert() while a thread samples its resident set (/proc/self/statm, every
2 ms): peak minus the resident set just before convert() is what the
conversion adds (ru_maxrss cannot say it: CUDA's start-up already peaks above
a streaming conversion). Reading and
quantizing run on the converter's producing thread, overlapped with writing
(convert.OneAhead): read s and quant s are that thread's time in
Quantizer.load (read + upload, staging.DeviceReader) and Quantizer.quantize
(amax + quantize kernels + download); write s is the writing thread's time,
its waits for the producer left out (write and fsync, beside the sha256 on
its own thread, and the rename). The same run measures the page cache's read
rate (the converter's parallel reads into memory faulted in beforehand) and
the output disk's write + fsync rate, the two host ceilings the conversion
can meet.

    python benchmarks/bench_checkpoint.py [--tensor-gb 1] [--tensors 4] [--json F] [--dir D]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COLUMNS = 32768  # K: a multiple of 16, as a large model's MLP
FORMATS = ("modelopt", "compressed-tensors")
TARGET_GBPS = 1.0
TARGET_MEMORY_RATIO = 2.0


def build_model(path: Path, tensors: int, rows: int) -> int:
    """Writes `tensors` shards with one bf16 [rows, COLUMNS] weight each (and an
    index and config.json) with the package's own streaming writer; returns the
    bytes of bf16 weights."""
    import ml_dtypes
    import numpy as np

    from nvfp4_cupy.checkpoint.safetensors_io import Planned, write_streaming

    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    chunk_rows = min(rows, 256)  # a 32 MiB random block, tiled: building must not dominate the run
    weight_map = {}
    for i in range(tensors):
        block = (rng.standard_normal((chunk_rows, COLUMNS), np.float32) * np.float32(0.02)).astype(ml_dtypes.bfloat16)
        weight = np.tile(block, (-(-rows // chunk_rows), 1))[:rows]
        name = f"model.layers.{i}.mlp.down_proj.weight"
        shard = f"model-{i + 1:05d}-of-{tensors:05d}.safetensors"
        write_streaming(path / shard, [Planned(name, "BF16", (rows, COLUMNS))], lambda p, w=weight: w, {"format": "pt"})
        weight_map[name] = shard
        del weight
    nbytes = tensors * rows * COLUMNS * 2
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": nbytes},
                                                                   "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  "torch_dtype": "bfloat16"}))
    return nbytes


def read_all(path: Path) -> tuple[int, float]:
    """(bytes, seconds) of reading every file under `path` once the way the
    converter reads (safetensors_io.read_pieces: several threads' preadv) into
    one buffer faulted in beforehand: the page cache's rate, not the cost of
    faulting in fresh memory."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from nvfp4_cupy.checkpoint.safetensors_io import READ_THREADS, read_pieces

    files = sorted(f for f in path.iterdir() if f.is_file())
    buffer = np.ones(max(f.stat().st_size for f in files), np.uint8)
    total, started = 0, time.perf_counter()
    with ThreadPoolExecutor(READ_THREADS) as pool:
        for f in files:
            size = f.stat().st_size
            fd = os.open(f, os.O_RDONLY)
            try:
                read_pieces(fd, memoryview(buffer)[:size], 0, f, pool)
            finally:
                os.close(fd)
            total += size
    return total, time.perf_counter() - started


def disk_write_gbps(directory: Path, nbytes: int = 1 << 30) -> float:
    """Write + fsync of `nbytes` into `directory`: the output side's ceiling."""
    data = os.urandom(1 << 26)
    target = directory / "disk_probe.bin"
    started = time.perf_counter()
    with open(target, "wb") as f:
        for _ in range(nbytes // len(data)):
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    target.unlink()
    return nbytes / seconds / 1e9


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class ResidentSampler:
    """Within `with`: the resident set's peak, sampled every 2 ms on a
    thread; `baseline` is the resident set on entry."""

    def __enter__(self):
        self.baseline = self.peak = resident_bytes()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def child(in_dir: str, out_dir: str, fmt: str, cpu: bool) -> None:
    """One conversion in this process: prints a JSON line."""
    import importlib

    import ml_dtypes
    import numpy as np

    module = importlib.import_module("nvfp4_cupy.checkpoint.convert")
    warm = np.random.default_rng(1).standard_normal((64, 256)).astype(ml_dtypes.bfloat16)
    module.Quantizer(cpu=cpu).quantize(warm, None)  # kernels compiled (or loaded) before timing
    rss = ResidentSampler()
    spent = {"read": 0.0, "quantize": 0.0, "waiting": 0.0}
    real_load, real_quantize, real_take = module.Quantizer.load, module.Quantizer.quantize, module.OneAhead.__call__

    def timed_load(self, path, info):
        started = time.perf_counter()
        try:
            return real_load(self, path, info)
        finally:
            spent["read"] += time.perf_counter() - started

    def timed_quantize(self, w, gs):
        started = time.perf_counter()
        try:
            return real_quantize(self, w, gs)
        finally:
            spent["quantize"] += time.perf_counter() - started

    def timed_take(self, p):  # the writer waiting for the producing thread
        started = time.perf_counter()
        try:
            return real_take(self, p)
        finally:
            spent["waiting"] += time.perf_counter() - started

    module.Quantizer.load, module.Quantizer.quantize, module.OneAhead.__call__ = timed_load, timed_quantize, timed_take
    started = time.perf_counter()
    with rss:
        report = module.convert(in_dir, out_dir, fmt, cpu=cpu, progress=False)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "read_s": spent["read"], "quantize_s": spent["quantize"],
                      "write_s": seconds - spent["waiting"], "bytes_read": report.bytes_read,
                      "quantized": report.quantized, "baseline_rss_bytes": rss.baseline,
                      "peak_rss_bytes": rss.peak,
                      "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_child(in_dir: Path, out_dir: Path, fmt: str, cpu: bool) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(in_dir), str(out_dir), fmt]
                          + (["--cpu"] if cpu else []), capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"bench_checkpoint: the {fmt} conversion failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-gb", type=float, default=1.0, help="GiB per bf16 weight (default %(default)s)")
    parser.add_argument("--tensors", type=int, default=4, help="weights, one shard each (default %(default)s)")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary model goes (default: $TMPDIR)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: print only)")
    parser.add_argument("--cpu", action="store_true",
                        help="the golden model instead of the GPU (slow: only to check this script without a GPU)")
    parser.add_argument("--child", nargs=3, metavar=("IN", "OUT", "FORMAT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child, cpu=args.cpu)
        return 0
    rows = int(args.tensor_gb * 2**30) // (2 * COLUMNS)
    if rows < 1 or args.tensors < 1:
        parser.error(f"--tensor-gb {args.tensor_gb} --tensors {args.tensors}: at least one row and one tensor")
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"cannot write {args.json}: {args.json.parent} is not a directory")
    if args.cpu:
        card = "cpu (golden model)"
    else:
        from nvfp4_cupy._bench import card_name

        card = card_name()
    work = Path(tempfile.mkdtemp(prefix="bench_checkpoint_", dir=args.dir))
    try:
        started = time.perf_counter()
        nbytes = build_model(work / "model", args.tensors, rows)
        built = time.perf_counter() - started
        read_all(work / "model")  # into the page cache
        cached_bytes, cached_s = read_all(work / "model")
        disk = disk_write_gbps(work)
        largest = rows * COLUMNS * 2
        print(f"card {card}; model: {args.tensors} x bf16 [{rows}, {COLUMNS}] = {nbytes / 2**30:.2f} GiB "
              f"(built in {built:.1f} s, {work}); page-cache read {cached_bytes / cached_s / 1e9:.1f} GB/s, "
              f"disk write + fsync {disk:.1f} GB/s")
        results = []
        for fmt in FORMATS:
            out = work / fmt
            row = run_child(work / "model", out, fmt, args.cpu)
            row.update(format=fmt, gbps=nbytes / row["seconds"] / 1e9, output_bytes=sum(
                f.stat().st_size for f in out.iterdir() if f.is_file()))
            row["memory_ratio"] = row["peak_rss_bytes"] / largest
            row["memory_ratio_above_baseline"] = (row["peak_rss_bytes"] - row["baseline_rss_bytes"]) / largest
            results.append(row)
            shutil.rmtree(out)
        print(f"{'format':<20}{'GB/s':>7}{'s':>8}{'read s':>8}{'quant s':>8}{'write s':>8}"
              f"{'peak RSS GiB':>14}{'x largest':>11}{'base GiB':>10}{'(peak-base)/largest':>21}")
        for r in results:
            print(f"{r['format']:<20}{r['gbps']:>7.2f}{r['seconds']:>8.2f}{r['read_s']:>8.2f}{r['quantize_s']:>8.2f}"
                  f"{r['write_s']:>8.2f}{r['peak_rss_bytes'] / 2**30:>14.2f}{r['memory_ratio']:>11.2f}"
                  f"{r['baseline_rss_bytes'] / 2**30:>10.2f}{r['memory_ratio_above_baseline']:>21.2f}")
        rate_ok = all(r["gbps"] >= TARGET_GBPS for r in results)
        # judged above the baseline: what the conversion adds, the part that grows with the tensors
        memory_ok = all(r["memory_ratio_above_baseline"] < TARGET_MEMORY_RATIO for r in results)
        print(f"targets: >= {TARGET_GBPS} GB/s of bf16 weights: {'met' if rate_ok else 'NOT met'}; peak host memory "
              f"above the baseline < {TARGET_MEMORY_RATIO}x the largest tensor ({largest / 2**30:.2f} GiB): "
              f"{'met' if memory_ok else 'NOT met'} (baseline: the process once CUDA, CuPy and the kernels are "
              "loaded, before the conversion; it does not grow with the model)")
        report = {"card": card, "date": time.strftime("%Y-%m-%d"), "tensors": args.tensors, "shape": [rows, COLUMNS],
                  "dtype": "bfloat16", "weight_bytes": nbytes, "largest_tensor_bytes": largest,
                  "page_cache_read_gbps": cached_bytes / cached_s / 1e9, "disk_write_fsync_gbps": disk,
                  "targets": {"gbps": TARGET_GBPS, "memory_ratio": TARGET_MEMORY_RATIO, "rate_met": rate_ok,
                              "memory_met": memory_ok},
                  "results": results}
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=1))
            print(f"wrote {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
