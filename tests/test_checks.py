"""The exercises' checkers accept the right answer and explain a wrong one."""

import pytest

from labkit.checks import check_kappa
from labkit.metrics import cohen_kappa

JUDGE = ["yes", "yes", "no", "yes", "no", "yes"]
TRUTH = ["yes", "no", "no", "yes", "yes", "yes"]


def test_kappa_checker_accepts_cohens_kappa():
    check_kappa(cohen_kappa(JUDGE, TRUTH), JUDGE, TRUTH)


def test_kappa_checker_rejects_raw_agreement_and_says_how_to_fix_it():
    with pytest.raises(AssertionError, match="p_e"):
        check_kappa(4 / 6, JUDGE, TRUTH)
