"""Held-out evaluation: baselines, scoring, backtest, calibration, stylized facts, Hawkes, realism."""
