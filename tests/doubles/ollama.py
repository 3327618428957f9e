"""The Ollama double as a process for contract and system tests; it lives in `mai.sim.ollama_process` so the
benchmarks start it the same way without importing from tests/.

    from tests.doubles.ollama import ollama_double

    with ollama_double(tmp_path, load_time_s=0.05) as double:
        adapter = OllamaAdapter(double.host, num_ctx=8192)
"""

from mai.sim.ollama_process import OllamaDouble, ollama_double

__all__ = ["OllamaDouble", "ollama_double"]
