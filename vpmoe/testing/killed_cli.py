"""The `vpmoe` command line, SIGKILLed right after the n-th return of a named function: a crash at a known point
for resume tests, whatever the machine's speed (polling from outside can miss a fast child).

    python -m vpmoe.testing.killed_cli vpmoe.artifacts.checkpoints:save 2 train CONFIG
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from vpmoe import cli


def main(argv: list[str]) -> int:
    target, count, *cli_args = argv
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)
    calls = 0

    def then_die(*args, **kwargs):
        nonlocal calls
        result = real(*args, **kwargs)
        calls += 1
        if calls == int(count):
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(module, name, then_die)  # callers look the function up in its module at call time
    return cli.main(cli_args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
