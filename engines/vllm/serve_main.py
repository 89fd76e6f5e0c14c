"""`python -m engines.vllm.serve_main ARGS` runs vLLM's OpenAI server (`vllm.entrypoints.openai.api_server`) as
its `__main__`, from a module that imports nothing itself.

Why: vLLM starts its engine core and each worker with multiprocessing's spawn, and a spawned child first
re-imports its parent's `__main__` module. Started as `-m vllm.entrypoints.openai.api_server`, every child
re-imported the whole API server (FastAPI, the OpenAI routes, ~12 s of imports on this 2-core CPU) that it
never uses; started from here, a child imports only what it needs. The server itself is the same code with the
same arguments.
"""

if __name__ == "__main__":
    import runpy

    # alter_sys=False keeps this module as sys.modules["__main__"], which is what the children re-import
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=False)
