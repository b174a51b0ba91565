"""Mega-Trading: Binance trades as a language.

One sub-package per pipeline stage, data flowing one way (``LAYERS`` below):
core -> data (ingest, events, tokenizer, shards) -> book -> model -> train -> generation
-> eval (backtest, facts, realism) -> simulate / serve -> report, with the orchestration
(pipeline, ablation, api, cli) on top.
"""

__version__ = "0.1.0"

# The pipeline's layers, earliest first: every module (by dotted name, or by sub-package
# prefix) belongs to one, and no module imports one of a later layer, not even lazily
# (tests/test_layering.py reads this list and checks every import in the package).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "core", "data.bundled"),  # plumbing, and where the bundled data lies
    ("data.ingest", "book.capture", "book.record"),  # raw trades and captures
    ("data.events", "book", "book.rebuild", "book.native", "book.native_lib", "book.native_scan",
     "book.build"),  # -> events, books
    ("data.binning", "data.field_bins", "data.tick_context", "data.tokenizer"),  # -> one token per event
    ("data", "data.tokenizer_reuse", "data.windows", "data.shards", "data.parts",
     "data.prepare"),  # -> chronological shards
    ("model",),  # the decoder, its kernels and checkpoints
    ("train",),  # -> a trained model
    ("generation",),  # -> rollouts (sampling, the decoder engine)
    ("eval", "book.facts"),  # -> held-out metrics, stylized facts, realism
    ("simulate", "serve"),  # products on top of generation
    ("report",),  # -> one HTML file
    ("pipeline", "ablation", "api", "cli"),  # orchestration: may import all
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
