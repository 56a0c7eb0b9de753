import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))

# Tests use tiny models whose ops are too small to gain from threads, and OpenMP threads that wait on a
# busy core make every op ~100x slower on a shared 2-core machine. One thread keeps the suite's time
# predictable; tests that run real models in a subprocess (the demo) use the default thread count.
torch.set_num_threads(1)
