"""`mimdex demo`: the whole lifecycle on a synthetic catalog, ending in an HTML report.

job.py (the stages) -> evaluation.py (the figures through the published indexes, and the
examples shown) -> html_report.py (the page); baseline.py is the naive histogram
nearest neighbour the report compares against. Other jobs use only what this package
exports; the exports load on first use, so importing the package costs nothing.
"""
__all__ = ["MULTIMODAL_EXAMPLES", "STREET_EXAMPLES", "VARIANTS", "evaluate_histogram_nn", "main"]


def __getattr__(name: str):
    if name == "evaluate_histogram_nn":
        from mimdex.pipelines.demo import baseline

        return baseline.evaluate_histogram_nn
    if name in __all__:
        from mimdex.pipelines.demo import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
