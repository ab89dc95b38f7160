"""reward-router: route every preference pair to exactly one reward model.

The ground every other package stands on; it imports no project package. The wire protocol
(``reward_router.protocol``), the data formats (``reward_router.data``), the error tree
(``reward_router.errors``), model lookup (``reward_router.models``), exposure rules
(``reward_router.exposure``) and small shared helpers. The ``reward-router`` command is the roof,
``reward_router_cli``.
"""

__version__ = "0.1.0"
