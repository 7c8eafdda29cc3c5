"""Test configuration: on a machine without CUDA, the Triton kernels run through Triton's interpreter.

TRITON_INTERPRET must be set before Triton decorates any kernel, so it is set here, before the test
modules import tileattn. The interpreter computes bfloat16 wrongly, so bf16 runs on the GPU only.
"""

import os
import random
import sys
import tempfile
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests use local or random weights only; never reach the Hub
# Dispatch reads calibration files from the user's cache dir: tests start from an empty one of their own.
os.environ["TILEATTN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tileattn-test-cache-")
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
# Kernel dtypes we can check here: the interpreter gets bf16 wrong (see BLUEPRINT.md).
KERNEL_DTYPES = [torch.float16, torch.bfloat16, torch.float32] if HAS_CUDA else [torch.float16, torch.float32]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped cleanly without one)")
    config.addinivalue_line("markers", "large_memory: allocates several GB of GPU memory (one such test at a time)")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fresh random inputs on every run, reproducible by exporting the seed the header prints.
SEED = int(os.environ.get("TILEATTN_TEST_SEED", random.randrange(2**31)))


def pytest_report_header(config):
    return f"tileattn: TILEATTN_TEST_SEED={SEED}, device={DEVICE}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    torch.manual_seed(SEED + zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def _one_large_memory_test_at_a_time(request):
    """GPU tests marked ``large_memory`` allocate several GB each: under pytest-xdist they take a file lock shared
    by the workers, so one runs at a time (at ``-n 14`` on an 80 GB H100 they ran out of memory together), and
    give their memory back after. Autouse, so the lock is held before the test's own fixtures allocate."""
    if not (HAS_CUDA and request.node.get_closest_marker("large_memory")) or sys.platform == "win32":
        yield
        return
    import fcntl

    with open(os.path.join(tempfile.gettempdir(), "tileattn-tests-large-memory.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            torch.cuda.empty_cache()
            fcntl.flock(lock, fcntl.LOCK_UN)
