"""Printed numbers and the one silenced warning."""
import warnings

import pytest

from moe_train.console import fmt, quiet_known_warnings


@pytest.mark.parametrize("value, text", [
    (2.992003880441189, "2.992"), (14523.7, "14520"), (0.00123456, "0.001235"),
    (0.99996, "1.000"), (5, "5.000"), (3e9, "3.000e+09"), (1.5e-7, "1.500e-07"), (0, "0")])
def test_four_significant_digits(value, text):
    assert fmt(value) == text


def test_only_megatrons_missing_te_apex_warning_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        quiet_known_warnings()
        warnings.filterwarnings("always", append=True)
        for module, message in [
                ("megatron.core.optimizer", "Transformer Engine and Apex are not installed. "
                                            "Falling back to Torch optimizers."),
                ("megatron.core.optimizer", "some other megatron warning"),
                ("moe_train.x", "Transformer Engine and Apex are not installed.")]:
            warnings.warn_explicit(message, UserWarning, "f.py", 1, module=module)
    assert [str(w.message) for w in caught] == [
        "some other megatron warning", "Transformer Engine and Apex are not installed."]
