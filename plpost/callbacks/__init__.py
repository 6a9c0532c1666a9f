from plpost.callbacks.export import HFExport, write_hf_folder
from plpost.callbacks.generations import GenerationEval

__all__ = ["GenerationEval", "HFExport", "write_hf_folder"]
