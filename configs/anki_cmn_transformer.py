"""Anki / Tatoeba English -> Mandarin Chinese with the base Transformer of
multi30k_transformer.py (seed 004's data). BLEU uses sacreBLEU's 'zh'
tokeniser.

python train.py --config=configs/anki_cmn_transformer.py --workdir=DIR
python train.py --config=configs/anki_cmn_transformer.py:tiny ...  (tests)
"""

import ml_collections

from configs import translation


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  tiny = translation.parse_tiny(variant)
  config = translation.get_config('anki_cmn', 'transformer')
  config.data.character_coverage = 0.9995  # Rare Hanzi map to UNK.
  config.data.max_source_len = 48  # Longer pairs skipped.
  config.data.max_target_len = 48  # Longest target with EOS.
  config.data.buckets = (8, 12, 16, 24, 48)  # Most pairs are short.
  config.data.heldout_size = 2000  # Validation pairs scored in training.
  config.batch_size = 128  # Sentence pairs per step.
  config.num_train_steps = 3000  # About 15 epochs of ~200 batches.
  config.optimizer.learning_rate = 7e-4  # Peak.
  config.optimizer.warmup_steps = 300  # Linear warmup.
  config.optimizer.schedule = 'cosine'  # Then cosine decay to 0.
  config.log_every_steps = 100  # Train metrics and console progress.
  config.eval_every_steps = 1000  # Validation BLEU (and at the end).
  config.checkpoint_every_steps = 1000  # Checkpoints (and at the end).
  if tiny:
    translation.make_tiny(config)
    # 2,000 pairs hold ~1,500 distinct characters, which SentencePiece must
    # all have pieces for (at 0.9995 coverage): 400 ids cannot train.
    config.data.vocab_size = 2000
  return config
