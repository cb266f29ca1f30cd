"""Features: sparse dictionaries (sparse autoencoders, transcoders, cross-layer transcoders) read
from and written to other libraries' formats, and attached to a model as sites of their own."""

from lmscope.features.dictionary import ARCHS, CrossLayerTranscoder, Dictionary
from lmscope.features.formats import load_dictionaries, load_dictionary, save_dictionary
from lmscope.features.sites import Attachment, attach, attachments, clamp, detach, scale

__all__ = [
    "ARCHS",
    "Attachment",
    "CrossLayerTranscoder",
    "Dictionary",
    "attach",
    "attachments",
    "clamp",
    "detach",
    "load_dictionaries",
    "load_dictionary",
    "save_dictionary",
    "scale",
]
