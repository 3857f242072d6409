"""The documented face of the loss library: `from trainer.losses import composer_total_loss, ...`.

The code lives in `trainer.objective.losses` (the objective layer: tensors in, tensors out); this
module only keeps the import path that the docs and users' code name.
"""

from trainer.objective.losses import *  # noqa: F403
from trainer.objective.losses import __all__  # noqa: F401
