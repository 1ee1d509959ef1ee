import os

import torch

# The machines have 2 cores; keep tests deterministic and not oversubscribed.
torch.set_num_threads(int(os.environ.get("HISPEC_TEST_THREADS", "2")))
