"""Mega-Trading: Binance spot trades as a language.

Pipeline stages, one module (or sub-package) each, data flowing one way:
ingest -> events -> tokenizer -> dataset -> model -> train -> backtest -> generate
-> facts -> report (serve and simulate sit on top of generate).
"""

__version__ = "0.1.0"

# The pipeline's layers, earliest first: every module (by dotted name, or by sub-package
# prefix) belongs to one, and no module imports one of a later layer, not even lazily
# (tests/test_layering.py reads this list and checks every import in the package).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "config", "lineage", "stages", "data", "native"),  # plumbing
    ("ingest", "book", "book.capture", "book.record"),  # raw trades and captures
    ("events", "book.rebuild", "book.native", "book.build"),  # -> events, rebuilt books
    ("binning", "tokenizer"),  # -> one token per event
    ("tokenizer_reuse", "dataset"),  # -> chronological shards
    ("model", "kernels"),  # the decoder
    ("optim", "accel", "checkpoint", "tracking", "distributed", "train", "export_hf"),
    ("baselines", "score_sums", "scoring", "backtest", "calibrate"),  # -> held-out metrics
    ("decode", "engine", "generate", "hawkes", "sampling"),  # -> rollouts
    ("facts", "book.facts", "realism", "sampling_search"),  # -> stylized facts
    ("simulate", "serve"),  # products on top of generation
    ("report",),  # -> one HTML file
    ("pipeline", "ablation", "api", "cli", "cli_config"),  # orchestration: may import all
)
# The one import up the layers: the package root lends the notebook API its name.
FACADE_IMPORTS = frozenset({("__init__", "api")})

__all__ = ["FACADE_IMPORTS", "LAYERS", "__version__", "load_run"]


def __getattr__(name: str):
    # The package root is the public facade: `mega_trading.load_run` is the notebook API
    # (mega_trading.api), imported on first use so `import mega_trading` stays light and
    # the early stages never load the later ones (tests/test_layering.py allows this one).
    if name == "load_run":
        from mega_trading.api import load_run

        return load_run
    raise AttributeError(f"module 'mega_trading' has no attribute {name!r}")
