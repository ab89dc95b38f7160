"""reward-router: route every preference pair to exactly one reward model.

Shared pieces used by every service: the data formats (``reward_router.data``), the error
tree (``reward_router.errors``) and the command line (``reward_router.cli``).
"""

__version__ = "0.1.0"
