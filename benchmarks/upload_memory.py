"""Client memory while uploading a volume: compressed while sent (ours) vs compressed whole first (the baseline).

Uploads a 512 x 512 x 300 int16 CT-like phantom (150 MiB) to an in-process ``m3d serve`` app on loopback, both ways,
side by side in one run, measuring the client's extra array/bytes memory with tracemalloc (the server's receive
buffer is the volume's own size either way and is subtracted). Prints each peak, the time, and ``ratio: N.NN``
(baseline peak / ours).

Usage: python benchmarks/upload_memory.py   (needs the server extra and the tiny test checkpoint writer)
"""

from __future__ import annotations

import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "M3DAssistant"),
                str(Path(__file__).resolve().parents[1] / "Testing")]
from preprocess import ct_phantom  # noqa: E402  (benchmarks/preprocess.py)


def main() -> None:
    from serving import serve_in_thread

    from M3DAssistantLib.engine import InferenceEngine
    from M3DAssistantLib.model import random_checkpoint as rc
    from M3DAssistantLib.serving import client as client_module
    from M3DAssistantLib.serving.server import create_app

    print("building a 512 x 512 x 300 int16 CT phantom ...")
    volume, ijk_to_ras = ct_phantom()
    folder = rc.write_random_lamed_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "phi3", llm=rc.TINY_LLM,
                                              multimodal=rc.TINY_MULTIMODAL)
    token = "benchmark-token-0123456789"

    def whole(self, array, limit, chunk_bytes=0):  # the baseline: one zlib.compress of the whole volume
        yield zlib.compress(memoryview(array).cast("B"), 1)

    results = {}
    for name, chunks in (("ours (streamed)", client_module.M3DClient._compressed_chunks), ("baseline (whole)", whole)):
        app = create_app(InferenceEngine(folder, device="cpu", dtype="float32"), token)
        with serve_in_thread(app) as (url, _port):
            client = client_module.M3DClient(url, token)
            client._compressed_chunks = chunks.__get__(client)
            client.health()
            tracemalloc.start()
            started = time.perf_counter()
            client.upload_volume(volume, ijk_to_ras)
            seconds = time.perf_counter() - started
            peak = tracemalloc.get_traced_memory()[1] - volume.nbytes  # minus the server's receive buffer
            tracemalloc.stop()
        results[name] = peak
        print(f"{name:18s} extra peak {peak / 2**20:7.1f} MiB   upload {seconds:.2f} s")
    print(f"ratio: {results['baseline (whole)'] / max(results['ours (streamed)'], 1):.2f}")


if __name__ == "__main__":
    main()
