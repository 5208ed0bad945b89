#!/usr/bin/env python3
"""Does a worker give memory back after its clients leave? One release worker; 1,500
WebSocket clients connect (at 250/s, then in storms of 5,000/s), publish for 8 s and leave,
five times; RSS after each, then after the worker's periodic trim (30 s).

    cargo build --release && python3 bench/retention.py
"""

import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import fleet_harness  # noqa: E402

BIN = ROOT / "target" / "release"
fleet_harness.BIN_DIR = BIN


def rss_mb(pid):
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def main():
    closer = fleet_harness.Closer()
    try:
        redis = closer.add(fleet_harness.RedisServer())
        w = closer.add(fleet_harness.Worker(redis.url, "w0"))
        w.wait_ready()
        print(f"| moment | worker RSS |\n|---|---:|\n| idle | {rss_mb(w.proc.pid):.1f} MB |")
        for n, rate in enumerate([250, 5000, 5000, 5000, 250], 1):
            subprocess.run([str(BIN / "loadtest"), "--url", w.url, "--clients", "1500", "--connect-rate", str(rate),
                            "--rooms", "150", "--publishers", "150", "--rate", "1", "--duration", "8",
                            "--transport", "websocket"], capture_output=True, check=True)
            time.sleep(1)
            print(f"| run {n} (connect {rate}/s), clients gone | {rss_mb(w.proc.pid):.1f} MB |")
        time.sleep(31)
        print(f"| 31 s later | {rss_mb(w.proc.pid):.1f} MB |")
    finally:
        closer.close_all()


if __name__ == "__main__":
    main()
