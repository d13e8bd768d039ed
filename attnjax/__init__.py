"""attnjax: the attention literature in JAX/Flax.

Layers, from the bottom up: `scores` (pure score functions) -> `masks`
(masks and the masked softmax) -> `attention` (pure attention and the
alignment schemes) -> `layers` (Flax linen modules).
"""

from attnjax import attention, masks, scores

__all__ = ['attention', 'masks', 'scores']
__version__ = '0.1.0'
