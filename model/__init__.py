"""READ model package.

Heavy classes are imported lazily so that ``from model.sasp import ...`` needs torch only.
"""

from typing import Any

__all__ = ["READConfig", "READForCausalLM"]


def __getattr__(name: str) -> Any:
    if name in ("READConfig",):
        from .config import READConfig

        return READConfig
    if name in ("READForCausalLM",):
        from .read import READForCausalLM

        return READForCausalLM
    raise AttributeError(f"module 'model' has no attribute {name!r}")
