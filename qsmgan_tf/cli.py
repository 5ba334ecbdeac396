"""Helpers shared by the absl binaries: one-line errors and exit codes.

Every binary wraps its ``main`` with `one_line_errors`, so bad input (an `InputError`, or a
``ValueError`` from a library check marked as user-facing) prints ``error: <message>`` on
stderr and exits with status 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import sys

from qsmgan_tf.errors import InputError

EXIT_BAD_INPUT = 2


def fail(message: str) -> int:
  """Prints ``error: message`` (one line) on stderr; returns the bad-input exit code."""
  text = " ".join(str(message).split())
  print(f"error: {text}", file=sys.stderr, flush=True)
  return EXIT_BAD_INPUT


def one_line_errors(main):
  """Decorator for absl ``main(argv)``: InputError -> one line on stderr, exit status 2."""

  @functools.wraps(main)
  def wrapper(argv):
    try:
      return main(argv)
    except InputError as exc:
      return fail(str(exc))
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return 130

  return wrapper
