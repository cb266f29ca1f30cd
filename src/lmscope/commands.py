"""Every analysis command of ``lmscope``, in the order its help lists them (each a
:class:`~lmscope.reports.command.Command` defined in its own package; :mod:`lmscope.cli` turns
them into the command line)."""

from __future__ import annotations

from lmscope.reports.command import Command


def commands() -> list[Command]:
    """Every analysis command, in the order ``lmscope --help`` lists them."""
    from lmscope.circuits.commands import CIRCUIT, HEADS, LOCATE
    from lmscope.experts.command import EXPERTS
    from lmscope.features.commands import EVAL, TRAIN
    from lmscope.features.show import SHOW
    from lmscope.features.snmf import SNMF
    from lmscope.quant.commands import KV, OUTLIERS, QUANT
    from lmscope.readout.command import LENS
    from lmscope.scan import SCAN
    from lmscope.steering.commands import DAS, PROBE, STEER
    from lmscope.temporal.workflow import TEMPORAL
    from lmscope.training.command import PRETRAIN
    from lmscope.verify.command import VERIFY

    return [VERIFY, SCAN, TEMPORAL, LOCATE, CIRCUIT, HEADS, OUTLIERS, KV, QUANT, EXPERTS, LENS, PROBE, STEER, DAS,
            PRETRAIN, TRAIN, EVAL, SNMF, SHOW]  # fmt: skip
