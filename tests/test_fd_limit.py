"""Descriptor limits: started under a low soft open-file limit, the balancer and its workers
raise it to the hard limit, say so in their logs, and export process_open_fds / process_max_fds;
a worker warns when workers.max_connections is more than its limit allows."""

import resource
from contextlib import contextmanager

import pytest
import requests

from fleet_harness import Balancer, metric, parse_metrics, wait_until

LOW = 256
_, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
RESERVED = 128  # shared::fd_limit::RESERVED

pytestmark = pytest.mark.skipif(HARD == resource.RLIM_INFINITY or HARD < 4 * LOW,
                                reason=f"the hard open-file limit ({HARD}) leaves nothing to raise")


@contextmanager
def soft_nofile(n):
    """Processes started inside inherit a soft limit of n (the hard limit is kept)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_balancer_and_workers_raise_a_low_soft_limit_and_export_it(closer, tmp_path, redis):
    with soft_nofile(LOW):
        b = closer.add(Balancer(tmp_path, redis.url, count=2))
    b.wait_ready()
    out = b.output()
    # The balancer was given 256 and raised it; its workers inherit the raised limit.
    assert f"open-file limit nofile={HARD} was={LOW} connections={(HARD - RESERVED) // 2}" in out, out
    assert out.count(f"open-file limit nofile={HARD} was={HARD} clients={HARD - RESERVED}") == 2, out
    assert "more than the open-file limit allows" not in out, out

    m = b.metrics()
    assert metric(m, "process_max_fds") == HARD
    assert 0 < metric(m, "process_open_fds") < HARD
    for i in range(2):
        wm = parse_metrics(requests.get(b.worker_url(i) + "/metrics", timeout=2).text)
        # The worker's process metrics carry its label, like every other sample it exports.
        assert metric(wm, "process_max_fds", worker=f"w{i}") == HARD
        assert 0 < metric(wm, "process_open_fds", worker=f"w{i}") < HARD


def test_worker_warns_when_max_connections_exceeds_the_limit(closer, tmp_path, redis):
    too_many = HARD - RESERVED + 1
    b = closer.add(Balancer(tmp_path, redis.url, count=1, extra=f"  max_connections: {too_many}\n"))
    b.wait_ready()
    wait_until(lambda: "workers.max_connections is more than the open-file limit allows" in b.output(), 5,
               what="the worker's warning")
    line = next(x for x in b.output().splitlines() if "more than the open-file limit allows" in x)
    assert f"max_connections={too_many}" in line and f"clients={HARD - RESERVED}" in line, line
