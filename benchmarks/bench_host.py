"""What a call costs the host, against the frameworks' own ops, in one run on
one card: host microseconds per call (1 x 4096 bf16; the calls take turns,
31 rounds of 500 back-to-back calls each, so that the shared host's drift
reaches every row alike: best sample, median, and the median ratio to
torch's and CuPy's own `x * 2` within a round), a mid-size call through
torch against the kernel's graph time (eager calls interleaved the same
way), a torch.compile'd function that calls our op (its time and whether
dynamo broke the graph), a captured CUDA graph of a decode step checked
bit-exact against eager, and a cProfile of the torch call.

    python benchmarks/bench_host.py [--json F] [--profile F]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402
import torch  # noqa: E402

import nvfp4_cupy as nv  # noqa: E402
import nvfp4_cupy.torch as nvt  # noqa: E402

CALLS, ROUNDS = 2000, 5
# The host this runs on is shared: the same call's time drifts by 1.5x over
# minutes (BENCHMARKS.md). The table's calls therefore take turns, ROUNDS_INTERLEAVED
# rounds of CALLS_PER_SAMPLE calls each, so that a drift reaches every row alike;
# each row reports its best sample and, against the frameworks' own ops, the
# median over rounds of the ratio within a round.
CALLS_PER_SAMPLE, ROUNDS_INTERLEAVED = 500, 31


def host_us(call) -> float:
    """Best of ROUNDS of the mean host time of CALLS back-to-back calls."""
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(CALLS):
            call()
        best = min(best, (time.perf_counter() - started) * 1e6 / CALLS)
        torch.cuda.synchronize()
    return best


def interleaved_samples(calls: dict, per_sample: int, rounds: int, wait_for_device: bool) -> dict[str, list[float]]:
    """{label: microseconds per call of each round's sample}: every call's
    sample in every round, the calls taking turns. wait_for_device: a
    sample's time includes the device finishing its calls (wall time of
    eager work); otherwise the device is synchronized between samples,
    outside the timing (host time)."""
    for call in calls.values():
        for _ in range(20):
            call()
    torch.cuda.synchronize()
    samples = {label: [] for label in calls}
    for _ in range(rounds):
        for label, call in calls.items():
            started = time.perf_counter()
            for _ in range(per_sample):
                call()
            if wait_for_device:
                torch.cuda.synchronize()
            samples[label].append((time.perf_counter() - started) * 1e6 / per_sample)
            if not wait_for_device:
                torch.cuda.synchronize()
    return samples


def median_ratio(samples: list[float], baseline: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(samples, baseline))


def graph_us(call, launches: int = 20, repeats: int = 15) -> float:
    """Median device microseconds per call, from replays of a captured graph."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            call()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3 / launches)
    return statistics.median(times)


def quantize_launches() -> dict:
    """quantize() of m x 4096 bf16 (device time from graphs, host time per
    call) in one launch (the kernel derives the global scale, every thread
    block reading all of x) and in two (compute_global_scale, then the
    quantizer), on both sides of ONE_LAUNCH_MAX_BLOCKS: where one launch
    stops paying."""
    from nvfp4_cupy.ops import quantize as module

    limit = module.ONE_LAUNCH_MAX_BLOCKS
    table = {"limit_blocks": limit}
    print(f"quantize(m x 4096 bf16): one launch vs two (ONE_LAUNCH_MAX_BLOCKS = {limit} blocks)")
    print(f"{'m':>5} {'blocks':>7} {'1 launch graph us':>18} {'2 launches graph us':>20} {'1 launch host us':>17} "
          f"{'2 launches host us':>19}")
    try:
        for m in (1, 4, 8, 16, 32, 64):
            x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            row = {}
            for name, forced in (("one", 1 << 40), ("two", 0)):
                module.ONE_LAUNCH_MAX_BLOCKS = forced
                module._repeats.clear()  # the repeated-call path remembers the path taken
                row[f"{name}_graph_us"] = graph_us(lambda: nvt.quantize(x))
                row[f"{name}_host_us"] = host_us(lambda: nvt.quantize(x))
            table[m] = row
            print(f"{m:>5} {m * 256:>7} {row['one_graph_us']:>18.2f} {row['two_graph_us']:>20.2f} "
                  f"{row['one_host_us']:>17.1f} {row['two_host_us']:>19.1f}", flush=True)
    finally:
        module.ONE_LAUNCH_MAX_BLOCKS = limit
        module._repeats.clear()
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("bench_host.json"))
    parser.add_argument("--profile", type=Path, default=None, help="write the cProfile of the torch calls here")
    args = parser.parse_args()
    card = torch.cuda.get_device_name()
    print(f"card {card}, torch {torch.__version__}, cupy {cp.__version__}, {time.strftime('%Y-%m-%d')}")

    xt = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    xc = cp.from_dlpack(xt)
    gs_t = torch.tensor([100.0], device="cuda")
    gs_c = cp.from_dlpack(gs_t)
    given_c, given_t = nv.scaled_fp4_quant(xc, 100.0), nvt.scaled_fp4_quant(xt, 100.0)  # outputs to reuse
    rows = [
        ("torch x * 2 (torch's own op)", lambda: xt * 2),
        ("cupy x * 2 (CuPy's own op)", lambda: xc * 2),
        ("scaled_fp4_quant(cupy x, 100.0)", lambda: nv.scaled_fp4_quant(xc, 100.0)),
        ("scaled_fp4_quant(cupy x, device gs)", lambda: nv.scaled_fp4_quant(xc, gs_c)),
        ("quantize(cupy x)", lambda: nv.quantize(xc)),
        ("scaled_fp4_quant(torch x, 100.0)", lambda: nv.scaled_fp4_quant(xt, 100.0)),
        ('scaled_fp4_quant(torch x, 100.0, like="torch")', lambda: nv.scaled_fp4_quant(xt, 100.0, like="torch")),
        ('scaled_fp4_quant(torch x, device gs, like="torch")', lambda: nv.scaled_fp4_quant(xt, gs_t, like="torch")),
        ('quantize(torch x, like="torch")', lambda: nv.quantize(xt, like="torch")),
        ("nvfp4_cupy.torch.scaled_fp4_quant(x, 100.0)", lambda: nvt.scaled_fp4_quant(xt, 100.0)),
        ("nvfp4_cupy.torch.scaled_fp4_quant(x, device gs)", lambda: nvt.scaled_fp4_quant(xt, gs_t)),
        ("nvfp4_cupy.torch.quantize(x)", lambda: nvt.quantize(xt)),
        ("nvfp4_cupy.torch.compute_global_scale(x)", lambda: nvt.compute_global_scale(xt)),
        ("scaled_fp4_quant(cupy x, 100.0, out=, out_scale=)",
         lambda: nv.scaled_fp4_quant(xc, 100.0, out=given_c[0], out_scale=given_c[1])),
        ("nvfp4_cupy.torch.scaled_fp4_quant(x, 100.0, out=, out_scale=)",
         lambda: nvt.scaled_fp4_quant(xt, 100.0, out=given_t[0], out_scale=given_t[1])),
        ("torch.ops.nvfp4.scaled_fp4_quant(x, device gs)",
         lambda: torch.ops.nvfp4.scaled_fp4_quant(xt, gs_t, 0.0, None, "swizzled", "nvfp4")),
        ("torch.ops.nvfp4.quantize(x)", lambda: torch.ops.nvfp4.quantize(xt, None, "swizzled", False)),
    ]
    # The floors under our torch call: its prepared launch alone (one struct
    # pack + cuLaunchKernel), and that plus the two output allocations.
    from nvfp4_cupy.ops.quantize import prepare_quantize

    launch, (packed, scales) = prepare_quantize(xt, 100.0, True, None, None, None, None, None, "torch", "nvfp4")
    rows += [
        ("floor: the prepared launch alone", launch),
        ("floor: 2 x torch.empty + the prepared launch",
         lambda: (torch.empty(packed.shape, dtype=torch.uint8, device="cuda"),
                  torch.empty(scales.shape, dtype=torch.uint8, device="cuda"), launch())),
    ]
    results = {"card": card, "torch": torch.__version__, "cupy": cp.__version__, "host_us": {},
               "host_us_median": {}, "ratio_to_torch_op": {}, "ratio_to_cupy_op": {}}
    samples = interleaved_samples(dict(rows), CALLS_PER_SAMPLE, ROUNDS_INTERLEAVED, wait_for_device=False)
    torch_op, cupy_op = samples[rows[0][0]], samples[rows[1][0]]
    print(f"host time per call, {ROUNDS_INTERLEAVED} interleaved rounds of {CALLS_PER_SAMPLE} calls; "
          "ratios: median over rounds of the ratio within a round")
    print(f"{'call (1 x 4096 bf16)':<52} {'best us':>8} {'median us':>10} {'/ torch op':>11} {'/ cupy op':>10}")
    for label, _ in rows:
        mine = samples[label]
        results["host_us"][label] = best = min(mine)
        results["host_us_median"][label] = median = statistics.median(mine)
        results["ratio_to_torch_op"][label] = to_torch = median_ratio(mine, torch_op)
        results["ratio_to_cupy_op"][label] = to_cupy = median_ratio(mine, cupy_op)
        print(f"{label:<52} {best:>8.2f} {median:>10.2f} {to_torch:>10.2f}x {to_cupy:>9.2f}x", flush=True)

    big = torch.randn(4096, 7168, device="cuda", dtype=torch.bfloat16)
    packed, scales = nvt.scaled_fp4_quant(big, 100.0)
    out = dict(out=packed, out_scale=scales)
    eager = interleaved_samples({
        "torch eager us (outputs given)": lambda: nvt.scaled_fp4_quant(big, gs_t, **out),
        "torch eager us (allocating)": lambda: nvt.scaled_fp4_quant(big, gs_t),
        "cupy eager us (allocating)": lambda: nv.scaled_fp4_quant(cp.from_dlpack(big), 100.0),
    }, 200, 11, wait_for_device=True)
    mid = {"kernel graph us": graph_us(lambda: nvt.scaled_fp4_quant(big, gs_t, **out)),
           **{label: statistics.median(values) for label, values in eager.items()}}
    results["4096x7168"] = mid
    print("4096 x 7168 bf16: " + ", ".join(f"{k} {v:.1f}" for k, v in mid.items()))

    results["quantize_launches"] = quantize_launches()

    def step(x, gs):
        return nvt.scaled_fp4_quant(x * 2, gs)

    explanation = torch._dynamo.explain(step)(xt, gs_t)
    compiled = torch.compile(step, fullgraph=True)
    results["torch.compile"] = {
        "graph_breaks": explanation.graph_break_count,
        "host_us": host_us(lambda: compiled(xt, gs_t)),
        "eager_host_us": host_us(lambda: step(xt, gs_t)),
    }
    print(f"torch.compile(x * 2 -> scaled_fp4_quant): graph breaks {explanation.graph_break_count}, "
          f"{results['torch.compile']['host_us']:.1f} us/call (eager {results['torch.compile']['eager_host_us']:.1f})")

    decode = torch.randn(8, 7168, device="cuda", dtype=torch.bfloat16)

    def decode_step():
        q = nvt.scaled_fp4_quant(decode * 2, gs_t)
        return q[0].to(torch.int32).sum(dim=1), q[0], q[1]

    for _ in range(3):
        decode_step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_step()
    decode.copy_(torch.randn_like(decode))
    graph.replay()
    torch.cuda.synchronize()
    eager = decode_step()
    exact = all(torch.equal(a, b) for a, b in zip(captured, eager))
    results["decode_graph_bit_exact"] = exact
    print(f"captured decode step (x * 2 -> quantize -> sum), replayed on new input: bit-exact vs eager: {exact}")

    if args.profile:
        # The torch calls side by side: what a device scale and quantize()'s
        # third output add to the host-scale call, function by function.
        with args.profile.open("w") as file:
            for label in ("nvfp4_cupy.torch.scaled_fp4_quant(x, 100.0)",
                          "nvfp4_cupy.torch.scaled_fp4_quant(x, device gs)", "nvfp4_cupy.torch.quantize(x)"):
                call = dict(rows)[label]
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(CALLS):
                    call()
                profiler.disable()
                file.write(f"== {label}, {CALLS} calls\n")
                pstats.Stats(profiler, stream=file).sort_stats("tottime").print_stats(12)
    args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
