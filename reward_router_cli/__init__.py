"""The roof: the ``reward-router`` command, ``up`` (a whole cluster on one machine) and ``demo``.

The only package that may import every other: the rooms (``gateway``, ``services``,
``trainer_client``) import the ground (``reward_router``) and never each other or this.
"""
