"""Markers gpu, tpu and slow are skipped by default; --run-gpu / --run-tpu / --run-slow enable them."""

import pytest


_MARKERS = ("gpu", "tpu", "slow")


def pytest_addoption(parser):
  for m in _MARKERS:
    parser.addoption(f"--run-{m}", action="store_true", default=False, help=f"run tests marked {m}")


def pytest_collection_modifyitems(config, items):
  for m in _MARKERS:
    if config.getoption(f"--run-{m}"):
      continue
    skip = pytest.mark.skip(reason=f"marked {m}: pass --run-{m} to run")
    for item in items:
      if m in item.keywords:
        item.add_marker(skip)
