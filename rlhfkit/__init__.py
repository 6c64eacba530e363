"""rlhfkit: reinforcement learning from human feedback, from collecting the feedback to the tuned policy."""

__version__ = "0.1.0"

from rlhfkit.config import load_config, parse_cli  # noqa: E402
from rlhfkit.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__", "load_config", "parse_cli"]
