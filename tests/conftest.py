import torch

# Tiny test models are dominated by thread start-up cost, and the CI machine
# has 2 cores shared by the test process and the ranks it spawns.
torch.set_num_threads(1)
