"""Shared fixtures; the tiny model configs live in `frugalm_testing` (importable from every test folder)."""

from __future__ import annotations

import pytest
import torch

from frugalm.model.config import ModelConfig
from frugalm_testing import tiny_config

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()
