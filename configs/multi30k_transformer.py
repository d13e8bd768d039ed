"""Multi30k German -> English with a Transformer at the size of the PyTorch
tutorial (d_model 256, 3 + 3 layers, 8 heads, feed-forward 512).

python train.py --config=configs/multi30k_transformer.py --workdir=DIR
python train.py --config=configs/multi30k_transformer.py:tiny ...  (tests)
"""

import ml_collections

from configs import translation


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  tiny = translation.parse_tiny(variant)
  config = translation.get_config('multi30k', 'transformer')
  config.data.vocab_size = 6000  # Joint de/en pieces, tied embeddings.
  # Mixed precision: the dense layers' products take bfloat16 operands and
  # return float32 (attnjax/precision.py), a train step 1.3-1.6x as fast as
  # in float32 on a CPU with AMX (BENCHMARKS.md).
  config.model.matmul_dtype = 'bfloat16'
  config.batch_size = 128  # Sentence pairs per step (~1.9k target tokens).
  config.num_train_steps = 2400  # About 10.7 epochs of 225 batches.
  config.optimizer.learning_rate = 7e-4  # Peak.
  config.optimizer.warmup_steps = 400  # Linear warmup.
  config.optimizer.schedule = 'cosine'  # Then cosine decay to 0.
  config.log_every_steps = 100  # Train metrics and console progress.
  config.eval_every_steps = 1200  # Validation BLEU (and at the end).
  config.checkpoint_every_steps = 400  # Checkpoints (and at the end).
  if tiny:
    translation.make_tiny(config)
  return config
