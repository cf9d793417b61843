"""The OpenAI-compatible HTTP server: ``protocol`` (wire models), ``errors`` (OpenAI error shape and
statuses), ``metrics`` (Prometheus), ``app`` (routes, limits, lifecycle; ``create_app``, ``serve``)."""
