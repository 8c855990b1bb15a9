"""Selective scan: every XLA implementation against the float64 numpy oracle."""
import jax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from toppax.ssm import selective_scan
from tests import scan_utils

IMPLS = ["reference", "xla"]
KEYS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


_rel = scan_utils.rel


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [1, 7, 33])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("options", ["none", "D", "z", "bias", "all"])
def test_forward_matches_oracle(impl, length, reverse, options):
  x = scan_utils.random_inputs(length * 7 + reverse, 2, length, 6, 4)
  kw = {k: x[k] for k in ("u", "delta", "A", "B", "C")}
  if options in ("D", "all"):
    kw["D"] = x["D"]
  if options in ("z", "all"):
    kw["z"] = x["z"]
  if options in ("bias", "all"):
    kw["delta_bias"] = x["delta_bias"]
  ref = scan_utils.numpy_scan(**kw, reverse=reverse)
  y = selective_scan(**{k: jnp.asarray(v) for k, v in kw.items()}, reverse=reverse,
                     implementation=impl)
  assert y.shape == ref.shape and y.dtype == jnp.float32
  assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_no_softplus(impl):
  x = scan_utils.random_inputs(3, 2, 9, 5, 3)
  x["delta"] = np.abs(x["delta"]) * 0.3
  ref = scan_utils.numpy_scan(**x, delta_softplus=False)
  y = selective_scan(**{k: jnp.asarray(v) for k, v in x.items()}, delta_softplus=False,
                     implementation=impl)
  assert _rel(y, ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("gap_delta", ["prev", "bias"])
def test_gaps_equal_masked_full_length_oracle(impl, reverse, gap_delta):
  full = scan_utils.random_inputs(11, 3, 23, 5, 4)
  pos, gaps_f, gaps_b = scan_utils.random_keep(5, 3, 23, 9)
  compact = scan_utils.compact(full, pos)
  gaps = gaps_b if reverse else gaps_f
  y = selective_scan(**{k: jnp.asarray(v) for k, v in compact.items()}, reverse=reverse,
                     gaps=jnp.asarray(gaps), gap_delta=gap_delta, implementation=impl)
  oracle = scan_utils.masked_oracle(full, pos, reverse=reverse, gap_delta=gap_delta)
  assert _rel(y, oracle) < 1e-5
  # The closed-form oracle with gaps agrees too, and alignment really changes the result.
  np.testing.assert_allclose(
      scan_utils.numpy_scan(**compact, reverse=reverse, gaps=gaps, gap_delta=gap_delta), oracle,
      rtol=1e-6, atol=1e-7)
  plain = selective_scan(**{k: jnp.asarray(v) for k, v in compact.items()}, reverse=reverse,
                         implementation=impl)
  assert _rel(plain, oracle) > 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_gaps_are_a_no_op(impl):
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(2, 2, 8, 4, 3).items()}
  a = selective_scan(**x, implementation=impl)
  b = selective_scan(**x, gaps=jnp.zeros((2, 8), jnp.int32), implementation=impl)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_inputs_keep_fp32_state(impl):
  x = scan_utils.random_inputs(4, 2, 40, 8, 4)
  lo = {k: (jnp.asarray(v, jnp.bfloat16) if k in ("u", "delta", "B", "C", "z") else jnp.asarray(v))
        for k, v in x.items()}
  y = selective_scan(**lo, implementation=impl)
  assert y.dtype == jnp.bfloat16
  ref = scan_utils.numpy_scan(**{k: np.asarray(v, np.float32) for k, v in lo.items()})
  assert _rel(y, ref) < 5e-3


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_finite_differences_float64(impl, reverse):
  with jax.enable_x64(True):
    x = scan_utils.random_inputs(8, 2, 5, 3, 2, dtype=np.float64)
    args = tuple(jnp.asarray(x[k], jnp.float64) for k in KEYS)
    gaps = jnp.asarray([[0, 2, 0, 1, 0], [1, 0, 0, 3, 0]], jnp.float64)

    def f(*a):
      return selective_scan(*a, reverse=reverse, gaps=gaps, implementation=impl)

    jtu.check_grads(f, args, order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


def test_implementations_agree_on_gradients():
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(9, 2, 13, 6, 4).items()}
  gaps = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, 13)))

  def loss(impl):
    return lambda *a: jnp.sum(jnp.sin(selective_scan(*a, gaps=gaps, reverse=True,
                                                      implementation=impl)))

  g_ref = jax.grad(loss("reference"), argnums=tuple(range(8)))(*[x[k] for k in KEYS])
  g_xla = jax.grad(loss("xla"), argnums=tuple(range(8)))(*[x[k] for k in KEYS])
  for k, a, b in zip(KEYS, g_ref, g_xla):
    assert _rel(b, a) < 1e-5, k


def test_associative_scan_lengths_avoid_empty_levels():
  # reference.zero_free_length: lax.associative_scan's halving recursion never reaches a level of
  # 2 elements (which combines empty slices; jaxlib 0.11's SPMD partitioner crashes on them under
  # shard_map, tests/test_sharding.py), and it is the smallest such length. The padded lengths
  # (5, 33 above) are checked against the oracle and by finite differences there.
  from toppax.ssm.reference import zero_free_length

  def levels(n):
    while n >= 2:
      yield n
      n //= 2

  for n in range(0, 1100):
    m = zero_free_length(n)
    assert m >= n and 2 not in levels(m), n
    assert all(2 in levels(k) for k in range(n, m)), n
  assert [zero_free_length(n) for n in (8, 9, 157, 197, 256)] == [12, 12, 192, 197, 384]


def test_errors_are_clear():
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(1, 1, 4, 3, 2).items()}
  with pytest.raises(ValueError, match="unknown selective_scan implementation 'cuda'.*xla"):
    selective_scan(**x, implementation="cuda")
  with pytest.raises(ValueError, match="B must be"):
    selective_scan(**{**x, "B": x["B"][:, :, :1]})
  with pytest.raises(ValueError, match="gaps must be"):
    selective_scan(**x, gaps=jnp.zeros((1, 5)))
  with pytest.raises(ValueError, match="gap_delta"):
    selective_scan(**x, gaps=jnp.zeros((1, 4)), gap_delta="next")


def test_default_dispatch_on_cpu_is_xla():
  from toppax.ssm import default_implementation
  assert default_implementation("cpu") == "xla"
