"""Load test of ``vlbridge serve`` on loopback: dynamic batching on vs off, in the same run.

A tiny random BLIP-2 checkpoint (OPT LLM, from the test suite's factory) is served twice by ``vlbridge serve`` in
a subprocess — first with batching (``--max-batch-size 16 --max-wait-ms 10``), then with ``--no-batching`` — and
``--clients`` threads each send chat completions (a data-URI image + a question, ``max_tokens`` 16, greedy) back
to back for ``--seconds``. Printed per mode: requests, errors, latency p50/p99, requests/s, the server's batching
counters (model calls, largest batch), and the throughput ratio (aim: >= 3x).

    python benchmarks/serve_load.py                         # 24 clients, 30 s per mode
    python benchmarks/serve_load.py --clients 16 --seconds 10
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the suite's tiny checkpoint factory

from factory import build_checkpoint  # noqa: E402
from serve_support import data_uri, noise_image  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, port: int, extra: list[str], threads: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
    }
    cmd = [
        sys.executable,
        "-m",
        "vlbridge",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen([*cmd, *extra], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    images = [data_uri(noise_image(i)) for i in range(64)]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(c: int) -> None:
        with httpx.Client(timeout=60) as http:
            n = 0
            while time.monotonic() < stop:
                body = {
                    "messages": [{"role": "user", "content": [
                        {"type": "image_url", "image_url": {"url": images[(c * 7 + n) % len(images)]}},
                        {"type": "text", "text": "what colour is the object?"},
                    ]}],
                    "max_tokens": max_tokens,
                }  # fmt: skip
                start = time.perf_counter()
                try:
                    ok = http.post(f"{url}/v1/chat/completions", json=body).status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    if ok:
                        latencies.append(time.perf_counter() - start)
                    else:
                        errors[0] += 1
                n += 1

    begin = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - begin
    ms = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    stats = httpx.get(f"{url}/healthz", timeout=10).json()["batching"]
    return {
        "requests": len(latencies),
        "errors": errors[0],
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "rps": len(latencies) / wall,
        "stats": stats,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=24)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_checkpoint(Path(tmp) / "tiny", family="opt", seed=0)
        results = {}
        for mode, extra in (
            ("batched", ["--max-batch-size", "16", "--max-wait-ms", "10"]),
            ("unbatched", ["--no-batching"]),
        ):
            port = free_port()
            server = start_server(model, port, extra, args.threads)
            try:
                url = f"http://127.0.0.1:{port}"
                load(url, 4, 2, args.max_tokens)  # warm-up
                results[mode] = load(url, args.clients, args.seconds, args.max_tokens)
            finally:
                server.terminate()
                server.wait(timeout=30)
    print(f"{args.clients} clients, {args.seconds:g} s per mode, max_tokens {args.max_tokens}, tiny random OPT BLIP-2")
    print(f"{'mode':10} {'requests':>8} {'errors':>6} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}  calls/largest batch")
    for mode, r in results.items():
        s = r["stats"]
        print(
            f"{mode:10} {r['requests']:8d} {r['errors']:6d} {r['p50']:8.1f} {r['p99']:8.1f} {r['rps']:7.1f}  "
            f"{s['calls']} / {s['largest']}"
        )
    ratio = results["batched"]["rps"] / max(results["unbatched"]["rps"], 1e-9)
    print(f"throughput ratio batched / unbatched: {ratio:.2f}x (aim >= 3x)")


if __name__ == "__main__":
    main()
