"""`mimdex train`: training pairs + catalog -> a model bundle.

job.py (data, presets, the trainer, the bundle and its card) -> evaluate.py (a bundle's
recall on a synth dataset's evaluation queries, by exact search). Other jobs use only what
this package exports; the exports load on first use (torch is heavy), so importing the
package costs nothing.
"""
from mimdex.pipelines.exports import lazy_exports

_HOME = {"TrainJob": "job", "evaluate_bundle": "evaluate", "load_data": "job", "run": "job", "save_pretrained_bundle": "job",
         "train_unless_complete": "job"}
__all__ = sorted(_HOME)
__getattr__ = lazy_exports(__name__, _HOME)
