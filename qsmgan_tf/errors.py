"""The package's error for bad user input, shared by every library and binary.

Binaries turn it into one ``error: ...`` line on stderr and exit status 2 (`qsmgan_tf.cli`);
anything else that escapes is a bug and keeps its traceback.
"""


class InputError(ValueError):
  """Bad user input: the message is one line that says what is wrong and with which file."""
