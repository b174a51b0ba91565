"""The order book data plane: record Binance streams, rebuild books exactly, book facts.

* `capture.py`: the capture format (gzip lines ``<receive time> <json>``), its reader and
  Binance's diff continuity rule;
* `record.py`: `mega-trading record`, the websocket + REST recorder that writes captures;
* `rebuild.py`: one symbol's book from snapshot + diffs (gaps, resyncs, provisional
  snapshots); the same book with a C scanner and loop (the default path, equal bit for
  bit): `native_lib.py` (builds and binds the library: `book_scan.c` the scanner,
  `book_state.c` the book and its loop, sharing `book_native.h`), `native.py` (the native
  BookBuilder), `native_scan.py` (a capture through the scanner); `build.py`: `mega-trading book`, captures in, Parquet +
  check.json out;
* `facts.py`: order-book stylized facts on the rebuilt book, with a noise floor.
"""
