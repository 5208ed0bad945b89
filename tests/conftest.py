"""pytest fixtures over fleet_harness: every test gets its own Redis and a closer that kills
whatever it started, pass or fail."""

import pytest

from fleet_harness import Closer, RedisServer


@pytest.fixture
def closer():
    c = Closer()
    yield c
    c.close_all()


@pytest.fixture
def redis(closer):
    return closer.add(RedisServer())
