"""The training system: sharding, optimiser, checkpoints, metrics, the loop.

`attnjax.train_lib.train_and_evaluate(config, workdir)` ties them together.
"""
