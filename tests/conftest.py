"""Suite-wide settings: tiny models run fastest on one thread, and the CI machine has two shared cores."""

import torch

torch.set_num_threads(1)
