"""Serving: vLLM / llama.cpp OpenAI-compatible servers (`serve`) and the `smoke-test`."""
