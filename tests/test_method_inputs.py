"""A method owns its inputs: a method with non-image inputs runs on the unchanged trainer.

The method below is written the way a newcomer would (one class, the hooks of
``idat_jax.methods.base``): it reads vectors, not images, so it overrides ``open_inputs`` and
``prepare_inputs``; the trainer's setup, train step and eval step take it as they are.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idat_jax import config_lib, train
from idat_jax.data import ArraySource, features, inputs
from idat_jax.data.resident import put_resident_train
from idat_jax.methods import Method, ModelSpec, losses, register

DIM, CLASSES, TRAIN, TEST = 8, 3, 48, 20


def _vectors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Linearly separable classes: class k's vectors lie around 3 * e_k."""
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % CLASSES
  x = rng.standard_normal((n, DIM)).astype(np.float32) * 0.3
  x[np.arange(n), labels] += 3.0
  return x, labels.astype(np.int32)


@register
class VectorHead(Method):
  """A linear classifier of fixed vectors (a stand-in for any non-image input)."""
  name = "test_vector_head"
  eval_model = "head"

  def open_inputs(self, mesh, workdir):
    self.train_xy, self.test_xy = _vectors(TRAIN, 0), _vectors(TEST, 1)
    labels = ArraySource(np.zeros((TRAIN, 1, 1, 3), np.uint8), self.train_xy[1], name="vectors")
    return inputs.data_facts(self.config, labels)

  def models(self):
    return {"head": ModelSpec(nn.Dense(self.num_classes), "", [(".*", True)],
                              example_input=jnp.zeros((2, DIM), jnp.float32))}

  def prepare_inputs(self, params, mesh, workdir):
    resident = put_resident_train(*self.train_xy, mesh)
    train_data = inputs.TrainData(TRAIN, self.num_classes, features.feature_batch,
                                  resident=resident)
    batches = features.FeatureEval.create(*self.test_xy, self.config.eval_batch_size, mesh)
    return train_data, inputs.EvalData(batches, features.feature_input)

  def loss(self, params, batch, rng, extra):
    logits = self.specs["head"].module.apply({"params": params["head"]}, batch["feature"])
    ce = losses.cross_entropy(logits, batch["label"])
    return ce, {"loss": ce}, extra

  def predict(self, params, x, extra):
    return self.specs["head"].module.apply({"params": params["head"]}, x)


def _config(num_classes=None):
  c = config_lib.base_config()
  c.method = VectorHead.name
  c.batch_size, c.eval_batch_size, c.num_devices = 16, 8, 1
  c.data.num_classes = num_classes
  c.optim.update(dict(lr=0.1, schedule="constant", epochs=4, cooldown_epochs=0,
                      weight_decay=0.0))
  return c


def test_a_method_with_its_own_inputs_trains_and_evaluates_on_the_generic_trainer(tmp_path):
  config = _config()
  s = train.setup(config, str(tmp_path / "run"))
  # The data's facts went to the method; the config keeps the user's (absent) value.
  assert (s.method.num_classes, s.method.train_examples) == (CLASSES, TRAIN)
  assert config.data.num_classes is None
  assert s.steps_per_epoch == TRAIN // 16 and s.total_steps == 12
  step = train.make_train_step(s)
  state, first = step(s.state, s.frozen, s.train_data.resident)
  for _ in range(s.total_steps - 1):
    state, last = step(state, s.frozen, s.train_data.resident)
  assert float(last["loss"]) < 0.5 * float(first["loss"])
  result = train.evaluate(s, train.make_eval_step(s), state, s.get_eval_data())
  # The eval step fed the cached vectors to predict unchanged (no image normalisation).
  head = jax.device_get(state["trainable"]["head"])
  x, y = s.method.test_xy
  want = 100.0 * np.mean(np.argmax(x @ head["kernel"] + head["bias"], -1) == y)
  assert result == {"top1": pytest.approx(want), "eval_examples": TEST}
  assert want > 90.0


def test_a_given_class_count_is_checked_against_the_data(tmp_path):
  with pytest.raises(ValueError, match=r"num_classes=4 but vectors has 3 classes"):
    train.setup(_config(num_classes=4), str(tmp_path / "run"))
