"""Question -> top-k doc ids -> merged adapter -> vLLM -> answer; evaluation and serving."""
