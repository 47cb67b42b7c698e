#!/usr/bin/env python3
"""Jobs throughput: items/s of one N-item job (POST /v1/jobs, polled to completion) over the same N
classify bodies sent synchronously (POST /v1/classify) by as many keep-alive clients as the job runs
items at once (--job-concurrency), on the same `arbiter serve` (tiny model, --db), in one run. The
job's time runs from the POST to the poll that sees it completed; its items are stored in SQLite
one transaction each, as the decision log stores the synchronous requests' decisions.

    python3 bench/jobs.py --binary build/arbiter [--items 300] [--concurrency 4] [--rounds 2]

Prints a Markdown table and the ratio (target >= 0.9). Uses bench/http_frontend.py's helpers.
"""
import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_frontend import Server, make_tiny_model  # noqa: E402


def body(i):
    return {"content": f"benchmark content {i}", "max_tokens": 1, "reasoning_effort": "low",
            "policies": [{"id": "a", "text": "Policy A. Answer 0 or 1."}]}


def sync_run(port, items, clients):
    """Sends the items over `clients` keep-alive connections; returns (items/s, errors)."""
    next_item, errors, lock = [0], [0], threading.Lock()

    def client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while True:
            with lock:
                i = next_item[0]
                next_item[0] += 1
            if i >= items:
                break
            conn.request("POST", "/v1/classify", json.dumps(body(i)), {"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                with lock:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return items / (time.perf_counter() - start), errors[0]


def job_run(port, items):
    """One job of the items, polled every 20 ms; returns (items/s, failed items)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    payload = json.dumps({"items": [{"custom_id": str(i), "body": body(i)} for i in range(items)]})
    start = time.perf_counter()
    conn.request("POST", "/v1/jobs", payload, {"Content-Type": "application/json"})
    r = conn.getresponse()
    job = json.loads(r.read())
    if r.status != 201:
        raise RuntimeError(f"POST /v1/jobs: {r.status} {job}")
    while True:
        conn.request("GET", "/v1/jobs/" + job["id"])
        r = conn.getresponse()
        job = json.loads(r.read())
        if job["state"] in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.02)
    elapsed = time.perf_counter() - start
    conn.close()
    return items / elapsed, job["counts"]["failed"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="build/arbiter")
    ap.add_argument("--model", help="model folder (default: a tiny random model made here)")
    ap.add_argument("--items", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=4, help="--job-concurrency, and the synchronous clients")
    ap.add_argument("--rounds", type=int, default=2, help="sync then job, alternating, on one server")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="arbiter-jobs-bench-")
    try:
        model = args.model or make_tiny_model(args.binary, os.path.join(tmp, "model"))
        with open(os.path.join(tmp, "serve.log"), "w") as log:
            server = Server(args.binary, model, log,
                            ["--db", os.path.join(tmp, "jobs.db"), "--job-concurrency", str(args.concurrency)])
            try:
                sync_run(server.port, 20, 2)  # warm-up
                rows = {"synchronous": [], "job": []}
                for _ in range(args.rounds):
                    rows["synchronous"].append(sync_run(server.port, args.items, args.concurrency))
                    rows["job"].append(job_run(server.port, args.items))
            finally:
                server.close()
        print(f"{args.items} items (max_tokens 1, one policy, tiny model), {args.concurrency} synchronous keep-alive "
              f"clients vs one job at --job-concurrency {args.concurrency}, same server, {args.rounds} alternating "
              f"rounds, {os.cpu_count()} CPUs")
        print("| path | items/s per round | best | errors |")
        print("|---|---|---|---|")
        best = {}
        for name, rs in rows.items():
            best[name] = max(r[0] for r in rs)
            print(f"| {name} | {' / '.join('%.0f' % r[0] for r in rs)} | {best[name]:.0f} | {sum(r[1] for r in rs)} |")
        print(f"items/s, job / synchronous (best rounds): {best['job'] / best['synchronous']:.2f}")
        ratios = sorted(j[0] / s[0] for j, s in zip(rows["job"], rows["synchronous"]))
        print(f"per-round ratios (each job against the synchronous run just before it): "
              f"{' / '.join('%.2f' % r for r in ratios)}; median {ratios[len(ratios) // 2]:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
