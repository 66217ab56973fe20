"""Importing this module imports every scorer module, so each registers itself."""
# Each scorer module adds itself here, e.g. `from . import hpsv2  # noqa: F401`.
