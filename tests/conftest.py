"""Markers gpu, tpu and slow are skipped by default; --run-gpu / --run-tpu / --run-slow enable them."""

import logging

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


class _FallbackWatch(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    msg = record.getMessage()
    if "falling back to 'xla'" in msg or "; using 'xla'" in msg:
      self.messages.append(msg)


@pytest.fixture(autouse=True)
def _no_silent_fallback_on_hardware(request):
  """A test marked gpu or tpu fails if a Pallas kernel fell back to "xla" during it: the
  fallback keeps users' answers right, but on the hardware it would let a kernel that does not
  build pass its own test by running XLA instead."""
  if not any(m in request.keywords for m in ("gpu", "tpu")):
    yield
    return
  watch = _FallbackWatch()
  root = logging.getLogger("toppax")
  root.addHandler(watch)
  try:
    yield
  finally:
    root.removeHandler(watch)
  assert not watch.messages, "kernel fell back to xla: " + "; ".join(watch.messages)
