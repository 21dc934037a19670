"""Test environment (offline hub, offline wandb) and fixtures; shared helpers are in tests/support.py."""
import os

# Tests never reach a model hub: a hub name must fail at once, as it does on an offline machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402

from tests.support import small_config  # noqa: E402


@pytest.fixture
def cfg():
    return small_config()


