"""Your own parallel corpus with the Transformer and training schedule of
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

from configs import multi30k_transformer, translation


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  config = multi30k_transformer.get_config(variant)
  config.data.task = 'parallel_text'  # Your own corpus.
  config.data.source_dir = ''  # Required: the corpus folder.
  config.data.languages = ()  # Required: (source, target), e.g. de,en.
  if not translation.parse_tiny(variant):
    config.data.vocab_size = 8000  # Joint pieces, tied embeddings.
  else:
    # The corpus's size is unknown, and tfds refuses 'train[:2000]' of a
    # shorter split: the tiny variant is meant for a tiny corpus.
    config.data.train_split = 'train'
  return config
