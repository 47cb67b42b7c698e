#!/usr/bin/env python3
"""Decision-log overhead: decisions/s of POST /v1/classify (max_tokens 1, one policy, keep-alive
clients) with the decision log on over off, for one `arbiter serve` binary in the same run (same
model, same machine, rounds interleaved). Both servers get a database (`--db`); the "off" one runs
with `--no-decision-log`, so the only difference is the log. With --pg URL a third server keeps
its log (and policies and jobs) in that PostgreSQL database instead of an SQLite file, in the same
rounds; --pg auto starts a throwaway server with scripts/start-postgres.sh.

    python3 bench/decision_log.py --binary build/arbiter [--clients 16] [--requests 200] [--rounds 3] [--pg auto|URL]

Prints a Markdown table and the ratios over off (target >= 0.95). Uses bench/http_frontend.py's client.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from http_frontend import Server, make_tiny_model, run_clients  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default="build/arbiter")
    ap.add_argument("--model", help="model folder (default: a tiny random model made here)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=200, help="per client and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", help="where the databases go (default: a temporary folder)")
    ap.add_argument("--pg", help="also a server logging to PostgreSQL: a postgres:// URL, or auto (a throwaway server)")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="arbiter-decision-bench-", dir=args.dir)
    pg_dir = None
    pg_url = args.pg
    if pg_url == "auto":
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "start-postgres.sh")
        lines = subprocess.run(["bash", script], check=True, capture_output=True, text=True).stdout.split("\n")
        env = dict(line[len("export "):].split("=", 1) for line in lines if line.startswith("export "))
        pg_url, pg_dir = env["ARBITER_TEST_PG"], env["ARBITER_PG_DIR"]
    try:
        model = args.model
        if not model:
            model = make_tiny_model(args.binary, os.path.join(tmp, "model"))
        configs = [("log off", ["--db", os.path.join(tmp, "off.db"), "--no-decision-log"]),
                   ("log on", ["--db", os.path.join(tmp, "on.db")])]
        if pg_url:
            configs.append(("log on, PostgreSQL", ["--db", pg_url]))
        results = {name: [] for name, _ in configs}
        with open(os.path.join(tmp, "serve.log"), "w") as log:
            for _ in range(args.rounds):
                for name, extra in configs:
                    server = Server(args.binary, model, log, extra)
                    try:
                        run_clients(server.port, 2, 10, True)  # warm-up
                        results[name].append(run_clients(server.port, args.clients, args.requests, True))
                    finally:
                        server.close()
        print(f"POST /v1/classify, max_tokens 1, one policy, tiny model, {args.clients} keep-alive clients x "
              f"{args.requests} requests, {args.rounds} interleaved rounds, {os.cpu_count()} CPUs, databases in {tmp}")
        print("| decision log | decisions/s per round | best | p50 ms | p99 ms | errors |")
        print("|---|---|---|---|---|---|")
        best = {}
        for name, _ in configs:
            rs = results[name]
            b = max(rs, key=lambda r: r["rps"])
            best[name] = b["rps"]
            per_round = " / ".join("%.0f" % r["rps"] for r in rs)
            print(f"| {name} | {per_round} | {b['rps']:.0f} | {b['p50']:.1f} | "
                  f"{b['p99']:.1f} | {sum(r['errors'] for r in rs)} |")
        print(f"decisions/s, log on / log off (best rounds): {best['log on'] / best['log off']:.2f}")
        if pg_url:
            print(f"decisions/s, log on in PostgreSQL / log off (best rounds): {best['log on, PostgreSQL'] / best['log off']:.2f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if pg_dir:
            subprocess.run(["bash", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "start-postgres.sh"),
                            "--stop", pg_dir], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
