"""catchtag: attention sinks and the catch, tag, release mechanism in Hugging Face causal LMs.

Most users need two calls: ``load_model`` and ``scan``; each analysis is one function here.
"""

__version__ = "0.1.0"
