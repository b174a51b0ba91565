"""Mega-Trading: Binance spot trades as a language.

Pipeline stages, one module (or sub-package) each, data flowing one way:
ingest -> events -> tokenizer -> dataset -> model -> train -> backtest -> generate
-> facts -> report (serve and simulate sit on top of generate).
"""

__version__ = "0.1.0"
