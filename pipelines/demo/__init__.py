"""`mimdex demo`: the whole lifecycle on a synthetic catalog, ending in an HTML report.

job.py (the stages) -> evaluation.py (the figures through the published indexes, and the
examples shown) -> html_report.py (the page); baseline.py is the naive histogram
nearest neighbour the report compares against. Other jobs use only what this package
exports; the exports load on first use, so importing the package costs nothing.
"""
from mimdex.pipelines.exports import lazy_exports

_HOME = {"MULTIMODAL_EXAMPLES": "job", "STREET_EXAMPLES": "job", "VARIANTS": "job", "evaluate_histogram_nn": "baseline", "main": "job"}
__all__ = sorted(_HOME)
__getattr__ = lazy_exports(__name__, _HOME)
