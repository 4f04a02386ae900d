"""neighbourhoods: a city-conditioned generator of never-existing house photos.

Pipeline, one module per CLI verb:
ingest -> cluster/select -> train -> evaluate -> generate/serve -> report.
"""

__version__ = "0.1.0"
