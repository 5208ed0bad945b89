#!/usr/bin/env python3
"""What TLS at the balancer costs WebSockets: the same broadcast load over plain WebSockets
handed off to the workers (the default), plain WebSockets relayed by the balancer, and WSS
(TLS ends at the balancer, so it relays). Measured: the balancer's CPU per delivered message
and its memory per open connection, with the official socket.io-client (Node) as the clients.

    cargo build --release && python3 bench/tls.py [--clients 1000] [--rate 300] [--rounds 3]

Prints a table and writes bench/tls-results.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import LOGS, ROOT, Fleet, Redis, cpu_seconds, rss_bytes  # noqa: E402
from fleet_harness import make_ca, make_server_cert  # noqa: E402

NODE = ROOT / "bench" / "node" / "wss_clients.js"


def one_run(mode, args, pki):
    redis = Redis()
    tls = mode == "wss-relayed"
    extra = (f"  tls:\n    cert_file: {pki['cert']}\n    key_file: {pki['key']}\n" if tls else "")
    fleet = Fleet(redis, 2, handoff=(mode == "ws-handed-off"), extra_yaml=extra)
    try:
        bal = fleet.balancer_pids
        url = f"https://localhost:{fleet.port}" if tls else fleet.url
        rss_idle = rss_bytes(bal())
        cmd = ["node", str(NODE), url, str(args.clients), str(args.room_size), str(args.rate), str(args.seconds)]
        if tls:
            cmd.append(str(pki["ca"]))
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"{mode}: clients failed: {line} {p.stderr.read()}")
        rss_open = rss_bytes(bal())
        cpu0, t0 = cpu_seconds(bal()), time.monotonic()
        out = json.loads(p.stdout.readline())
        cpu, secs = cpu_seconds(bal()) - cpu0, time.monotonic() - t0
        p.wait(30)
        expected = out["published"] * args.room_size
        return {
            "mode": mode,
            "connected": out["connected"],
            "delivered": out["delivered"],
            "missing": expected - out["delivered"],
            "deliveries_per_sec": round(out["delivered"] / secs),
            "balancer_us_per_delivery": round(cpu * 1e6 / max(out["delivered"], 1), 2),
            "balancer_kib_per_connection": round((rss_open - rss_idle) / 1024 / args.clients, 2),
        }
    finally:
        fleet.stop()
        redis.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--room-size", type=int, default=10)
    ap.add_argument("--rate", type=int, default=300, help="publishes per second in total")
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ca_key, ca_cert, ca = make_ca(LOGS, "bench-ca")
    cert, key = make_server_cert(LOGS, ca_key, ca_cert)
    pki = {"ca": ca, "cert": cert, "key": key}
    modes = ["ws-handed-off", "ws-relayed", "wss-relayed"]
    runs = {m: [] for m in modes}
    for rnd in range(args.rounds):
        for mode in modes:  # alternating, so drift on a noisy machine hits every mode alike
            r = one_run(mode, args, pki)
            runs[mode].append(r)
            print(f"round {rnd + 1} {mode}: {r}", file=sys.stderr, flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "mode"} for m, rs in runs.items()}
    print(f"\n{args.clients} WebSocket clients in rooms of {args.room_size}, {args.rate} publishes/s "
          f"({args.rate * args.room_size} deliveries/s), {args.seconds} s, 2 workers; medians of {args.rounds}\n")
    print("| | balancer µs per delivery | balancer KiB per open connection | deliveries/s | missing |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        r = med[m]
        print(f"| {m} | {r['balancer_us_per_delivery']} | {r['balancer_kib_per_connection']} | "
              f"{r['deliveries_per_sec']:.0f} | {r['missing']:.0f} |")
    out = ROOT / "bench" / "tls-results.json"
    out.write_text(json.dumps({"args": vars(args), "medians": med, "runs": runs}, indent=1))
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
