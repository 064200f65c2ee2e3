"""Export stages: merged weights, AWQ, GGUF and Ollama."""
