"""Fixtures for the controller tests: the fake API server and a client pointed at it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
from k8s_fakeapi import FakeKube
from kubernetes_asyncio import client

from igw.controllers.reflector import WatchSettings

# Fast but realistic: errors back off 20-40 ms, quiet watches pause, pages of 2 exercise `continue`.
FAST = WatchSettings(
    watch_timeout_s=30.0,
    page_size=2,
    request_timeout_s=2.0,
    backoff_initial_s=0.02,
    backoff_max_s=0.1,
    missing_retry_s=0.2,
    quiet_watch_s=0.05,
)


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    async with FakeKube() as server:
        yield server


@pytest.fixture
async def api(kube: FakeKube) -> AsyncIterator[client.ApiClient]:
    configuration = client.Configuration(host=kube.url)
    async with client.ApiClient(configuration=configuration) as api_client:
        yield api_client


async def eventually(check: Callable[[], object], *, timeout: float = 2.0, what: str = "condition") -> None:
    """Wait until ``check()`` is truthy (polling every 5 ms), or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
