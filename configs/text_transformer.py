"""Your own parallel corpus with the base Transformer of
multi30k_transformer.py (d_model 256, 3 + 3 layers, 8 heads, feed-forward
512).

The folder holds train.de, train.en, validation.de, validation.en and,
optionally, test.de, test.en (one sentence per line, line i of one file
translating line i of the other; each may be gzipped as train.de.gz):

python train.py --config=configs/text_transformer.py \\
  --config.data.source_dir=/path/to/corpus --config.data.languages=de,en \\
  --workdir=DIR
python train.py --config=configs/text_transformer.py:tiny ...  (tests)

Scale num_train_steps and vocab_size to the corpus: these fit ~30k pairs.
"""

import ml_collections

from configs import translation


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  tiny = translation.parse_tiny(variant)
  config = translation.get_config('parallel_text', 'transformer')
  config.data.source_dir = ''  # Required: the corpus folder.
  config.data.languages = ()  # Required: (source, target), e.g. de,en.
  config.data.vocab_size = 8000  # Joint pieces, tied embeddings.
  config.batch_size = 128  # Sentence pairs per step.
  config.num_train_steps = 2400  # About 10 epochs of 30k pairs.
  config.optimizer.learning_rate = 7e-4  # Peak.
  config.optimizer.warmup_steps = 400  # Linear warmup.
  config.optimizer.schedule = 'cosine'  # Then cosine decay to 0.
  config.log_every_steps = 100  # Train metrics and console progress.
  config.eval_every_steps = 1200  # Validation BLEU (and at the end).
  config.checkpoint_every_steps = 400  # Checkpoints (and at the end).
  if tiny:
    translation.make_tiny(config)
    # The corpus's size is unknown, and tfds refuses 'train[:2000]' of a
    # shorter split: the tiny variant is meant for a tiny corpus.
    config.data.train_split = 'train'
  return config
