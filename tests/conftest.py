import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# The test models are tiny: a second intra-op thread only adds spin-waiting, and on a
# shared 2-core machine it makes the suite several times slower.
torch.set_num_threads(int(os.environ.get("PEFTKIT_TEST_THREADS", "1")))
