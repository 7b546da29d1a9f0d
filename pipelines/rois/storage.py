"""How RoI features are stored in a feature cache (``cache.dtype``): a small class per type, in one table.

Each type says its numpy / torch dtype on disk, whether it keeps a per-RoI, per-channel scale, and how
float features are encoded; :func:`decode_features` turns stored features back into float32 wherever
they are used (on the GPU where there is one).
"""

from __future__ import annotations

import numpy as np
import torch


class FloatStorage:
    """Features stored as they are, in a float type (no scale)."""

    name, np_dtype, torch_dtype, scaled = "float16", np.float16, torch.float16, False

    @classmethod
    def encode(cls, features: torch.Tensor) -> tuple[torch.Tensor, None]:
        """float [n, C, S, S] -> (stored [n, C, S, S], None)."""
        return torch.from_numpy(features.detach().cpu().numpy().astype(cls.np_dtype, copy=False)), None


class Float32Storage(FloatStorage):
    name, np_dtype, torch_dtype = "float32", np.float32, torch.float32


class Int8Storage:
    """8-bit integers with one float32 scale per RoI and channel: ``x ~ q * scale``, ``q = round(x / scale)``,
    ``scale = max|x| / 127`` over the channel's S x S values. Error: ``|x - x'| <= max|x| / 254``."""

    name, np_dtype, torch_dtype, scaled, top = "int8", np.int8, torch.int8, True, 127.0

    @classmethod
    def scale_of(cls, features: torch.Tensor) -> torch.Tensor:
        """float [n, C, S, S] -> float32 [n, C]: each channel's largest magnitude over ``top``."""
        return features.float().abs().amax(dim=(2, 3)) / cls.top

    @classmethod
    def encode(cls, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float [n, C, S, S] -> (int8 [n, C, S, S], float32 scale [n, C])."""
        scale = cls.scale_of(features)
        q = features.float() / torch.where(scale > 0, scale, 1.0)[:, :, None, None]
        return q.round().clamp(-cls.top, cls.top).to(cls.torch_dtype), scale


class Float8Storage(Int8Storage):
    """8-bit floats (``torch.float8_e4m3fn``: 4 exponent, 3 mantissa bits, largest 448) with one float32 scale
    per RoI and channel (``max|x| / 448``). Error: ``|x - x'| <= |x| / 16 + max|x| / (448 * 1024)``
    (half a step of a 3-bit mantissa; half the smallest subnormal). Stored as its raw bytes (uint8)."""

    name, np_dtype, torch_dtype, top = "float8", np.uint8, torch.float8_e4m3fn, 448.0

    @classmethod
    def encode(cls, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = cls.scale_of(features)
        y = (features.float() / torch.where(scale > 0, scale, 1.0)[:, :, None, None]).clamp(-cls.top, cls.top)
        return y.to(cls.torch_dtype).view(torch.uint8), scale


STORAGES = {s.name: s for s in (FloatStorage, Float32Storage, Int8Storage, Float8Storage)}


def decode_features(stored: torch.Tensor, scale: torch.Tensor | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Stored features [n, C, S, S] (and their scale [n, C] for 8-bit storage) -> float32 [n, C, S, S] on ``device``.

    Moved first, converted there: on a GPU the 8-bit values cross the bus and are widened on the GPU.
    """
    f = stored.to(device, non_blocking=True)
    if f.dtype == torch.uint8:  # float8 is kept as its raw bytes
        f = f.view(torch.float8_e4m3fn)
    f = f.to(torch.float32)
    return f if scale is None else f * scale.to(device, torch.float32)[:, :, None, None]
