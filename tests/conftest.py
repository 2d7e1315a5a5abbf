import os

# Tests run on the CPU; 8 host devices let sharding tests build meshes.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402  (after the environment above, which JAX reads when first imported)

from tests import mosaic_gpu  # noqa: E402


@pytest.fixture(scope="module")
def _mosaic_gpu_programs():
  with mosaic_gpu.compile_thread_programs_once():
    yield


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
  """Each test module's compiled executables go with it: the interpreter's thousands of small programs, kept
  over the whole suite, once crashed XLA's CPU compiler late in a run (a segfault in test_ssd.py)."""
  yield
  import jax

  jax.clear_caches()


@pytest.fixture
def mosaic_gpu_interpreter(_mosaic_gpu_programs):
  """For tests of the Mosaic GPU kernels: each interpreted program compiles once per module, and the
  interpreter's state is reset after each test."""
  yield
  mosaic_gpu.reset_interpreter()
