"""Raw trades to shards: ingest, events, tokenizer, datasets, and the bundled real data."""
