"""``tileattn.flash_attn_compat``: flash-attn 2's API on tileattn (see ``integrations/flash_attn_compat.py``)."""

from .integrations.flash_attn_compat import *  # noqa: F401,F403
from .integrations.flash_attn_compat import __all__  # noqa: F401
