"""plpost against TRL and against a raw torch loop: same model, same data, same settings, one run.

`python benchmarks/run.py --preset cpu-tiny` (see run.py); results in benchmarks/RESULTS.md.
"""
