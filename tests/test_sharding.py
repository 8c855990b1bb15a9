"""Data parallel on forced host devices: one train step on 8 == the same step on one; the kernels
and the xla scan per shard under shard_map.

XLA_FLAGS must be set before jax initialises, so the comparison runs in a subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_on_host_devices(script, devices):
  """Runs `script` in a fresh Python on `devices` forced CPU devices (XLA_FLAGS must be set
  before jax initialises); returns its stdout, failing with its stderr if it did not exit 0."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
  return proc.stdout


def _result(stdout):
  """The JSON a script printed on its ``RESULT `` line."""
  line = next(ln for ln in stdout.splitlines() if ln.startswith("RESULT "))
  return json.loads(line[len("RESULT "):])


SCRIPT = textwrap.dedent("""
  import json
  import jax, numpy as np
  from configs import digits
  from toppax import factory, input_pipeline, optim, sharding, train

  c = digits.get_config()
  c.model.depth, c.model.embed_dim, c.model.d_state = 2, 32, 4
  c.batch_size = 32
  c.model.drop_path_rate = 0.0     # per-sample masks would be drawn per device layout
  c.aug.mixup = 0.5                 # the mixing partner crosses device boundaries
  c.aug.randaug_layers = 0          # per-image ops; leaving them out halves compilation
  src = input_pipeline.DigitsSource("train")
  plan = input_pipeline.TrainPlan(len(src), c.batch_size)
  batches = list(input_pipeline.train_batches(src, plan, c, 0, 2))
  out = {"devices": jax.device_count()}
  for n in (1, 8):
    mesh = sharding.make_mesh(n)
    schedule = optim.lr_schedule(c, plan.steps_per_epoch, 100)
    tx = optim.make_optimizer(c, schedule)
    defs = factory.model_defs(c)
    state = factory.init_state(c, defs, tx, mesh)
    step = train.make_train_step(c, defs, tx, schedule, mesh)
    losses = []
    for b in batches:
      g = sharding.to_global(b, mesh)
      out[f"shards_{n}"] = len(g["image"].addressable_shards)
      out[f"shard_rows_{n}"] = g["image"].addressable_shards[0].data.shape[0]
      state, m = step(state, g)
      losses.append(float(m["loss"]))
    out[f"loss_{n}"] = losses
    out[f"head_{n}"] = np.asarray(state["params"]["head"]["kernel"]).ravel().tolist()
  print("RESULT " + json.dumps(out))
""")


def test_eight_device_step_matches_one_device():
  r = _result(_run_on_host_devices(SCRIPT, 8))
  assert r["devices"] == 8
  assert (r["shards_1"], r["shard_rows_1"]) == (1, 32)
  assert (r["shards_8"], r["shard_rows_8"]) == (8, 4)      # the batch really is split
  assert r["loss_1"][0] > 1.0                              # a real loss, not a constant
  for a, b in zip(r["loss_1"], r["loss_8"]):
    assert abs(a - b) <= 1e-5 * abs(a), (r["loss_1"], r["loss_8"])
  # After two updates the parameters agree too (the gradient all-reduce is right).
  diff = max(abs(x - y) for x, y in zip(r["head_1"], r["head_8"]))
  assert diff < 1e-5, diff


KERNEL_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp
  from jax.sharding import PartitionSpec as P
  from toppax.ssm import selective_scan
  mesh = jax.make_mesh((2,), ("data",), (jax.sharding.AxisType.Auto,))
  B, L, D, N = 4, 7, 40, 4
  k = jax.random.split(jax.random.key(0), 5)
  u, dt = jax.random.normal(k[0], (B, L, D)), jax.random.normal(k[1], (B, L, D))
  A = -jnp.exp(jax.random.normal(k[2], (D, N)))
  Bm, C = jax.random.normal(k[3], (B, L, N)), jax.random.normal(k[4], (B, L, N))
  ref = jax.grad(lambda *a: selective_scan(*a, implementation="reference").sum(),
                 argnums=(0, 2))(u, dt, A, Bm, C)
  for impl in ("pallas_gpu", "pallas_tpu"):
    def per_shard(u, dt, A, Bm, C):
      y = selective_scan(u, dt, A, Bm, C, implementation=impl, interpret=True)
      return jax.lax.psum(y.sum(), "data")
    f = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P("data"), P(), P("data"),
                      P("data")), out_specs=P(), check_vma=False)
    g = jax.jit(jax.grad(f, argnums=(0, 2)))(u, dt, A, Bm, C)
    err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(g, ref))
    print("RESULT", impl, err)
""")


def test_kernels_run_per_shard_with_summed_parameter_gradients():
  # The data-parallel step runs the model under shard_map (toppax.sharding.apply_model) so that
  # the kernels' custom calls see only their shard; dA (a replicated input) must be summed.
  out = _run_on_host_devices(KERNEL_SCRIPT, 2)
  errs = {l.split()[1]: float(l.split()[2]) for l in out.splitlines()
          if l.startswith("RESULT ")}
  assert set(errs) == {"pallas_gpu", "pallas_tpu"}
  assert all(e < 1e-5 for e in errs.values()), errs


SCAN_SCRIPT = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from toppax import factory, optim, sharding
  from toppax.ssm import selective_scan
  from tests import scan_utils

  mesh = sharding.make_mesh(2)
  out = {}
  for length, reverse in ((9, False), (8, True), (157, False)):
    x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(4, 4, length, 6, 3).items()}

    def scan(u, A, delta, B, C, z):
      return selective_scan(u, delta, A, B, C, x["D"], z, x["delta_bias"], reverse=reverse,
                            implementation="xla")

    def loss(u, A, sharded):
      args = (u, A, x["delta"], x["B"], x["C"], x["z"])
      if sharded:   # the batch split over the mesh, A replicated
        d = P(sharding.DATA_AXIS)
        y = jax.shard_map(scan, mesh=mesh, in_specs=(d, P(), d, d, d, d), out_specs=d,
                          check_vma=False)(*args)
      else:
        y = scan(*args)
      return jnp.sum(jnp.sin(y))

    g1 = jax.jit(jax.grad(lambda u, A: loss(u, A, False), argnums=(0, 1)))(x["u"], x["A"])
    g2 = jax.jit(jax.grad(lambda u, A: loss(u, A, True), argnums=(0, 1)))(x["u"], x["A"])
    out[f"{length}/{reverse}"] = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                  for a, b in zip(g1, g2)]
  print("RESULT " + json.dumps(out))
""")


def test_xla_scan_gradient_under_shard_map():
  # The "xla" scan's gradient inside shard_map on 2 host devices, at lengths where
  # lax.associative_scan would make empty arrays (9, 8, 157: see reference.zero_free_length).
  # jaxlib 0.11.2's SPMD partitioner segfaulted on those before the padding.
  diffs = _result(_run_on_host_devices(SCAN_SCRIPT, 2))
  assert len(diffs) == 3
  for case, (du, da) in diffs.items():
    assert du < 1e-5 and da < 1e-4, (case, du, da)


VMA_SCRIPT = textwrap.dedent("""
  import json
  import jax, jax.numpy as jnp, numpy as np
  from jax.sharding import PartitionSpec as P
  from toppax import factory, optim, sharding
  from toppax.ssm import selective_scan
  from tests import scan_utils

  mesh = sharding.make_mesh(2)
  x = {k: jnp.asarray(v) for k, v in scan_utils.random_inputs(5, 4, 7, 6, 3).items()}
  gaps = jnp.asarray(np.random.default_rng(0).integers(0, 3, (4, 7)), jnp.int32)
  out = {}
  for impl in ("reference", "xla", "pallas_tpu"):
    def scan(u, delta, B, C, z, gaps, A, D, bias):
      return selective_scan(u, delta, A, B, C, D, z, bias, reverse=True, gaps=gaps,
                            implementation=impl, interpret=impl.startswith("pallas"))

    def loss(A, D, bias, u, sharded):
      args = (u, x["delta"], x["B"], x["C"], x["z"], gaps, A, D, bias)
      if sharded:   # the batch split over the mesh, the parameters replicated; vma checked
        d = P(sharding.DATA_AXIS)
        y = jax.shard_map(scan, mesh=mesh, in_specs=(d,) * 6 + (P(),) * 3, out_specs=d,
                          check_vma=True)(*args)
      else:
        y = scan(*args)
      return jnp.sum(jnp.sin(y))

    params = (x["A"], x["D"], x["delta_bias"], x["u"])
    g1 = jax.jit(jax.grad(lambda *p: loss(*p, False), argnums=(0, 1, 2, 3)))(*params)
    g2 = jax.jit(jax.grad(lambda *p: loss(*p, True), argnums=(0, 1, 2, 3)))(*params)
    out[impl] = [float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(a)).max())
                 for a, b in zip(g1, g2)]
  print("RESULT " + json.dumps(out))
""")


def test_scan_under_shard_map_with_checked_varying_axes():
  # jax.shard_map's default check_vma=True: the lax.scan carry and the kernels' outputs must
  # be typed as varying over the mesh, and the replicated parameters' gradients (A, D,
  # delta_bias) summed over it. The Triton-style GPU kernel cannot run here: jax's Pallas
  # interpreter itself fails on its dynamic Ref indexing under check_vma; its CUDA lowering
  # under check_vma is tested in test_scan_kernels.py.
  errs = _result(_run_on_host_devices(VMA_SCRIPT, 2))
  assert set(errs) == {"reference", "xla", "pallas_tpu"}
  for impl, rel in errs.items():
    assert max(rel) < 1e-5, (impl, rel)
