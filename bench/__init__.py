"""loraprune benchmarks: ``python -m bench.run {quality,memory,speed,plots,all} [--smoke]`` (see README.md)."""
