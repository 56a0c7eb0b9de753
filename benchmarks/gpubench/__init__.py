"""The parts of ``benchmarks/gpu.py`` (the one prepared GPU script), one module per concern."""
