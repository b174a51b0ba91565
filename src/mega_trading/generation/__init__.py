"""Rollouts: sampling, the one decoder engine (KV cache, sliding window), batch generation."""
