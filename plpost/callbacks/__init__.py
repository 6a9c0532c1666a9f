from plpost.callbacks.export import HFExport, write_hf_folder
from plpost.callbacks.generations import GenerationEval
from plpost.callbacks.guards import NonFiniteError, NonFiniteGuard

__all__ = ["GenerationEval", "HFExport", "NonFiniteError", "NonFiniteGuard", "write_hf_folder"]
