"""The error type raised for bad data inputs."""


class DataError(ValueError):
  """A data source, tokenizer or dataset setting cannot be used.

  The message is one line and names the offending path or setting.
  """
