"""Names that are not local paths are fetched from the model hub; on a machine that cannot reach it, say so at once
(one short probe) instead of after the libraries' retries."""

import os
import socket
from urllib.parse import urlparse

from qlora_trainer.errors import UserError

PROBE_TIMEOUT_S = 3.0


def hub_reachable() -> bool:
    """Whether the hub endpoint (HF_ENDPOINT, or the default) accepts a connection; False when HF_HUB_OFFLINE is set."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def require_hub(key: str, name: str) -> None:
    """Refuse `name` (given as `key`) at once when it would have to come from an unreachable hub."""
    if not hub_reachable():
        raise UserError(f"{key}: {name} is not a local path and the model hub cannot be reached from here; "
                        "give a local folder or file")
