"""The order book data plane: record Binance streams, rebuild books exactly, book facts.

* `capture.py`: the capture format (gzip lines ``<receive time> <json>``), its reader and
  Binance's diff continuity rule;
* `record.py`: `mega-trading record`, the websocket + REST recorder that writes captures;
* `rebuild.py`: one symbol's book from snapshot + diffs (gaps, resyncs, provisional
  snapshots); `native.py` + `book_native.c`: the same book with a C scanner and loop (the
  default path, equal bit for bit); `build.py`: `mega-trading book`, captures in, Parquet +
  check.json out;
* `facts.py`: order-book stylized facts on the rebuilt book, with a noise floor.
"""
