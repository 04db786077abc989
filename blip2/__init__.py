"""blip2-endpoint: BLIP-2 behind an Azure ML endpoint.

This package __init__ stays light on purpose: ``import blip2`` must not pull in
torch or transformers, so that ``blip2.client`` installs and imports in seconds.
"""

__version__ = "0.1.0"
