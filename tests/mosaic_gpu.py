"""What the tests of the warp-specialised Mosaic GPU kernels share: the interpret params (None where this
JAX has no Mosaic GPU interpreter) and `interpreter`, a context that speeds it up and cleans up after it.

On a GPU (JAX_PLATFORMS=cuda) the kernels compile and run; on the CPU they run in the Mosaic GPU
interpreter, whose warpgroups, barriers, TMA copies, loop bounds and masks are the real ones.
"""

import contextlib
import threading

import jax
import jax.numpy as jnp

from tests.parity import rel_err

ON_GPU = jax.default_backend() == "gpu"

try:  # The Mosaic GPU interpreter has no public entry point in JAX 0.10.
  from jax._src.pallas.mosaic.interpret import thread_map as _thread_map
  from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import (
    reset_gpu_interpret_mode_state,
  )
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
except ImportError:
  InterpretGPUParams = None

AVAILABLE = ON_GPU or InterpretGPUParams is not None
INTERPRET = False if ON_GPU or InterpretGPUParams is None else InterpretGPUParams()


@contextlib.contextmanager
def compile_thread_programs_once():
  """The interpreter compiles each simulated warpgroup's program afresh at every grid point (JAX 0.10:
  a new jax.jit per call defeats its cache), which makes the tests 5x slower; compile once per program."""
  if ON_GPU or not hasattr(_thread_map, "_run_jaxpr"):
    yield
    return
  original, compiled, lock = _thread_map._run_jaxpr, {}, threading.Lock()

  def run(jaxpr, consts, *args):
    with lock:
      if jaxpr not in compiled:
        compiled[jaxpr] = jax.jit(_eval, static_argnums=(0,)).trace(jaxpr, consts, *args).lower().compile()
    compiled[jaxpr](consts, *args)

  _thread_map._run_jaxpr = run
  try:
    yield
  finally:
    _thread_map._run_jaxpr = original


def _eval(jaxpr, consts, *args):
  jax.core.eval_jaxpr(jaxpr, consts, *args)


def reset_interpreter():
  """After a failure the interpreter's shared state is left dirty."""
  if not ON_GPU:
    reset_gpu_interpret_mode_state()


def assert_same_loss_and_grads(f, f_ref, args, tol=1e-2, grad_tol=2e-2):
  """sum(f(*args)^2) and its gradients in every arg against f_ref's: a dispatch to a kernel (whose custom_vjp
  differentiates the jnp form) agrees with the jnp form itself."""
  def loss(g):
    return lambda *a: jnp.sum(g(*a).astype(jnp.float32) ** 2)

  argnums = tuple(range(len(args)))
  val, grads = jax.value_and_grad(loss(f), argnums=argnums)(*args)
  val_ref, grads_ref = jax.value_and_grad(loss(f_ref), argnums=argnums)(*args)
  assert abs(float(val) - float(val_ref)) < tol * abs(float(val_ref))
  for g, r in zip(grads, grads_ref, strict=True):
    assert rel_err(g, r) < grad_tol
