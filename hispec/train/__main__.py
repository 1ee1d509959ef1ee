"""`python -m hispec.train {train,eval-exits} ...`: the same commands as `hispec train` / `hispec eval-exits`."""

import sys

from hispec.cli import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
