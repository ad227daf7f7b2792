import pytest
import torch


def pytest_collection_modifyitems(config, items):
    "Skip `gpu` tests on machines without CUDA, the way `nbdev_test` skips `#| gpu` cells."
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords: item.add_marker(skip)
