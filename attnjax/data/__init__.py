"""Data: vocabularies, synthetic tasks and Grain input pipelines.

- `vocab`: `CharVocab`, ids 0 = PAD, 1 = BOS, 2 = EOS, then the alphabet.
- `synthetic`: `addition` (seed 000), `copy`, `reverse`, `sort`; `make_task`
  and `encode_batch`.
- `pipeline`: `train_dataset` (infinite, per-process, checkpointable) and
  `heldout_batches` (fixed, padded, with a 'valid' mask).
- `translation`: TFDS builders for Multi30k, the Anki sentence pairs and
  your own corpus (`parallel_text`), and `load_pairs`. Import it explicitly
  (`from attnjax.data import translation`): it loads tensorflow_datasets,
  which the rest does not need.
"""

from attnjax.data import pipeline, synthetic, vocab
from attnjax.data.pipeline import heldout_batches, train_dataset
from attnjax.data.synthetic import Task, encode_batch, make_task
from attnjax.data.vocab import BOS_ID, EOS_ID, PAD_ID, CharVocab

__all__ = [
  'BOS_ID',
  'EOS_ID',
  'PAD_ID',
  'CharVocab',
  'Task',
  'encode_batch',
  'heldout_batches',
  'make_task',
  'pipeline',
  'synthetic',
  'train_dataset',
  'vocab',
]
