import torch

# Tiny test models are dominated by thread start-up cost, and the CI machine
# has 2 cores shared by the test process and the ranks it spawns.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: skipped without it (CPU CI), run by
    ``make gpu-check`` on a GPU machine."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs it)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
