import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny models run fastest on one thread, and on a shared 2-core machine extra OpenMP threads spin
    # against other processes (a 1 s training run took 45 s with 2 threads under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
