"""Bounded soak on loopback: 200 mixed requests from 4 concurrent clients against one in-process worker.

The server app runs in this process (uvicorn in a thread, real HTTP on 127.0.0.1 only) around the tiny checkpoint.
Asserts: no error except deliberate 503s (a small queue; the client retries them), resident memory after the run
within 10 % of what it was after the first 20 requests, and every greedy answer identical to the same request served
alone. Prints the numbers. Every loop is bounded (request count and a wall-clock deadline).
"""

from __future__ import annotations

import collections
import os
import threading
import time

import numpy as np
import pytest
from serving import serve_in_thread

from M3DAssistantLib.geometry import RasRoi
from M3DAssistantLib.results import SamplingOptions
from M3DAssistantLib.serving.client import M3DClient, ServerBusyError
from M3DAssistantLib.volume_io import read_volume

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS, WARMUP = 4, 200, 20
DEADLINE_S = 200.0
GREEDY = SamplingOptions(max_new_tokens=8)


def _requests(roi: RasRoi) -> list[tuple[str, tuple]]:
    """The distinct requests of the mix: (method, args)."""
    return [
        ("report", ()),
        ("ask", ("Is the liver enlarged?",)),
        ("ask", ("What organ is in the upper right?",)),
        ("choose", ("Which plane is this?", ["Axial", "Coronal", "Sagittal", "Oblique"])),
        ("choose", ("Is there a lesion?", ["Yes", "No"])),
        ("locate", ("liver",)),
        ("describe_region", (roi,)),
        ("segment", ("liver",)),
        ("segment_expression", ("the largest organ in the right upper abdomen",)),
    ]


def _answer(client: M3DClient, method: str, args: tuple) -> str:
    return getattr(client, method)(*args, sampling=GREEDY).text


def _rss() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


def test_soak_200_requests_4_clients(tiny_phi3_model, data_dir):
    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.serving.server import create_app

    array, ijk_to_ras = read_volume(data_dir / "example_ct_sm.nii.gz")
    centre = ijk_to_ras @ np.array([array.shape[2] / 2, array.shape[1] / 2, array.shape[0] / 2, 1.0])
    mix = _requests(RasRoi(centre[:3], (60.0, 60.0, 40.0)))
    engine = InferenceEngine(tiny_phi3_model)
    token = "soak-test-token-0123456789"
    app = create_app(engine, token, max_queue=2, max_new_tokens=16, max_volume_bytes=16 << 20)
    with serve_in_thread(app) as (url, _port):
        # Each distinct request served alone (one client, nothing else running): the reference answers.
        alone = M3DClient(url, token, timeout=120)
        alone.set_volume(array, ijk_to_ras, window="abdomen")
        started = time.perf_counter()
        reference = [_answer(alone, m, a) for m, a in mix]
        alone_s = time.perf_counter() - started

        # The soak: request i is mix[i % len(mix)]; 4 threads take the next index until 200 are done.
        lock = threading.Lock()
        next_index = [0]
        done = [0]
        busy = collections.Counter()
        errors: list[str] = []
        mismatches: list[str] = []
        latencies: list[float] = []
        rss_after_warmup: list[int] = []
        soak_deadline = time.monotonic() + DEADLINE_S

        def worker(n: int) -> None:
            client = M3DClient(url, token, timeout=120)
            client.set_volume(array, ijk_to_ras, window="abdomen")
            while time.monotonic() < soak_deadline:
                with lock:
                    i = next_index[0]
                    if i >= REQUESTS:
                        return
                    next_index[0] += 1
                method, args = mix[i % len(mix)]
                t0 = time.perf_counter()
                for _attempt in range(200):  # 503 = deliberate back-pressure: retry after a short pause
                    try:
                        text = _answer(client, method, args)
                        break
                    except ServerBusyError:
                        with lock:
                            busy[method] += 1
                        time.sleep(0.05)
                    except Exception as e:  # every other error is a failure of the soak
                        with lock:
                            errors.append(f"request {i} {method}: {type(e).__name__}: {e}")
                        text = None
                        break
                else:
                    text = None
                    with lock:
                        errors.append(f"request {i} {method}: still 503 after 200 tries")
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if text is not None and text != reference[i % len(mix)]:
                        mismatches.append(f"request {i} {method}: {text!r} != alone {reference[i % len(mix)]!r}")
                    done[0] += 1
                    if done[0] == WARMUP:
                        rss_after_warmup.append(_rss())

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S + 60)
        soak_s = time.perf_counter() - started
        rss_end = _rss()

    lat = np.sort(np.asarray(latencies))
    growth = (rss_end - rss_after_warmup[0]) / rss_after_warmup[0] if rss_after_warmup else float("nan")
    print(f"\nsoak: {done[0]} requests from {CLIENTS} clients in {soak_s:.1f} s ({done[0] / soak_s:.1f} req/s); "
          f"{len(mix)} distinct requests alone in {alone_s:.1f} s; deliberate 503s (retried): {sum(busy.values())} "
          f"{dict(busy)}; latency p50 {np.percentile(lat, 50):.2f} s p95 {np.percentile(lat, 95):.2f} s max "
          f"{lat[-1]:.2f} s; RSS after {WARMUP} requests {rss_after_warmup[0] / 2**20:.0f} MiB, after the run "
          f"{rss_end / 2**20:.0f} MiB ({growth:+.1%}); errors {len(errors)}; answers differing from alone "
          f"{len(mismatches)}")
    assert not errors, errors[:5]
    assert done[0] == REQUESTS, f"only {done[0]} of {REQUESTS} requests in {DEADLINE_S} s"
    assert not mismatches, mismatches[:5]
    assert abs(growth) <= 0.10, f"resident memory grew {growth:+.1%} after the first {WARMUP} requests"
