import pytest
import torch

from _loopback import start_scripted


def pytest_collection_modifyitems(config, items):
    "Skip `gpu` tests on machines without CUDA, the way `nbdev_test` skips `#| gpu` cells."
    if torch.cuda.is_available(): return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords: item.add_marker(skip)


@pytest.fixture
def scripted_server():
    "Start scripted OpenAI-compatible servers on loopback (`start(script)` -> (server, base url)); all shut down after the test."
    servers = []
    def start(script):
        srv, url = start_scripted(script); servers.append(srv); return srv, url
    yield start
    for s in servers: s.shutdown(); s.server_close()
