"""What users run besides the worker: the `pql` CLI (cli.py), replay, simulate, publish, tail, the demo."""
