"""A wrong fleet file is refused with file, key and line; nothing starts."""

import os
import subprocess

from fleet_harness import BIN_DIR, free_port, port_open

GOOD = """\
listen: 0.0.0.0:8080
metrics_listen: 0.0.0.0:9100
redis:
  url: redis://127.0.0.1:6379
workers:
  count: 2
  host: 127.0.0.1
  base_port: {port}
"""


def run_worker(tmp_path, text, index=0):
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    r = subprocess.run([str(BIN_DIR / "worker"), "--config", str(path), "--index", str(index)],
                       capture_output=True, text=True, timeout=10)
    return path, r


def test_bad_files_name_file_key_and_line(tmp_path):
    port = free_port()
    good = GOOD.format(port=port)
    cases = [
        (good.replace("  host:", "  hots:"), 7, "workers.hots", "unknown field"),
        (good.replace("count: 2", "count: 0"), 6, "workers.count", "1 to 1024"),
        (good.replace("count: 2", "count: two"), 6, "workers.count", "invalid type"),
        (good.replace(f"base_port: {port}", "base_port: 65535"), 8, "workers.base_port", "65536"),
        (good.replace("redis://127.0.0.1:6379", "http://nope"), 4, "redis.url", "scheme"),
        (good + "extra_key: 1\n", 9, "extra_key", "unknown field"),
        (good + "socketio:\n  cors:\n    origins: ['*']\n    credentials: true\n", 12,
         "socketio.cors.credentials", "cannot be true"),
        (good + "socketio:\n  cors:\n    origins: [https://app.example.com/]\n", 11,
         "socketio.cors.origins", "nothing may follow"),
    ]
    for text, line, key, why in cases:
        path, r = run_worker(tmp_path, text)
        assert r.returncode == 2, (key, r.returncode, r.stderr)
        assert f"{path}:{line}: key `{key}`" in r.stderr, (key, r.stderr)
        assert why in r.stderr, (key, r.stderr)
    assert not port_open(port)


def test_index_out_of_range_and_missing_file(tmp_path):
    _, r = run_worker(tmp_path, GOOD.format(port=free_port()), index=2)
    assert r.returncode == 2 and "--index 2 is out of range: workers.count is 2" in r.stderr
    r = subprocess.run([str(BIN_DIR / "worker"), "--config", str(tmp_path / "nope.yaml"), "--index", "0"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "nope.yaml" in r.stderr and "cannot read" in r.stderr


def test_help_explains_both_modes():
    r = subprocess.run([str(BIN_DIR / "worker"), "--help"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 0
    for flag in ("--config", "--index", "--listen", "--redis", "--id"):
        assert flag in r.stdout
    r = subprocess.run([str(BIN_DIR / "worker"), "--listen", "127.0.0.1:1"], capture_output=True, text=True, timeout=10)
    assert r.returncode == 2


def test_standalone_worker_needs_a_redis_url_from_the_flag_or_the_environment():
    """--redis may be left out for FLEET_REDIS_URL (a password stays off the command line), but
    one of the two is needed, and the environment's is checked like the flag's."""
    env = {k: v for k, v in os.environ.items() if k != "FLEET_REDIS_URL"}
    args = [str(BIN_DIR / "worker"), "--listen", f"127.0.0.1:{free_port()}", "--id", "x"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=10, env=env)
    assert r.returncode == 2 and "FLEET_REDIS_URL" in r.stderr, r.stderr
    r = subprocess.run(args, capture_output=True, text=True, timeout=10, env={**env, "FLEET_REDIS_URL": "http://x:1"})
    assert r.returncode == 2 and "--redis: scheme must be redis://" in r.stderr, r.stderr
