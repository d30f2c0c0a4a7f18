"""`mimdex train`: training pairs + catalog -> a model bundle.

job.py (data, presets, the trainer, the bundle and its card) -> evaluate.py (a bundle's
recall on a synth dataset's evaluation queries, by exact search). Other jobs use only what
this package exports; the exports load on first use (torch is heavy), so importing the
package costs nothing.
"""
__all__ = ["TrainJob", "evaluate_bundle", "run", "save_pretrained_bundle", "train_unless_complete"]


def __getattr__(name: str):
    if name == "evaluate_bundle":
        from mimdex.pipelines.train import evaluate

        return evaluate.evaluate_bundle
    if name in __all__:
        from mimdex.pipelines.train import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
