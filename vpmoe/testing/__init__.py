"""Test helpers: tiny models, teachers, upcycling chains and float64 references. Tests and benchmarks import
this package; production code never does."""
