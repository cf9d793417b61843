"""The vLLM boundary: every place this project reaches into vLLM's internals lives here.

``compat`` lists the private vLLM symbols used and gates them on the tested vLLM versions;
``memory_lora`` hands merged adapters to an in-process vLLM worker from memory.
"""
