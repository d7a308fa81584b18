"""Side-by-side benchmarks of deltatune and peft; run all with ``python -m benchmarks.run`` (see README.md)."""
