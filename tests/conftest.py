"""Test configuration: offline by default; ``slow`` tests opt-in, ``gpu`` tests need CUDA, ``weights`` need real checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    run_slow = config.getoption("--run-slow") or os.environ.get("DIFFRL_RUN_SLOW") == "1"
    has_cuda = torch.cuda.is_available()
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow test: run with --run-slow"))
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "weights" in item.keywords and offline:
            item.add_marker(pytest.mark.skip(reason="needs real checkpoints from the hub (HF_HUB_OFFLINE=1)"))


class GaussianFlow:
    """Exact flow-matching velocity for 1-D data ``x0 ~ N(m, c^2)`` with ``x_s = (1 - s) x0 + s eps``.

    ``v(x, s) = E[eps - x0 | x_s = x]``, computed in closed form from the joint Gaussian of (x0, eps, x_s).
    """

    def __init__(self, m: float, c: float):
        self.m, self.c = m, c

    def velocity(self, x, sigma, cond=None, guidance_scale=1.0):
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        var = (1 - s) ** 2 * self.c**2 + s**2
        r = x - (1 - s) * self.m
        e_eps = s / var * r
        e_x0 = self.m + (1 - s) * self.c**2 / var * r
        return e_eps - e_x0


@pytest.fixture
def gaussian_flow():
    return GaussianFlow(1.5, 0.5)


@pytest.fixture(scope="module")
def one_thread():
    """Small tensors: one intra-op thread is faster, and much faster on a shared, busy machine."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def private_tiny_cache(tmp_path_factory):
    """A tiny-model cache (``DIFFRL_CACHE``) of the test module's own, the previous one restored afterwards; use it
    with ``pytestmark = pytest.mark.usefixtures("private_tiny_cache")``."""
    old = os.environ.get("DIFFRL_CACHE")
    os.environ["DIFFRL_CACHE"] = str(tmp_path_factory.mktemp("diffrl-cache"))
    yield
    if old is None:
        os.environ.pop("DIFFRL_CACHE", None)
    else:
        os.environ["DIFFRL_CACHE"] = old


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One tiny-model cache for the test process and every launched process, built before any launch (two
    processes building it at once would race)."""
    from diffrl.models.loading import tiny_model_dir

    old = os.environ.get("DIFFRL_CACHE")
    cache = tmp_path_factory.mktemp("diffrl-cache-dist")
    os.environ["DIFFRL_CACHE"] = str(cache)
    tiny_model_dir("tiny:sd3")
    yield cache
    if old is None:
        os.environ.pop("DIFFRL_CACHE", None)
    else:
        os.environ["DIFFRL_CACHE"] = old


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision cannot change once set: start from a clean one
    and leave a clean one for the next test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
