"""Errors a user can fix. ``python -m toppax.main`` prints them as ``error: <message>`` and exits
with status 2, without a traceback; anything else keeps its traceback (a bug to report).

Each class also derives from the built-in type a caller would catch (``ValueError``,
``FileNotFoundError``, ...), so library code can keep catching those.
"""
from __future__ import annotations


class UserError(Exception):
  """Bad input, configuration or files: the message says what is wrong and how to fix it."""


class ConfigError(UserError, ValueError):
  """A configuration value or combination that cannot work."""


class DatasetNotFoundError(UserError, FileNotFoundError):
  """A configured dataset is missing; the message says how to prepare it."""


class CheckpointError(UserError, RuntimeError):
  """A checkpoint is missing, damaged, or does not match the config."""


class ConversionError(UserError, ValueError):
  """A state dict does not fit the model: lists every missing, unused and mis-shaped key."""


class NonFiniteError(UserError, FloatingPointError):
  """Training produced a non-finite loss or gradient; nothing non-finite was saved."""
