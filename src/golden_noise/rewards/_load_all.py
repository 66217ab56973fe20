"""Importing this module imports every scorer module, so each registers itself."""
# Each scorer module adds itself here, e.g. `from . import hpsv2  # noqa: F401`.
from . import aesthetic  # noqa: F401
from . import clipscore  # noqa: F401
from . import hpsv2  # noqa: F401
from . import pickscore  # noqa: F401
from . import toy_attributes  # noqa: F401
