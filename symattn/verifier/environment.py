"""What a verification ran with: library versions, and the devices that the implementations' outputs came
from (``verify --json``'s ``environment``, ``Result.environment``).  Nothing here imports a framework or needs
a GPU: a library already imported gives its own version, others their installed one, or None."""

from __future__ import annotations

import platform
import sys
from importlib import metadata

# key in the report -> (module, distribution)
LIBRARIES = {
    "numpy": ("numpy", "numpy"),
    "python-flint": ("flint", "python-flint"),
    "mpmath": ("mpmath", "mpmath"),
    "sympy": ("sympy", "sympy"),
    "ml_dtypes": ("ml_dtypes", "ml_dtypes"),
    "torch": ("torch", "torch"),
    "jax": ("jax", "jax"),
    "jaxlib": ("jaxlib", "jaxlib"),
}


def versions() -> dict:
    """symattn's, Python's and each library's version (None where it is not installed), and the platform."""
    from symattn._version import __version__

    out = {"symattn": __version__, "python": platform.python_version()}
    for key, (module, distribution) in LIBRARIES.items():
        out[key] = _version(module, distribution)
    out["platform"] = platform.platform()
    return out


def _version(module: str, distribution: str) -> str | None:
    loaded = sys.modules.get(module)
    version = getattr(loaded, "__version__", None) if loaded is not None else None
    if isinstance(version, str):
        return version
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def devices(output) -> list[str]:
    """The devices an implementation's output (an array, or a dict or tuple of them) lives on: "cpu" for NumPy,
    torch's device ("cuda:0 (NVIDIA H200)" with the GPU's name), JAX's devices."""
    found: list = []
    _collect(output, found)
    return sorted(set(found))


def _collect(value, found: list) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _collect(v, found)
        return
    if isinstance(value, (tuple, list)):
        for v in value:
            _collect(v, found)
        return
    module = type(value).__module__
    if module.startswith("torch"):
        found.append(_torch_device(value.device))
    elif module.startswith(("jax", "jaxlib")):
        try:
            found += [_jax_device(d) for d in value.devices()]
        except (AttributeError, RuntimeError):  # a tracer or an old JAX
            found.append("jax")
    else:
        found.append("cpu")  # NumPy, lists, scalars: host memory


def _torch_device(device) -> str:
    if device.type != "cuda":
        return str(device)
    try:
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    except Exception:  # a driver that does not answer: the device's name alone
        return str(device)


def _jax_device(d) -> str:
    kind = getattr(d, "device_kind", None)
    platform_ = getattr(d, "platform", "")
    name = f"{platform_}:{getattr(d, 'id', 0)}"
    return "cpu" if platform_ == "cpu" else (f"{name} ({kind})" if kind else name)
