"""Scale-out of the engine on Ray: batch evaluation over N engine actors (``engine.cluster.eval``) and the
replicated OpenAI endpoint on Ray Serve (``engine.cluster.serve``)."""
