from plpost.callbacks.export import HFExport, write_hf_folder
from plpost.callbacks.generations import GenerationEval
from plpost.callbacks.guards import NonFiniteError, NonFiniteGuard
from plpost.callbacks.progress import StageProgressBar, Throughput

__all__ = [
    "GenerationEval", "HFExport", "NonFiniteError", "NonFiniteGuard", "StageProgressBar", "Throughput", "write_hf_folder",
]
