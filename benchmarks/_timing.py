"""Timing helpers shared by the benchmark scripts: CUDA events, warm-up,
medians, inputs rotated past L2, and the device-to-device copy ceiling."""

from __future__ import annotations

import statistics

import cupy as cp

L2_ROTATION_BYTES = 256 * 2**20  # more than any GPU's L2: rotated inputs come from HBM


def rotation_count(input_bytes: int) -> int:
    return max(2, min(16, -(-L2_ROTATION_BYTES // max(input_bytes, 1))))


def graph_time_us(launch, buffers: int, launches_per_graph: int = 20, repeats: int = 15) -> float:
    """Median device time of one launch(i): `launches_per_graph` launches,
    i rotating over `buffers` inputs, captured into a CUDA graph and replayed,
    so host overhead stays out of the number."""
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        for i in range(3):  # warm-up: compile, load, first touch
            launch(i % buffers)
        stream.synchronize()
        stream.begin_capture()
        for i in range(launches_per_graph):
            launch(i % buffers)
        graph = stream.end_capture()
    graph.launch(stream)
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeats):
        start.record(stream)
        graph.launch(stream)
        stop.record(stream)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e3 / launches_per_graph)
    return statistics.median(times)


def copy_ceiling_gbps(nbytes: int = 2**30) -> float:
    """cudaMemcpyAsync device-to-device of 1 GiB, counting bytes read plus
    written: the card's practical memory bandwidth."""
    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    kind = cp.cuda.runtime.memcpyDeviceToDevice
    us = graph_time_us(
        lambda i: cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, kind,
                                              cp.cuda.get_current_stream().ptr),
        1, launches_per_graph=5)
    return 2 * nbytes / us / 1e3


def card_name() -> str:
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    return props["name"].decode()
