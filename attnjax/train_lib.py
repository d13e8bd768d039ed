"""Training and evaluation: `train_and_evaluate(config, workdir)`.

The same code runs on one CPU, on 8 simulated devices and on several hosts:
parameters are sharded by their logical axes over a `data` x `model` mesh,
batches over `data`, and the train step is one `jax.jit` with in/out
shardings and a donated state. Checkpoints (with the data iterator's position)
let a run resume exactly; the run's config is saved in the workdir so a
checkpoint can be reused with `--workdir` alone (see `attnjax.cli`).
"""

import dataclasses
import difflib
import functools
import json
import logging
import math
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax.training import train_state

from attnjax import decoding
from attnjax.data import parallel, pipeline, synthetic
from attnjax.data import vocab as vocab_lib
from attnjax.models import seq2seq, transformer
from attnjax.training import checkpoints, metrics, optim, sharding

Array = jax.Array
CONFIG_FILE = 'config.json'

# Config fields that define the model and its data representation: a
# checkpoint is only reusable under the same values.
_IDENTITY_FIELDS = (
  'model',
  'data.task',
  'data.n_numbers',
  'data.largest',
  'data.alphabet',
  'data.min_len',
  'data.max_len',
  'data.reverse',
  'data.languages',
  'data.train_split',
  'data.joint_vocab',
  'data.vocab_size',
  'data.vocab_model_type',
  'data.character_coverage',
  'data.max_source_len',
  'data.max_target_len',
)
# Fields of config.data that are not arguments of the task.
_DATA_FIELDS = ('task', 'seed', 'heldout_size')
# config.model.architecture -> the model's config class.
ARCHITECTURES = {
  'rnn': seq2seq.Seq2SeqConfig,
  'transformer': transformer.TransformerConfig,
}

Task = synthetic.Task | parallel.TranslationTask
TrainState = train_state.TrainState


# ---------------------------------------------------------------------------
# Config checks.


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Range checks that must fail before anything is compiled."""

  def need(ok: bool, field: str, requirement: str) -> None:
    if not ok:
      value = _lookup(config, field)
      raise ValueError(
        f'config.{field}={value!r} is invalid: it must be {requirement}. '
        f'Fix it in the config file or with --config.{field}=...'
      )

  def is_int(field: str, minimum: int, maximum: int | None = None) -> None:
    value = _lookup(config, field)
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
    ok = ok and value >= minimum and (maximum is None or value <= maximum)
    bounds = f'in [{minimum}, {maximum}]' if maximum else f'>= {minimum}'
    need(ok, field, f'an integer {bounds}')

  for field in (
    'batch_size',
    'eval_batch_size',
    'num_train_steps',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'data.heldout_size',
  ):
    is_int(field, 1)
  is_int('optimizer.warmup_steps', 0)
  # jax.random.key takes 32 bits: 2**32 would be the key of seed 0.
  is_int('seed', 0, 2**32 - 1)
  is_int('data.seed', 0, 2**32 - 1)
  need(0 <= config.label_smoothing < 1, 'label_smoothing', 'in [0, 1)')
  opt = config.optimizer
  need(
    opt.name in optim.OPTIMIZERS, 'optimizer.name', f'one of {optim.OPTIMIZERS}'
  )
  need(
    opt.schedule in optim.SCHEDULES,
    'optimizer.schedule',
    f'one of {optim.SCHEDULES}',
  )
  need(opt.learning_rate > 0, 'optimizer.learning_rate', '> 0')
  need(opt.clip_norm >= 0, 'optimizer.clip_norm', '>= 0 (0 disables)')
  need(0 <= opt.b1 < 1, 'optimizer.b1', 'in [0, 1)')
  need(0 <= opt.b2 < 1, 'optimizer.b2', 'in [0, 1)')
  need(opt.eps > 0, 'optimizer.eps', '> 0')
  need(opt.weight_decay >= 0, 'optimizer.weight_decay', '>= 0')
  need(
    opt.weight_decay == 0 or opt.name == 'adamw',
    'optimizer.weight_decay',
    "0 with optimizer.name='adam' (set optimizer.name='adamw' for weight "
    'decay)',
  )
  _check_known_fields(config)


# The fields train_lib reads, per section (config.data is checked by the
# task it names, config.model by the model's config class).
_KNOWN_FIELDS = {
  '': {
    'seed',
    'data',
    'model',
    'optimizer',
    'batch_size',
    'eval_batch_size',
    'num_train_steps',
    'label_smoothing',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'keep_checkpoints',
    'init_from',
    'mesh',
  },
  'optimizer': {
    'name',
    'learning_rate',
    'schedule',
    'warmup_steps',
    'weight_decay',
    'clip_norm',
    'b1',
    'b2',
    'eps',
  },
  'mesh': {'data', 'model', 'num_devices'},
}


def _check_known_fields(config: ml_collections.ConfigDict) -> None:
  """Catches fields added from Python that nothing reads (typos)."""
  for section, known in _KNOWN_FIELDS.items():
    node = config[section] if section else config
    unknown = sorted(set(node.keys()) - known)
    if not unknown:
      continue
    hints = []
    for name in unknown:
      close = difflib.get_close_matches(name, known, n=1)
      hints.append(
        f'{name!r}' + (f' (did you mean {close[0]!r}?)' if close else '')
      )
    where = f'config.{section}' if section else 'config'
    raise ValueError(
      f'{where} has fields nothing reads: {", ".join(hints)}. Known: '
      f'{", ".join(sorted(known))}.'
    )


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> Any:
  value = config
  for part in dotted.split('.'):
    value = value.get(part) if hasattr(value, 'get') else None
  return value


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def _changed_fields(config: ml_collections.ConfigDict, workdir) -> list[str]:
  """Config fields whose values differ from the config saved in `workdir`."""
  if not (pathlib.Path(workdir) / CONFIG_FILE).exists():
    return []
  saved = _flat(load_config(workdir).to_dict())
  current = _flat(json.loads(config.to_json_best_effort()))
  # A model field added since the workdir was written is not a change
  # when the config leaves it at the default the old model was built with.
  for key, default in _model_defaults(saved).items():
    if key in current and key not in saved:
      saved[key] = default
  # Likewise config.data.languages, added since (only parallel_text sets it).
  if 'data.languages' in current and 'data.languages' not in saved:
    saved['data.languages'] = []
  # The same codes, however given: --config.data.languages=de,en is saved
  # as ['de,en'], a config file's ('de', 'en') as ['de', 'en'].
  for flat in (saved, current):
    if isinstance(codes := flat.get('data.languages'), list | str):
      flat['data.languages'] = list(parallel.split_codes(codes))
  return [
    f'{key}: {saved.get(key)!r} -> {current.get(key)!r}'
    for key in sorted(set(saved) | set(current))
    if saved.get(key) != current.get(key)
  ]


def _model_defaults(flat_config: dict[str, Any]) -> dict[str, Any]:
  """{'model.<field>': default} of the model config class `flat_config`
  names, for the fields that have a JSON-typed default."""
  architecture = flat_config.get('model.architecture', 'rnn')
  config_class = ARCHITECTURES.get(architecture)
  if config_class is None:
    return {}
  return {
    f'model.{field.name}': field.default
    for field in dataclasses.fields(config_class)
    if isinstance(field.default, bool | int | float | str)
  }


def check_config_matches(config: ml_collections.ConfigDict, workdir) -> None:
  """Refuses a workdir whose checkpoints belong to another model or task."""
  if checkpoints.latest_step(workdir) is None:
    return
  differ = [
    change
    for change in _changed_fields(config, workdir)
    if change.startswith(_IDENTITY_FIELDS)
  ]
  if differ:
    raise ValueError(
      f'workdir {workdir} holds checkpoints of a different model or task '
      f'({", ".join(differ)}). Use a new --workdir, or delete '
      f'{pathlib.Path(workdir) / checkpoints.CHECKPOINT_DIR} to start fresh.'
    )


def save_config(config: ml_collections.ConfigDict, workdir) -> None:
  if jax.process_index() == 0:
    path = pathlib.Path(workdir) / CONFIG_FILE
    path.write_text(config.to_json_best_effort(indent=2))


def load_config(workdir) -> ml_collections.ConfigDict:
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
      f'{path} not found: --workdir must be a directory written by train.py '
      '(it saves its config there).'
    )
  fix = (
    'Restore it from a copy of the workdir, or rewrite it from the config '
    'the run was trained with.'
  )
  try:
    fields = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(
      f'{path} is not valid JSON ({e}); it was damaged after train.py wrote '
      f'it. {fix}'
    ) from None
  sections = ('data', 'model', 'optimizer', 'mesh')
  if not isinstance(fields, dict) or not all(
    isinstance(fields.get(name), dict) for name in sections
  ):
    raise ValueError(
      f'{path} is not a config train.py wrote: it must be a JSON object '
      f'with the sections {", ".join(sections)}. {fix}'
    )
  return ml_collections.ConfigDict(fields)


# ---------------------------------------------------------------------------
# The experiment: everything derived from the config, before any arrays.


@dataclasses.dataclass
class Experiment:
  config: ml_collections.ConfigDict
  task: Task
  model: nn.Module
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  abstract_state: Any  # boxed ShapeDtypeStructs (with logical axes)
  state_shardings: Any

  @classmethod
  def create(
    cls,
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path | None = None,
    *,
    train_vocab: bool = True,
  ) -> 'Experiment':
    """Everything `config` defines. A translation task keeps its
    vocabularies in `workdir` and trains them there if missing (unless
    `train_vocab` is False, when a missing one raises)."""
    # The mesh and the model first: their errors come before a translation
    # task spends minutes preparing its data and training vocabularies.
    mesh = sharding.make_mesh(
      config.mesh.data, config.mesh.model, config.mesh.num_devices
    )
    data_size = mesh.shape[sharding.DATA]
    for field in ('batch_size', 'eval_batch_size'):
      if config[field] % data_size:
        raise ValueError(
          f'config.{field}={config[field]} is not divisible by the data axis '
          f'of the mesh ({data_size} devices). Pick a multiple of '
          f'{data_size} or change config.mesh.'
        )
    if config.data.task in parallel.TASKS:
      # The model's config errors too, before the data and vocabularies.
      build_model(
        config,
        ModelSizes.planned(parallel.TranslationData.from_config(config.data)),
      )
    task = make_task(config, workdir, train_vocab=train_vocab)
    model = build_model(config, task)
    tx = optim.make_optimizer(config.optimizer, config.num_train_steps)
    init = functools.partial(_init_state, model, tx, task)
    abstract_state = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.state_shardings(abstract_state, mesh)
    return cls(config, task, model, tx, mesh, abstract_state, shardings)

  def init_state(self, rng: Array) -> TrainState:
    init = functools.partial(_init_state, self.model, self.tx, self.task)
    jitted = jax.jit(
      lambda rng: nn.meta.unbox(init(rng)), out_shardings=self.state_shardings
    )
    with jax.set_mesh(self.mesh):
      return jitted(rng)

  def unboxed_abstract_state(self):
    return nn.meta.unbox(self.abstract_state)

  def train_iterator(self) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of each training batch, as numpy arrays."""
    index, count = sharding.process_rows(self.mesh, self.config.batch_size)
    if isinstance(self.task, parallel.TranslationTask):
      dataset = self.task.train_dataset(
        global_batch_size=self.config.batch_size,
        process_index=index,
        process_count=count,
      )
    else:
      dataset = pipeline.train_dataset(
        self.task,
        global_batch_size=self.config.batch_size,
        seed=self.config.data.seed,
        process_index=index,
        process_count=count,
      )
    return iter(dataset)

  def heldout(
    self, split: str | None = None, n: int | None = None
  ) -> pipeline.HeldOut:
    """The first `n` examples of a held-out split.

    Without `split`, the set scored during training: the first
    `config.data.heldout_size` examples of the validation split (the
    synthetic tasks' one held-out set). A named translation split is read
    whole unless `n` is given.
    """
    task, batch_size = self.task, self.config.eval_batch_size
    translation = isinstance(task, parallel.TranslationTask)
    if n is None and (split is None or not translation):
      n = self.config.data.heldout_size
    if split is not None and split not in task.splits:
      raise ValueError(
        f'unknown split {split!r}: the {task.name} task has '
        f'{", ".join(task.splits)}.'
      )
    if translation:
      return task.heldout(split or 'validation', n=n, batch_size=batch_size)
    return pipeline.heldout_set(task, n=n, batch_size=batch_size)

  @functools.cached_property
  def heldout_set(self) -> pipeline.HeldOut:
    """`heldout()`, kept for the evaluations during training."""
    try:
      return self.heldout()
    except synthetic.HeldoutTooLarge as e:
      size = self.config.data.heldout_size
      raise synthetic.HeldoutTooLarge(
        f'config.data.heldout_size={size} is too large: {e} Set '
        '--config.data.heldout_size to at most that.'
      ) from None

  def vocab_digests(self) -> dict[str, str]:
    """Fingerprints of the vocabulary files ({} for synthetic tasks)."""
    if isinstance(self.task, parallel.TranslationTask):
      return self.task.vocab_digests()
    return {}


def make_task(
  config: ml_collections.ConfigDict,
  workdir: str | pathlib.Path | None = None,
  *,
  train_vocab: bool = True,
) -> Task:
  if config.data.task in parallel.TASKS:
    if workdir is None:
      raise ValueError(
        f'the {config.data.task} task keeps its vocabularies in the workdir; '
        'pass one.'
      )
    return parallel.TranslationTask.create(
      config.data, workdir, train_vocab=train_vocab
    )
  if config.data.task not in synthetic.TASKS:
    known = ', '.join(sorted([*synthetic.TASKS, *parallel.TASKS]))
    raise ValueError(
      f'unknown task config.data.task={config.data.task!r}; known tasks: '
      f'{known}.'
    )
  kwargs = {k: v for k, v in config.data.items() if k not in _DATA_FIELDS}
  return synthetic.make_task(config.data.task, **kwargs)


def model_name(config: ml_collections.ConfigDict) -> str:
  """'transformer', or the RNN decoder's name (e.g. 'bahdanau')."""
  architecture = config.model.get('architecture', 'rnn')
  return config.model.decoder if architecture == 'rnn' else architecture


@dataclasses.dataclass(frozen=True)
class ModelSizes:
  """What a model's config needs from its task: vocabulary sizes, lengths,
  and whether source and target share one vocabulary."""

  source_vocab_size: int
  target_vocab_size: int
  max_source_len: int
  max_target_len: int
  joint_vocab: bool

  @classmethod
  def of_task(cls, task) -> 'ModelSizes':
    return cls(
      source_vocab_size=task.source_vocab.size,
      target_vocab_size=task.target_vocab.size,
      max_source_len=task.max_source_len,
      max_target_len=task.max_target_len,
      joint_vocab=task.source_vocab == task.target_vocab,
    )

  @classmethod
  def planned(cls, data: parallel.TranslationData) -> 'ModelSizes':
    """A translation task's, known from its config before its vocabularies
    are trained (each has `vocab_size` ids)."""
    return cls(
      source_vocab_size=data.vocab_size,
      target_vocab_size=data.vocab_size,
      max_source_len=data.max_source_len,
      max_target_len=data.max_target_len,
      joint_vocab=data.joint_vocab,
    )


def build_model(
  config: ml_collections.ConfigDict, task_or_sizes: 'Task | ModelSizes'
) -> nn.Module:
  """The model of `config.model` (`architecture` 'rnn', the default, or
  'transformer'), sized for a task's vocabularies and lengths."""
  sizes = task_or_sizes
  if not isinstance(sizes, ModelSizes):
    sizes = ModelSizes.of_task(sizes)
  fields = dict(config.model)
  architecture = fields.pop('architecture', 'rnn')
  if architecture not in ARCHITECTURES:
    raise ValueError(
      f'config.model.architecture={architecture!r} is unknown; choose one of '
      f'{", ".join(ARCHITECTURES)}.'
    )
  config_class = ARCHITECTURES[architecture]
  fields['dtype'] = jnp.dtype(fields.get('dtype', 'float32'))
  known = {f.name for f in dataclasses.fields(config_class)}
  if unknown := sorted(set(fields) - known):
    raise ValueError(
      f'config.model has fields the {architecture} model does not take: '
      f'{unknown}. Known: {", ".join(sorted(known))}.'
    )
  _check_vocab_fields(fields, sizes)
  vocab_sizes = dict(
    source_vocab_size=sizes.source_vocab_size,
    target_vocab_size=sizes.target_vocab_size,
  )
  if architecture == 'transformer':
    fields.setdefault(
      'max_len', max(sizes.max_source_len, sizes.max_target_len)
    )
  else:
    fields.setdefault('max_source_len', sizes.max_source_len)
    vocab_sizes['max_target_len'] = sizes.max_target_len
  try:
    model_config = config_class(**vocab_sizes, **fields)
  except ValueError as e:
    # The class checks its fields; say where in the config they are set.
    raise ValueError(f'config.model: {e}') from None
  if architecture == 'transformer':
    return transformer.Transformer(model_config)
  return seq2seq.Seq2Seq(model_config)


def _check_vocab_fields(fields: dict[str, Any], sizes: ModelSizes) -> None:
  """The model's special ids and embedding sharing agree with the task's
  vocabularies, whose ids the data pipeline writes."""
  vocab_ids = {
    'pad_id': vocab_lib.PAD_ID,
    'bos_id': vocab_lib.BOS_ID,
    'eos_id': vocab_lib.EOS_ID,
  }
  for name, id_ in vocab_ids.items():
    if fields.get(name, id_) != id_:
      raise ValueError(
        f'config.model.{name}={fields[name]} differs from the id the '
        f"vocabularies give that token ({id_}), so the model's and the "
        f"data's tokens would not match; remove config.model.{name}."
      )
  if fields.get('share_embeddings') and not sizes.joint_vocab:
    raise ValueError(
      'config.model.share_embeddings=True ties one embedding matrix to the '
      'source and target tokens, but this task has two different '
      'vocabularies; set config.data.joint_vocab=True (one vocabulary for '
      'both languages) or config.model.share_embeddings=False.'
    )


def _dummy_batch(task, batch_size: int = 1) -> dict[str, Array]:
  return {
    'inputs': jnp.ones((batch_size, task.max_source_len), jnp.int32),
    'targets': jnp.ones((batch_size, task.max_target_len), jnp.int32),
  }


def _init_state(model, tx, task, rng) -> TrainState:
  batch = _dummy_batch(task)
  params = model.init(rng, batch['inputs'], batch['targets'], train=False)
  return TrainState.create(apply_fn=model.apply, params=params['params'], tx=tx)


# ---------------------------------------------------------------------------
# Steps.


def smoothed_cross_entropy(
  logits: Array, targets: Array, label_smoothing: float = 0.0
) -> Array:
  """Per-token cross-entropy against `optax.smooth_labels` of the one-hot
  targets, without materialising the `[..., vocab]` labels.

  With labels (1 - a) onehot + a / V, the loss is
  (1 - a) (logsumexp - logit_target) + a (logsumexp - mean(logits)).
  """
  return _cross_entropies(logits, targets, label_smoothing)[0]


def _cross_entropies(
  logits: Array, targets: Array, label_smoothing: float
) -> tuple[Array, Array]:
  """(smoothed, plain) per-token cross-entropies, sharing one logsumexp."""
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  nll = log_z - target_logit
  if not label_smoothing:
    return nll, nll
  uniform = log_z - jnp.mean(logits, axis=-1)
  return (1 - label_smoothing) * nll + label_smoothing * uniform, nll


def token_metrics(
  logits: Array,
  targets: Array,
  pad_id: int,
  label_smoothing: float = 0.0,
  valid: Array | None = None,
) -> dict[str, Array]:
  """Sums over the batch; divide by `tokens` / `sequences` for means.

  'loss_sum' is the objective, smoothed by `label_smoothing`; 'nll_sum' is
  the plain negative log-likelihood, which perplexity is made of.
  """
  mask = targets != pad_id
  if valid is not None:
    mask = mask & valid[:, None]
  loss, nll = _cross_entropies(logits, targets, label_smoothing)
  right = (jnp.argmax(logits, -1) == targets) | ~mask
  rows = jnp.ones(targets.shape[0], bool) if valid is None else valid
  return {
    'loss_sum': jnp.sum(loss * mask),
    'nll_sum': jnp.sum(nll * mask),
    'tokens': jnp.sum(mask).astype(jnp.float32),
    'correct_tokens': jnp.sum(right & mask).astype(jnp.float32),
    'sequences': jnp.sum(rows).astype(jnp.float32),
    'correct_sequences': jnp.sum(jnp.all(right, -1) & rows).astype(jnp.float32),
  }


def summarize(sums: dict[str, float]) -> dict[str, float]:
  tokens, sequences = max(sums['tokens'], 1.0), max(sums['sequences'], 1.0)
  loss = sums['loss_sum'] / tokens
  nll = sums['nll_sum'] / tokens
  return {
    'loss': loss,
    'perplexity': math.exp(min(nll, 50.0)),
    'token_accuracy': sums['correct_tokens'] / tokens,
    'teacher_forced_exact_match': sums['correct_sequences'] / sequences,
  }


def train_step(
  state: TrainState, batch, rng, *, model, pad_id, label_smoothing
):
  """One optimiser step. The rng advances with the step number."""
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    logits = model.apply(
      {'params': params},
      batch['inputs'],
      batch['targets'],
      train=True,
      rngs={'dropout': dropout_rng},
    )
    sums = token_metrics(logits, batch['targets'], pad_id, label_smoothing)
    return sums['loss_sum'] / jnp.maximum(sums['tokens'], 1.0), sums

  grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
  sums['grad_norm'] = optax.tree.norm(grads)
  return state.apply_gradients(grads=grads), sums


def make_train_step(exp: Experiment):
  step = functools.partial(
    train_step,
    model=exp.model,
    pad_id=vocab_lib.PAD_ID,
    label_smoothing=exp.config.label_smoothing,
  )
  batch_sharding = sharding.batch_sharding(exp.mesh)
  replicated = sharding.replicated(exp.mesh)
  return jax.jit(
    step,
    in_shardings=(exp.state_shardings, batch_sharding, replicated),
    out_shardings=(exp.state_shardings, replicated),
    donate_argnums=0,
  )


def search(
  model,
  params,
  inputs: Array,
  *,
  max_len: int,
  beam_size: int = 1,
  alpha: float = 0.0,
  coverage_weight: float = 0.0,
) -> Array:
  """Output tokens `[batch, max_len]` of greedy (beam_size 1) or beam search
  with GNMT's length and coverage penalties (see `decoding.decode_model`)."""
  return decoding.decode_model(
    model,
    {'params': params},
    inputs,
    max_len=max_len,
    beam_size=beam_size,
    alpha=alpha,
    coverage_weight=coverage_weight,
  )


def make_eval_step(
  exp: Experiment,
  *,
  beam_size: int = 1,
  alpha: float = 0.0,
  coverage_weight: float = 0.0,
):
  """Teacher-forced metrics and decoded tokens of one held-out batch."""
  decoding.check_search(beam_size, alpha, coverage_weight)
  model, pad_id = exp.model, vocab_lib.PAD_ID

  def eval_step(params, batch):
    logits = model.apply(
      {'params': params}, batch['inputs'], batch['targets'], train=False
    )
    sums = token_metrics(logits, batch['targets'], pad_id, valid=batch['valid'])
    tokens = search(
      model,
      params,
      batch['inputs'],
      max_len=exp.task.max_target_len,
      beam_size=beam_size,
      alpha=alpha,
      coverage_weight=coverage_weight,
    )
    return sums, tokens

  batch_sharding = sharding.batch_sharding(exp.mesh)
  replicated = sharding.replicated(exp.mesh)
  return jax.jit(
    eval_step,
    in_shardings=(exp.state_shardings.params, batch_sharding),
    out_shardings=(replicated, replicated),
  )


def _replicated_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, Array]:
  """A batch every process holds in full, as arrays sharded over `data`."""
  target = sharding.batch_sharding(mesh)
  return {
    name: jax.make_array_from_callback(
      value.shape, target, lambda idx, v=value: v[idx]
    )
    for name, value in batch.items()
  }


def evaluate(
  exp: Experiment,
  params,
  *,
  split: str | None = None,
  num_examples: int | None = None,
  eval_step=None,
  show: int = 0,
  beam_size: int = 1,
  alpha: float = 0.0,
  coverage_weight: float = 0.0,
) -> dict[str, Any]:
  """Held-out metrics: teacher-forced loss, perplexity and token accuracy,
  and the task's scores of the greedy (beam_size 1) or beam-search outputs
  (exact match for synthetic tasks, BLEU for translation).

  `split` and `num_examples` default to the set scored during training. An
  `eval_step` from `make_eval_step` brings its own search settings.
  """
  search = dict(
    beam_size=beam_size, alpha=alpha, coverage_weight=coverage_weight
  )
  if eval_step is not None and (beam_size != 1 or alpha or coverage_weight):
    raise ValueError(
      f'eval_step was built with its own search settings, so {search} would '
      'be ignored; pass them to make_eval_step instead.'
    )
  if split is None and num_examples is None:
    heldout = exp.heldout_set
  else:
    heldout = exp.heldout(split, num_examples)
  eval_step = eval_step or make_eval_step(exp, **search)
  vocab = exp.task.target_vocab
  totals: dict[str, float] = {}
  predictions = []
  for batch in heldout.batches:
    sums, tokens = eval_step(params, _replicated_batch(batch, exp.mesh))
    for key, value in jax.device_get(sums).items():
      totals[key] = totals.get(key, 0.0) + float(value)
    tokens = np.asarray(jax.device_get(tokens))
    predictions += [
      vocab.decode(tokens[row]) for row in np.flatnonzero(batch['valid'])
    ]
  result = summarize(totals)
  result.update(exp.task.score(predictions, heldout.references))
  result['num_examples'] = len(predictions)
  if show:
    result['examples'] = list(
      zip(heldout.sources, heldout.references, predictions, strict=True)
    )[:show]
  return result


# ---------------------------------------------------------------------------
# The loop.


class _TrainLog:
  """Accumulates step metrics (fetched one step late) between log steps."""

  def __init__(self, exp, writer, progress, mngr):
    self._exp, self._writer, self._progress = exp, writer, progress
    self._mngr = mngr
    self._sums: dict[str, float] = {}
    self._steps = 0
    self._rate_tokens = 0.0  # target tokens since the progress clock started
    self._compiled = False

  def add(self, step: int, device_sums) -> None:
    sums = jax.device_get(device_sums)
    loss = float(sums['loss_sum']) / max(float(sums['tokens']), 1.0)
    grad_norm = float(sums['grad_norm'])
    # A finite loss with non-finite gradients still ruins the update.
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      self._mngr.wait_until_finished()
      last = self._mngr.latest_step()
      raise FloatingPointError(
        f'the training loss became {loss} (gradient norm {grad_norm}) at '
        f'step {step}. The last good checkpoint (step {last}) is kept. Lower '
        'optimizer.learning_rate or set optimizer.clip_norm, then rerun to '
        'resume from it.'
      )
    for key, value in sums.items():
      self._sums[key] = self._sums.get(key, 0.0) + float(value)
    self._steps += 1
    if self._compiled:
      self._rate_tokens += float(sums['tokens'])
    else:  # the first step compiled the train step: rates start after it
      self._progress.restart(step)
      self._compiled = True
    if step % self._exp.config.log_every_steps == 0:
      self.write(step)

  def write(self, step: int) -> None:
    if not self._steps:
      return
    scalars = summarize(self._sums)
    scalars['grad_norm'] = self._sums['grad_norm'] / self._steps
    rates = self._progress.report(step, self._rate_tokens)
    self._rate_tokens = 0.0
    scalars.update(
      steps_per_s=rates['steps_per_s'], tokens_per_s=rates['tokens_per_s']
    )
    self._writer.write(step, 'train', scalars)
    logging.info(
      'step %d/%d  loss %.4f  token acc %.4f  %.1f steps/s  %.0f tokens/s  '
      'ETA %s',
      step,
      self._exp.config.num_train_steps,
      scalars['loss'],
      scalars['token_accuracy'],
      rates['steps_per_s'],
      rates['tokens_per_s'],
      metrics.format_eta(rates['eta_s']),
    )
    self._sums, self._steps = {}, 0


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """`jax.distributed.initialize` for a multi-process run.

  Values left None come from the environment (JAX_COORDINATOR_ADDRESS,
  JAX_NUM_PROCESSES, JAX_PROCESS_ID) or from a cluster JAX detects itself
  (SLURM, TPU pods, ...). On CPU, gloo provides the cross-process collectives.

  Raises:
    ValueError: settings `jax.distributed.initialize` refuses (a missing
      process id, an id out of range, an address without a port).
  """
  fix = (
    'Give each process --coordinator_address=HOST:PORT (process 0 listens '
    'there), --num_processes=N and --process_id=I with 0 <= I < N, or set '
    'JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID.'
  )
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address and not address.rpartition(':')[2].isdigit():
    # JAX would fail on an IndexError.
    raise ValueError(f'coordinator address {address!r} has no port. {fix}')
  # Only the CPU client uses this; asking for the backend here would start
  # it before `initialize`, which must come first.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
  except ValueError as e:
    raise ValueError(f'cannot start the multi-process run: {e} {fix}') from e
  logging.info('Process %d of %d.', jax.process_index(), jax.process_count())


def check_vocab_digests(exp: Experiment, mngr, *, fix: str = '') -> None:
  """Refuses vocabulary files other than those the latest checkpoint in
  `mngr` was trained with (a model decoded with another tokenizer outputs
  garbage without any error). `fix` replaces the advice in the error."""
  step = mngr.latest_step()
  if step is None:
    return
  saved = checkpoints.read_meta(mngr, step)
  current = exp.vocab_digests()
  differ = [
    name for name in current if name in saved and saved[name] != current[name]
  ]
  if differ:
    vocab_dir = getattr(exp.task, 'vocab_dir', '')
    raise ValueError(
      f'the vocabularies in {vocab_dir} ({", ".join(differ)}) are not the '
      f'ones checkpoint step {step} was trained with (SHA-256 '
      f'{", ".join(current[n][:12] for n in differ)} where the checkpoint '
      f'records {", ".join(saved[n][:12] for n in differ)}). '
      + (
        fix
        or 'Put the original vocab files back, or train this model afresh '
        'in a new --workdir.'
      )
    )


def restore_or_init(exp: Experiment, workdir, mngr, data_iterator=None):
  """The latest checkpoint in `workdir` if any, else a fresh (or init_from)
  state. Returns `(state, step)`."""
  step = mngr.latest_step()
  if step is not None:
    state = checkpoints.restore(
      mngr,
      step,
      exp.unboxed_abstract_state(),
      exp.state_shardings,
      data_iterator,
    )
    return state, step
  if not exp.config.get('init_from'):
    return exp.init_state(jax.random.key(exp.config.seed)), 0
  # Read before the init compiles anything, so a wrong source fails fast.
  source = pathlib.Path(exp.config.init_from)
  check_vocab_digests(
    exp,
    checkpoints.manager(source, read_only=True),
    fix=f'Embeddings only fit the vocabulary they were trained with: '
    f'copy {source / parallel.VOCAB_DIR} into {workdir} before the '
    'first run.',
  )
  params = checkpoints.restore_params(
    source, exp.unboxed_abstract_state().params, exp.state_shardings.params
  )
  state = exp.init_state(jax.random.key(exp.config.seed))
  return state.replace(params=params), 0


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds checkpoints) and evaluates.

  Returns the final held-out metrics.
  """
  validate_config(config)
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise FileExistsError(
      f'workdir {workdir} is a file; give a directory (a new one starts a '
      'fresh run).'
    )
  workdir.mkdir(parents=True, exist_ok=True)
  check_config_matches(config, workdir)
  exp = Experiment.create(config, workdir)
  # Drawn now rather than at the first evaluation, so that a heldout_size
  # the task cannot fill fails before any training.
  exp.heldout_set  # noqa: B018
  mngr = checkpoints.manager(workdir, max_to_keep=config.keep_checkpoints)
  data_iterator = exp.train_iterator()
  try:
    check_vocab_digests(exp, mngr)
    state, start = restore_or_init(exp, workdir, mngr, data_iterator)
  except ValueError as e:
    if mngr.latest_step() is None:  # Not a resume: init_from's errors.
      raise
    if isinstance(e, checkpoints.DamagedCheckpoint):  # Not the config's.
      raise
    changed = _changed_fields(config, workdir)
    raise ValueError(
      f'{e} Config fields changed since that checkpoint: '
      f'{"; ".join(changed) or "none"}.'
    ) from e
  if start and (changed := _changed_fields(config, workdir)):
    # Allowed (to extend a run, say), but the steps from here are not those
    # of an uninterrupted run under either config: said once, in the log.
    logging.warning(
      'Resuming from step %d under a changed config: %s.',
      start,
      '; '.join(changed),
    )
  # Saved only once the checkpoint (if any) is known to fit this config, so
  # a refused resume leaves the workdir usable.
  save_config(config, workdir)
  logging.info(
    'Training %s on %s from step %d to %d on %d devices (mesh %s).',
    model_name(config),
    config.data.task,
    start,
    config.num_train_steps,
    exp.mesh.size,
    dict(exp.mesh.shape),
  )
  writer = metrics.MetricsWriter(workdir, resume_step=start)
  log = _TrainLog(
    exp, writer, metrics.Progress(start, config.num_train_steps), mngr
  )
  try:
    return _train_steps(exp, state, start, data_iterator, mngr, log, writer)
  finally:
    # Also after an error: a checkpoint being written in the background
    # is finished, not left as a temporary folder.
    mngr.wait_until_finished()
    mngr.close()
    writer.close()


def _train_steps(
  exp: Experiment,
  state: TrainState,
  start: int,
  data_iterator: Iterator[dict[str, np.ndarray]],
  mngr: ocp.CheckpointManager,
  log: _TrainLog,
  writer: metrics.MetricsWriter,
) -> dict[str, Any]:
  """Steps `start + 1` to the end, with the logs, checkpoints and held-out
  evaluations on their schedules; returns the last evaluation. A resumed
  run first evaluates step `start` if the run that saved it should have
  evaluated there but did not log the result."""
  config = exp.config
  step_fn, eval_step = make_train_step(exp), make_eval_step(exp)
  rng = jax.random.key(config.seed)
  pending = None
  result: dict[str, Any] = {}
  with jax.set_mesh(exp.mesh):
    if _heldout_missing(config, writer, start):
      # Stopped during the evaluation that follows this checkpoint.
      result = _evaluate_and_write(exp, state, start, eval_step, writer)
    for step in range(start + 1, config.num_train_steps + 1):
      batch = sharding.global_batch(
        next(data_iterator), exp.mesh, config.batch_size
      )
      state, sums = step_fn(state, batch, rng)
      # Read the previous step's metrics while this one runs.
      if pending is not None:
        log.add(*pending)
      pending = (step, sums)
      last = step == config.num_train_steps
      if step % config.checkpoint_every_steps == 0 or last:
        log.add(*pending)  # never checkpoint a state with a NaN loss
        pending = None
        # A run resumed from here starts a new window: so does this one.
        log.write(step)
        checkpoints.save(
          mngr, step, state, data_iterator, meta=exp.vocab_digests()
        )
      if step % config.eval_every_steps == 0 or last:
        result = _evaluate_and_write(exp, state, step, eval_step, writer)
    if pending is not None:
      log.add(*pending)
    log.write(config.num_train_steps)  # a last partial window, if any
    if not result:  # the workdir had already finished training
      result = evaluate(exp, state.params, eval_step=eval_step)
  return result


def _heldout_missing(config, writer: metrics.MetricsWriter, step: int) -> bool:
  """Whether the run that saved checkpoint `step` evaluated there but was
  stopped before it logged the result (the same answer on every process)."""
  if not step or (
    step % config.eval_every_steps and step < config.num_train_steps
  ):
    return False
  missing = not writer.logged(step, 'heldout')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    missing = bool(multihost_utils.broadcast_one_to_all(np.int32(missing)))
  return missing


def _evaluate_and_write(exp, state, step, eval_step, writer) -> dict[str, Any]:
  result = evaluate(exp, state.params, eval_step=eval_step)
  writer.write(step, 'heldout', result)
  writer.flush()
  scores = '  '.join(f'{name} {result[name]:.4f}' for name in exp.task.SCORES)
  logging.info(
    'step %d  held-out %s  token acc %.4f  loss %.4f  perplexity %.2f',
    step,
    scores,
    result['token_accuracy'],
    result['loss'],
    result['perplexity'],
  )
  return result


# ---------------------------------------------------------------------------
# Reuse of a trained workdir.


def load_trained(
  workdir, *, long_input: str | None = None
) -> tuple[Experiment, Any]:
  """The experiment and parameters of the latest checkpoint in `workdir`,
  on whatever devices are present.

  `long_input` ('error' or 'truncate') overrides what a translation task
  does with an input longer than the model's maximum.
  """
  workdir = pathlib.Path(workdir)
  if not workdir.exists():
    raise FileNotFoundError(f'workdir {workdir} does not exist.')
  if not workdir.is_dir():
    raise FileNotFoundError(
      f'workdir {workdir} is a file; give the directory train.py wrote '
      f'(e.g. {workdir.parent}).'
    )
  config = load_config(workdir)
  with config.unlocked():
    if long_input is not None:
      if config.data.task not in parallel.TASKS:
        raise ValueError(
          'long_input applies to translation tasks only; the '
          f'{config.data.task} task always refuses over-long inputs.'
        )
      config.data.long_input = long_input
    config.mesh.data, config.mesh.model, config.mesh.num_devices = -1, 1, 0
    data_size = len(jax.devices())
    for field in ('batch_size', 'eval_batch_size'):
      config[field] = math.ceil(config[field] / data_size) * data_size
  if checkpoints.latest_step(workdir) is None:
    raise FileNotFoundError(
      f'workdir {workdir} has no checkpoint yet; train it with train.py '
      f'--workdir={workdir} first.'
    )
  exp = Experiment.create(config, workdir, train_vocab=False)
  check_vocab_digests(exp, checkpoints.manager(workdir, read_only=True))
  params = checkpoints.restore_params(
    workdir, exp.unboxed_abstract_state().params, exp.state_shardings.params
  )
  return exp, params


def source_batch(task: Task, sources: Sequence[str]) -> np.ndarray:
  """Raw source strings as the model's input rows: int32 `[len(sources),
  max_source_len]`, right-padded with PAD (`task.prepare_source` checks each
  string and raises ValueError on bad input)."""
  rows = [task.prepare_source(text) for text in sources]
  inputs = np.full((len(rows), task.max_source_len), vocab_lib.PAD_ID, np.int32)
  for i, ids in enumerate(rows):
    inputs[i, : len(ids)] = ids
  return inputs


def decode(
  exp: Experiment,
  params,
  sources: Sequence[str],
  *,
  beam_size: int = 1,
  alpha: float = 0.0,
  coverage_weight: float = 0.0,
) -> list[str]:
  """The model's outputs for raw source strings (greedy or beam search)."""
  decoding.check_search(beam_size, alpha, coverage_weight)
  task, vocab = exp.task, exp.task.vocab
  inputs = source_batch(task, sources)
  run = functools.partial(
    search,
    exp.model,
    max_len=task.max_target_len,
    beam_size=beam_size,
    alpha=alpha,
    coverage_weight=coverage_weight,
  )
  tokens = jax.jit(run)(params, jnp.asarray(inputs))
  return [vocab.decode(row) for row in np.asarray(tokens).tolist()]
