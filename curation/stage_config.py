"""The stage configs (crawl, index, score, select, synthesize, validation) as pydantic dataclasses:
the dataclass API that the stages and their config hashes use (keyword construction, asdict,
replace, frozen), with pydantic's checks, and a bad value raised as the stage's own one-line error.

    @stage_config(CrawlError, "crawl config: ")
    class CrawlConfig:
        shard_size: int = Field(1000, gt=0)

`CrawlConfig(shard_size=0)` raises CrawlError("crawl config: key 'shard_size' must be > 0, got 0").
"""
from __future__ import annotations

import functools
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, ValidationError, WrapValidator
from pydantic.dataclasses import dataclass

from .config_errors import validation_line


def _keep_int(value: Any, handler) -> Any:
    """A float key given as an int stays that int: the config hashes saw `1`, not `1.0`, before
    these configs were validated, and a finished stage must not be redone for it."""
    checked = handler(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else checked


Real = Annotated[float, WrapValidator(_keep_int)]


def check_device(name: str) -> str:
    """A torch device this machine has ("cpu", "cuda", "cuda:1", "mps"); ValueError in one line
    otherwise, instead of torch's driver error deep in a stage. torch is imported only here."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r} (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: no CUDA GPU is visible on this machine; use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r}: MPS is not available on this machine; use cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported (cpu, cuda, cuda:N, mps)")
    return name


Device = Annotated[str, AfterValidator(check_device)]


def stage_config(error: type[Exception], where: str = ""):
    """A frozen pydantic dataclass with no unknown keys, whose ValidationError is raised as `error`
    with one line (`where` first) naming the key."""
    def wrap(cls: type) -> type:
        cls = dataclass(frozen=True, config=ConfigDict(extra="forbid", arbitrary_types_allowed=True))(cls)
        validate = cls.__init__

        @functools.wraps(validate)
        def __init__(self, *args, **kwargs) -> None:
            try:
                validate(self, *args, **kwargs)
            except ValidationError as exc:
                raise error(validation_line(exc, cls, where)) from None

        cls.__init__ = __init__
        return cls
    return wrap
