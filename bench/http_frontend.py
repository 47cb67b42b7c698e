#!/usr/bin/env python3
"""HTTP front-end benchmark: requests/s and p50/p99 latency of POST /v1/classify (max_tokens 1) over
keep-alive connections and over a fresh connection per request, for one `arbiter serve` binary or
for a baseline and a candidate in the same run (same model, same machine, interleaved).

    python3 bench/http_frontend.py --binary build/arbiter [--baseline OLD/arbiter] [--clients 8] [--requests 300]

Without --model it makes a tiny random model with the binary (the tokenizer from .cache/tokenizer).
The client is plain sockets (standard library only), one thread per client; it shares the machine
with the server, equally for every binary measured.
"""
import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

BODY = json.dumps({"content": "benchmark content", "max_tokens": 1, "reasoning_effort": "low",
                   "policies": [{"id": "a", "text": "Policy A. Answer 0 or 1."}]}).encode()
REQUEST = (b"POST /v1/classify HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n" % len(BODY)) + BODY


def read_response(sock, buf):
    """Reads one response; returns (status, rest of buffer) or (None, b"") when the connection ended."""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            return None, b""
        buf += data
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    if 100 <= status < 200:
        return read_response(sock, rest)
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            return None, b""
        rest += data
    return status, rest[length:]


def run_clients(port, clients, requests, keep_alive):
    latencies, errors = [], [0]
    lock = threading.Lock()

    def client():
        mine, sock, buf = [], None, b""
        for _ in range(requests):
            start = time.perf_counter()
            if sock is None:
                sock = socket.create_connection(("127.0.0.1", port))
                buf = b""
            sock.sendall(REQUEST if keep_alive else REQUEST.replace(b"Host: bench\r\n", b"Host: bench\r\nConnection: close\r\n"))
            status, buf = read_response(sock, buf)
            mine.append(time.perf_counter() - start)
            if status != 200:
                with lock:
                    errors[0] += 1
            if not keep_alive or status is None:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / wall, "p50": latencies[len(latencies) // 2] * 1000,
            "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, "errors": errors[0]}


def make_tiny_model(binary, folder):
    """A tiny random model (real tokenizer from .cache/tokenizer) written to `folder`; returns it."""
    subprocess.run([binary, "make-model", "--preset", "tiny", "--seed", "3", "--tokenizer-dir",
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "tokenizer"),
                    "--out", folder], check=True, stdout=subprocess.DEVNULL)
    return folder


class Server:
    """`arbiter serve` on a free port (extra: more options), ready when constructed."""

    def __init__(self, binary, model, log, extra=()):
        self.proc = subprocess.Popen([binary, "serve", "--model", model, "--port", "0", "--device", "cpu",
                                      "--warm-efforts", "none", *extra], stdout=subprocess.PIPE, stderr=log, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"listening on http://[0-9.]+:([0-9]+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"{binary} printed no address: {line!r}")
        self.port = int(match.group(1))
        for _ in range(600):
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=2).status == 200:
                    return
            except Exception:
                time.sleep(0.1)
        raise RuntimeError(f"{binary} did not become ready")

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=60)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="build/arbiter")
    ap.add_argument("--baseline", help="another arbiter binary measured in the same run")
    ap.add_argument("--model", help="model folder (default: a tiny random model made here)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=300, help="per client and mode")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of them is reported")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="arbiter-http-bench-")
    try:
        model = args.model
        if not model:
            model = make_tiny_model(args.binary, os.path.join(tmp, "model"))
        binaries = [("candidate", args.binary)] + ([("baseline", args.baseline)] if args.baseline else [])
        best = {}
        with open(os.path.join(tmp, "serve.log"), "w") as log:
            for _ in range(args.rounds):
                for name, binary in binaries:
                    server = Server(binary, model, log)
                    try:
                        run_clients(server.port, 2, 10, True)  # warm-up
                        for mode in ("keep-alive", "fresh"):
                            r = run_clients(server.port, args.clients, args.requests, mode == "keep-alive")
                            key = (name, mode)
                            if key not in best or r["rps"] > best[key]["rps"]:
                                best[key] = r
                    finally:
                        server.close()
        print(f"POST /v1/classify, max_tokens 1, tiny model, {args.clients} clients x {args.requests} requests, "
              f"best of {args.rounds} interleaved rounds, {os.cpu_count()} CPUs")
        print("| binary | connections | requests/s | p50 ms | p99 ms | errors | requests/s vs fresh |")
        print("|---|---|---|---|---|---|---|")
        for name, _ in binaries:
            fresh = best[(name, "fresh")]["rps"]
            for mode in ("keep-alive", "fresh"):
                r = best[(name, mode)]
                print(f"| {name} | {mode} | {r['rps']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['errors']} | {r['rps'] / fresh:.2f} |")
        if args.baseline:
            for mode in ("keep-alive", "fresh"):
                ratio = best[("candidate", mode)]["rps"] / best[("baseline", mode)]["rps"]
                print(f"candidate / baseline requests/s, {mode}: {ratio:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
