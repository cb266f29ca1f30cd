"""Features: sparse dictionaries (sparse autoencoders, transcoders, cross-layer transcoders) read
from and written to other libraries' formats, attached to a model as sites of their own, trained
on streamed activations (:mod:`lmscope.features.training`, :mod:`lmscope.features.harvest`) and
evaluated (:mod:`lmscope.features.evaluation`)."""

from lmscope.features.dictionary import ARCHS, CrossLayerTranscoder, Dictionary
from lmscope.features.evaluation import Evaluation, evaluate
from lmscope.features.formats import load_dictionaries, load_dictionary, save_dictionary
from lmscope.features.sites import Attachment, attach, attachments, clamp, detach, scale
from lmscope.features.training import Training, TrainSettings, train

__all__ = [
    "ARCHS",
    "Attachment",
    "CrossLayerTranscoder",
    "Dictionary",
    "Evaluation",
    "TrainSettings",
    "Training",
    "attach",
    "attachments",
    "clamp",
    "detach",
    "evaluate",
    "load_dictionaries",
    "load_dictionary",
    "save_dictionary",
    "scale",
    "train",
]
