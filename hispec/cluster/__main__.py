"""`python -m hispec.cluster render|validate ...`: the same command as `hispec cluster`."""

from hispec.cluster.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
