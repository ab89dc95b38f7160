"""The trainer side of reward-router: what an RLHF trainer imports or runs.

Light to import (httpx + pydantic): the clients and their errors. The Online DPO trainer
process (``trainer_client.online_dpo``) and the TRL adapter (``trainer_client.trl_adapter``) import
torch / TRL inside, only when used.

>>> from trainer_client import GatewayClient, GatewayError
>>> issubclass(GatewayError, Exception)
True
"""

from trainer_client.client import AsyncGatewayClient, GatewayClient, RetryPolicy, Timeouts
from trainer_client.errors import (
    AuthError,
    GatewayAPIError,
    GatewayError,
    GatewayServerError,
    GatewayTimeout,
    GatewayUnavailable,
    GatewayUnreachable,
    InvalidRequest,
    NamespaceConflict,
    NamespaceNotFound,
    ResponseFormatError,
)

__all__ = [
    "AsyncGatewayClient",
    "AuthError",
    "GatewayAPIError",
    "GatewayClient",
    "GatewayError",
    "GatewayServerError",
    "GatewayTimeout",
    "GatewayUnavailable",
    "GatewayUnreachable",
    "InvalidRequest",
    "NamespaceConflict",
    "NamespaceNotFound",
    "ResponseFormatError",
    "RetryPolicy",
    "Timeouts",
]
