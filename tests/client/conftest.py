"""Fixtures of the client tests."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The seconds each client asked to sleep between tries (the sleeps return at once)."""
    asked: list[float] = []

    async def async_sleep(seconds: float) -> None:
        asked.append(seconds)

    monkeypatch.setattr("fsmllm_client.client.time", SimpleNamespace(sleep=asked.append))
    monkeypatch.setattr("fsmllm_client.client.asyncio", SimpleNamespace(sleep=async_sleep))
    return asked
