import os
import warnings

# The verifier runs between passes in every test (DESIGN: on by default in tests).
os.environ.setdefault("MMCOMPILE_VERIFY", "1")
warnings.filterwarnings("ignore", category=FutureWarning)

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU the Triton kernels (mmcompile.kernels) are checked under Triton's interpreter; it is
# chosen when a kernel is defined, so before anything imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# pytest-xdist runs one worker per core: each takes its share of the cores instead of all of them.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; runs on the H100 machine")


@pytest.fixture(scope="session")
def tiny_llama():
    import mmcompile as mmc

    return mmc.models.build("llama:tiny", seed=0)
