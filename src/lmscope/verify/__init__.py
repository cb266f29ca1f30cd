"""Correctness certificates: ``lmscope verify`` (:mod:`lmscope.verify.certificate`)."""

from lmscope.verify.certificate import CHECKS, Certificate, Check, certify, require

__all__ = ["CHECKS", "Certificate", "Check", "certify", "require"]
