"""Features: sparse dictionaries (sparse autoencoders, transcoders, cross-layer transcoders) read
from and written to other libraries' formats, and attached to a model as sites of their own."""

from lmscope.features.dictionary import ARCHS, CrossLayerTranscoder, Dictionary
from lmscope.features.formats import load_dictionaries, load_dictionary, save_dictionary

__all__ = [
    "ARCHS",
    "CrossLayerTranscoder",
    "Dictionary",
    "load_dictionaries",
    "load_dictionary",
    "save_dictionary",
]
