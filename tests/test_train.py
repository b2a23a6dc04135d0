"""Training: losses against numpy, the shared step, freezing, accumulation,
checkpoints across meshes, resumption, and the error paths."""

import os
import signal

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import clip_shapes
from mmjax import losses, parallel
from mmjax.train import loop, optim, step as step_lib, tasks


# -- losses ------------------------------------------------------------------

def _log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_clip_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = _unit(rng.normal(size=(6, 5))), _unit(rng.normal(size=(6, 5)))
  scale = 1 / 0.07
  # L = (1/N) sum_i (l(I_i) + l(T_i)) / 2, l(I_i) = -log(e^{I_i.T_i/tau} / sum_j e^{I_i.T_j/tau}).
  logits = scale * img @ txt.T
  l_img = -np.diag(_log_softmax(logits, axis=1))
  l_txt = -np.diag(_log_softmax(logits, axis=0))
  want = np.mean((l_img + l_txt) / 2)
  got, _ = losses.clip_softmax_loss(jnp.asarray(img), jnp.asarray(txt), scale)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_siglip_loss_matches_numpy():
  rng = np.random.default_rng(1)
  img, txt = _unit(rng.normal(size=(5, 4))), _unit(rng.normal(size=(5, 4)))
  logits = 10.0 * img @ txt.T - 10.0
  labels = 2 * np.eye(5) - 1
  want = -np.sum(np.log(1 / (1 + np.exp(-labels * logits)))) / 5
  got, _ = losses.siglip_loss(jnp.asarray(img), jnp.asarray(txt), 10.0, -10.0)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_next_token_loss_ignores_masked_labels():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
  labels = jnp.array([[1, -100, 2], [-100, -100, 6]])
  loss, count = losses.next_token_loss(logits, labels)
  logp = jax.nn.log_softmax(logits)
  want = -(logp[0, 0, 1] + logp[0, 2, 2] + logp[1, 2, 6]) / 3
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert int(count) == 3


# -- a tiny CLIP task on a tiny prepared shapes dataset ------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **overrides) -> ml_collections.ConfigDict:
  c = clip_shapes.get_config("runlocal=true")
  c.model.vision.variant = "tiny/8"
  c.model.text.size = "tiny"
  c.model.embed_dim = 16
  c.batch_size = 16
  c.eval.batch_size = 32
  c.data.data_dir = data_dir
  c.data.builder_kwargs.num_train = 160
  c.data.builder_kwargs.num_validation = 40
  c.data.builder_kwargs.num_test = 40
  c.async_checkpoints = False
  for key, value in overrides.items():
    target = c
    *parents, last = key.split(".")
    for p in parents:
      target = target[p]
    target[last] = value
  return c


def test_gradient_reaches_the_temperature(data_dir):
  task = tasks.build_task(tiny_config(data_dir))
  params = jax.jit(lambda: __import__("flax").linen.meta.unbox(task.init(jax.random.PRNGKey(0))))()
  it = task.train_batches(16, seed=0)
  batch = {k: v for k, v in next(it).items() if k in task.batch_keys}
  grads = jax.jit(jax.grad(lambda p: task.loss(p, batch, None)[0]))(params)
  assert abs(float(grads["log_scale"])) > 1e-6
  assert float(optax.tree.norm(grads["vision"])) > 0 and float(optax.tree.norm(grads["text"])) > 0


def test_frozen_params_hold_no_state_and_do_not_move(data_dir):
  config = tiny_config(data_dir, **{"optim.frozen": ["vision/.*"], "optim.warmup_steps": 0})
  with jax.default_device(jax.devices()[0]):
    s = loop.setup(config, os.path.join(data_dir, "unused"))
  task, tx, mask = s["task"], s["tx"], s["mask"]
  state = jax.jit(lambda: step_lib.init_state(task, tx, 0))()
  n_vision = optim.count_params(state.params["vision"])
  n_total = optim.count_params(state.params)
  assert n_vision > 0
  # Adam keeps mu and nu for trained params only.
  assert optim.opt_state_size(state.opt_state) == 2 * (n_total - n_vision)
  train_step = jax.jit(step_lib.make_train_step(task, tx, mask, s["schedule"]))
  batch = {k: v for k, v in next(task.train_batches(16, seed=0)).items() if k in task.batch_keys}
  new_state, metrics = train_step(state, batch)
  chex.assert_trees_all_equal(new_state.params["vision"], state.params["vision"])
  assert not np.allclose(new_state.params["text"]["final_norm"]["scale"],
                         state.params["text"]["final_norm"]["scale"])
  assert np.isfinite(metrics["train/loss"])


def test_step_compiles_once(data_dir):
  config = tiny_config(data_dir)
  s = loop.setup(config, os.path.join(data_dir, "unused2"))
  task = s["task"]
  raw = step_lib.make_train_step(task, s["tx"], s["mask"], s["schedule"])
  traced = chex.assert_max_traces(raw, n=1)
  with parallel.activate(s["mesh"], s["rules"]):
    state = step_lib.create_state(task, s["tx"], 0, s["mesh"], s["rules"], s["shardings"])
    fn = step_lib.jit_train_step(traced, s["shardings"], s["mesh"], task.batch_spec(16))
    it = task.train_batches(16, seed=0)
    for _ in range(3):
      batch = parallel.host_to_global({k: v for k, v in next(it).items()
                                       if k in task.batch_keys}, s["mesh"])
      state, _ = fn(state, batch)
  assert int(state.step) == 3


def test_batch_size_that_the_mesh_cannot_split_fails_at_start(data_dir):
  config = tiny_config(data_dir, batch_size=12, **{"mesh.data": 8})
  with pytest.raises(ValueError, match="batch_size=12"):
    loop.setup(config, os.path.join(data_dir, "unused3"))


# -- a toy task for the generic parts of the step and the loop ----------------

class _Numbers:
  """A checkpointable iterator of regression batches."""

  def __init__(self, batch_size, seed, nan_at=None, sigterm_at=None):
    self.batch_size, self.seed, self.i, self.nan_at = batch_size, seed, 0, nan_at
    self.sigterm_at = sigterm_at

  def __next__(self):
    if self.i == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice mid-run
    rng = np.random.default_rng([self.seed, self.i])
    x = rng.normal(size=(self.batch_size, 4)).astype(np.float32)
    y = x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    if self.nan_at is not None and self.i >= self.nan_at:
      y = y * np.nan
    self.i += 1
    return {"x": x, "y": y.astype(np.float32)}

  def get_state(self):
    return {"i": self.i}

  def set_state(self, state):
    self.i = state["i"]


@tasks.register("toy_regression")
class _ToyTask:
  batch_keys = ("x", "y")
  frozen = ()

  def __init__(self, config):
    self.config = config

  def init(self, rng):
    return {"w": jax.random.normal(rng, (4,)) * 0.1, "b": jnp.zeros(())}

  def batch_spec(self, n):
    return {"x": jax.ShapeDtypeStruct((n, 4), jnp.float32), "y": jax.ShapeDtypeStruct((n,), jnp.float32)}

  def loss(self, params, batch, rng):
    pred = batch["x"] @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2), {"w0": params["w"][0]}

  def flops_per_example(self):
    return 24.0

  def train_batches(self, batch_size, seed):
    return _Numbers(batch_size, seed, self.config.get("nan_at"), self.config.get("sigterm_at"))

  def evaluate(self, params, mesh, rules):
    return {"w_error": float(jnp.abs(params["w"] - jnp.array([1.0, -2.0, 0.5, 3.0])).max())}


def toy_config(**kw):
  c = ml_collections.ConfigDict(dict(
      task="toy_regression", seed=0, total_steps=12, batch_size=16, log_every=2, eval_every=6,
      checkpoint_every=4, keep_checkpoints=2, async_checkpoints=False, profile_steps=0,
      mesh={"data": -1, "fsdp": 1, "tensor": 1}, nan_at=None, sigterm_at=None,
      optim=dict(lr=0.1, warmup_steps=2, weight_decay=0.0, schedule="cosine", end_lr_ratio=0.0,
                 b1=0.9, b2=0.99, eps=1e-8, clip_norm=0.0, grad_accum=1, frozen=[]),
      eval={"batch_size": 16, "zeroshot": False}))
  c.update(kw)
  return c


def test_gradient_accumulation_equals_the_full_batch():
  config = toy_config()
  task = _ToyTask(config)
  mask = {"w": True, "b": True}
  tx, sched = optim.make_optimizer(config.optim, 10, mask)
  state = jax.jit(lambda: step_lib.init_state(task, tx, 0))()
  batch = next(_Numbers(16, 0))
  full = jax.jit(step_lib.make_train_step(task, tx, mask, sched, grad_accum=1))(state, batch)
  accum = jax.jit(step_lib.make_train_step(task, tx, mask, sched, grad_accum=4))(state, batch)
  chex.assert_trees_all_close(full[0].params, accum[0].params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(full[1]["train/loss"], accum[1]["train/loss"], rtol=1e-5)


def test_loop_writes_metrics_report_and_checkpoints(tmp_path):
  workdir = str(tmp_path / "toy")
  last = loop.train(toy_config(), workdir)
  rows = [__import__("json").loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
  assert {"train/loss", "train/lr", "train/grad_norm", "train/w0"} <= set(rows[-1])
  assert "perf/examples_per_sec" in rows[-1] and "perf/mfu" in rows[-1]
  assert "eval/w_error" in rows[2] and "eval/w_error" in rows[-1]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"]
  assert last["step"] == 12
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))[-2:] == ["12", "8"]
  assert os.path.exists(os.path.join(workdir, "report.png"))
  assert os.path.exists(os.path.join(workdir, "config.json"))
  # Running again resumes at the end: nothing more to do, nothing rewritten.
  loop.train(toy_config(), workdir)
  assert len(open(os.path.join(workdir, "metrics.jsonl")).readlines()) == 6


def test_sigterm_saves_and_a_restart_continues_exactly(tmp_path):
  straight = loop.train(toy_config(), str(tmp_path / "a"))
  stopped = loop.train(toy_config(sigterm_at=5), str(tmp_path / "b"))
  assert stopped["step"] < 12
  # The signal lands while step 6 fetches its batch: step 6 is saved, not only step 4.
  assert "6" in os.listdir(tmp_path / "b" / "checkpoints")
  resumed = loop.train(toy_config(), str(tmp_path / "b"))
  assert resumed["step"] == 12
  np.testing.assert_allclose(resumed["train/loss"], straight["train/loss"], rtol=1e-6, atol=1e-7)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
  workdir = str(tmp_path / "nan")
  with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint is step 4"):
    loop.train(toy_config(nan_at=5), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4"]


def test_incompatible_checkpoint_names_the_keys(tmp_path):
  workdir = str(tmp_path / "toy")
  loop.train(toy_config(total_steps=4), workdir)

  @tasks.register("toy_bigger")
  class Bigger(_ToyTask):
    def init(self, rng):
      return {"w": jnp.zeros((5,)), "b": jnp.zeros(()), "extra": jnp.zeros((2,))}

  from mmjax.checkpoint import CheckpointMismatchError
  with pytest.raises(CheckpointMismatchError, match="params/extra") as err:
    loop.train(toy_config(task="toy_bigger"), workdir)
  assert "params/w saved (4,) vs model (5,)" in str(err.value)


# -- checkpoints across meshes and processes ------------------------------------

def _next_loss(s, state, batch):
  fn = step_lib.jit_train_step(
      step_lib.make_train_step(s["task"], s["tx"], s["mask"], s["schedule"]),
      s["shardings"], s["mesh"], s["task"].batch_spec(16))
  with parallel.activate(s["mesh"], s["rules"]):
    _, metrics = fn(state, parallel.host_to_global(batch, s["mesh"]))
  return float(metrics["train/loss"])


def test_checkpoint_restores_on_other_meshes(data_dir, tmp_path):
  workdir = str(tmp_path / "mesh")
  config = tiny_config(data_dir, **{"mesh.data": 8, "mesh.fsdp": 1, "mesh.tensor": 1})
  s = loop.setup(config, workdir)
  state = step_lib.create_state(s["task"], s["tx"], 0, s["mesh"], s["rules"], s["shardings"])
  s["ckpt"].save(1, state, None, force=True)
  s["ckpt"].close()
  saved = jax.device_get(state.params)
  batch = {k: v for k, v in next(s["task"].train_batches(16, seed=3)).items()
           if k in s["task"].batch_keys}
  want = _next_loss(s, state, batch)

  for mesh, devices in (({"data": 2, "fsdp": 4, "tensor": 1}, None),
                        ({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])):
    other = tiny_config(data_dir, **{f"mesh.{k}": v for k, v in mesh.items()})
    t = loop.setup(other, workdir, devices)
    restored, _ = t["ckpt"].restore(loop.restore_target(t["abstract"], t["shardings"]))
    t["ckpt"].close()
    kernel = restored.params["vision"]["encoder"]["layers"]["block"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.mesh.shape == t["mesh"].shape
    chex.assert_trees_all_equal(jax.device_get(restored.params), saved)
    np.testing.assert_allclose(_next_loss(t, restored, batch), want, rtol=1e-5)


def test_the_loop_compiles_its_step_once(tmp_path, monkeypatch):
  # Logging, evaluation, checkpoints and the preemption check between steps
  # must not change what the step is traced with.
  make = step_lib.make_train_step
  monkeypatch.setattr(step_lib, "make_train_step",
                      lambda *a, **k: chex.assert_max_traces(make(*a, **k), n=1))
  last = loop.train(toy_config(), str(tmp_path / "toy"))
  assert last["step"] == 12
