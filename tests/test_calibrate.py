"""Temperature calibration (calibrate.py) on logits with a known miscalibration."""

from __future__ import annotations

import pytest
import torch

from mega_trading.core.errors import ConfigError
from mega_trading.eval.calibrate import CalibrateConfig, ece_at, fit_temperature, nll_at


def test_fitted_temperature_undoes_a_known_sharpening():
    gen = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 50, generator=gen) * 1.5
    targets = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=gen)[:, 0]
    sharpened = true_logits * 2.0  # an over-confident model: the right T is 2
    t = fit_temperature(sharpened, targets)
    assert t == pytest.approx(2.0, rel=0.05)
    assert nll_at(sharpened, targets, t) < nll_at(sharpened, targets, 1.0)
    assert ece_at(sharpened, targets, t) < ece_at(sharpened, targets, 1.0)
    # a calibrated model keeps T near 1
    assert fit_temperature(true_logits, targets) == pytest.approx(1.0, rel=0.05)


def test_calibration_never_fits_on_the_backtest_split():
    with pytest.raises(ConfigError, match="backtest"):
        CalibrateConfig(split="backtest")
