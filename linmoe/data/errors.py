"""The error type raised for bad data inputs, and optional packages imported on first use."""

import importlib
import types


class DataError(ValueError):
  """A data source, tokenizer or dataset setting cannot be used.

  The message is one line and names the offending path or setting.
  """


def optional_module(name: str, package: str, feature: str) -> types.ModuleType:
  """Imports `name` on first use, so the plain-file path runs without the optional packages.

  Raises:
    DataError: naming `feature` and the pip `package` that provides it, if it is not installed.
  """
  try:
    return importlib.import_module(name)
  except ImportError as e:
    raise DataError(f"{feature} needs the {package} package (pip install {package}): {e}") from e
