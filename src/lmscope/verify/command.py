"""``lmscope verify``: the correctness certificate of a model, as a command."""

from __future__ import annotations

from dataclasses import dataclass

from lmscope.core.model import Model
from lmscope.reports.command import Command, RunWriter, option
from lmscope.verify.certificate import CHECKS, Certificate, certify


@dataclass(frozen=True)
class VerifySettings:
    """``lmscope verify``: which checks to run (default: all)."""

    check: tuple[str, ...] = option((), "run only this check (repeatable)", flag="--check", choices=CHECKS)


@dataclass
class Verified(Certificate):
    """The certificate, with the CLI's exit code: 1 when a check failed."""

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def run_verify(model: Model, settings: VerifySettings, out: RunWriter) -> Verified:
    """Correctness certificate of MODEL: every check against an independent reference (exit 1 if one fails)."""

    def compute() -> Verified:
        cert = certify(model, list(settings.check) or None)
        return Verified(cert.model, cert.family, cert.checks)

    return out.part("certificate", "Correctness certificate", "Each check against an independent reference.", compute)


VERIFY = Command("verify", VerifySettings, run_verify)
