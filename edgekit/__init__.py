"""edgekit: put Gemma 4 edge models (E2B / E4B) on real devices.

The base package is the device side and imports neither torch nor transformers.
"""

__version__ = "0.1.0"
# The name on the package index (`edgekit` there is an unrelated project); `pip install` takes this.
DISTRIBUTION = "gemma-edgekit"
