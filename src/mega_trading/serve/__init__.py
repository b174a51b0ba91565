"""HTTP rollout service: sample synthetic order flow from a trained run over a small JSON API.

``create_app(run_dir, data_dir=None, settings=ServeSettings())`` builds a FastAPI app:

* ``POST /v1/rollouts``  continue a prompt (token ids, events, or a named real window of
  the prepared data) with ``n`` sampled rollouts of ``length`` tokens, decoded to events
  and price / time paths, with the provenance needed to reproduce them; without a prompt
  the rollouts start a new segment (the prompt is one ``SEG`` token: a beginning-of-
  sequence seed), anchored at the latest real segment start of ``symbol`` in the data, or
  at price 1 and time 0 without a symbol;
* ``GET /v1/model``      the model card (config, size, training data, backtest headline);
* ``GET /healthz``       liveness plus batching counters;
* ``GET /openapi.json``  the schema (committed as ``docs/openapi.json``; a test keeps the
  two equal: regenerate with ``python -m mega_trading.serve docs/openapi.json``).

Batching. Handlers never touch the model: they validate a request into a ``Job`` and put
it on a queue. One worker task takes the oldest job and collects more jobs with the same
prompt length (so every row shares one prefill and one sliding window schedule), up to
``batch_rows`` rows or ``max_batch_requests`` requests, then runs them together in a
worker thread (``RolloutEngine.run_batch``). A batch starts as soon as it is full, or
when for ``batch_window_ms`` no job joined it and no answer was being written, and at the
latest ``max_batch_wait_ms`` after its first job was taken; meanwhile it also waits for
clients answered on a connection they keep open less than ``max_batch_wait_ms`` ago (a
client answered moments ago is likely to send its next request). Answers leave one after
another, so the clients of one batch come back spread over the time the answers take to
write and read; a window counted from the first job cut them into convoys that each paid
for all ``batch_rows`` rows (BENCHMARKS.md, issue 18). A job with a shorter ``length`` is
answered as soon as its own tokens are done. Jobs of another prompt length wait in order
for the next batch. ``max_batch_requests=1`` turns batching off; ``batch_window_ms=0``
takes only the jobs already queued. The answers of the jobs that finish at one step are
decoded in one pass on the worker thread (``RolloutEngine.prepare``, each answer's in-bin
draws from its own seed: the values it gets alone), and the event loop only turns them
into JSON (msgspec), so a batch's answers leave within a few ms and its clients come back
together.

Determinism under batching: a request's rollouts depend only on the request (prompt,
sampling settings, seed) and the server's run and ``batch_rows``, never on which other
requests share its batch or on which rows it gets, because

1. each request samples its rows with its OWN ``torch.Generator`` seeded with its seed
   (``DecodeEngine.sample_each``: the race of its rows drawn from its generator; every
   other sampling op runs on all ``batch_rows`` rows, once per distinct settings), so no
   other request draws from its stream;
2. every forward pass has the same shape, ``[batch_rows, T]``: unused rows are padding.
   Every op of the model is row-independent (embedding, per-row norms, per-sequence
   attention, matmuls), but a BLAS kernel may reduce in another order for another batch
   size (matrix-vector for one row, blocked matrix-matrix for several), which changes the
   last bits of the logits; with a fixed shape, a row's arithmetic is the same whatever
   the other rows hold (tests check that a request alone, with others, or at another row
   offset gives the same tokens). The price: at low load a lone request pays for
   ``batch_rows`` rows (on a CPU about 2.7x the time of one row for the micro preset; on
   a GPU next to nothing), so ``batch_rows`` is a setting;
3. the decode loop is the one decoder engine of ``mega_trading.generation.generate.generate``
   (``engine.DecodeEngine``: prefill, one token per step on fused weights fetched once,
   the same sliding window), so a request filling all ``batch_rows`` rows gets exactly
   what ``generate`` gives with the same seed (tested).

Limits. Bodies over ``max_body_bytes`` get 413 before any parsing; schema violations,
tokens outside the vocabulary, prompts longer than the model's block size, ``n`` over
``batch_rows`` and ``n * length`` over ``max_new_tokens`` get 422 with a message; a full
queue, or a job not started within ``queue_timeout_s``, gets 503 and a job not done
within ``request_timeout_s`` gets 504. The worker turns any failure of a batch into an
error for the jobs in it, so a request never hangs.
"""
