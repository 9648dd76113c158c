"""herd: every Llama generation in one PyTorch codebase.

    import herd
    llm = herd.load("smollm2-135m")          # or a GGUF file, an HF directory, a Meta checkpoint
    print(llm.chat([{"role": "user", "content": "Hi!"}]).text)
"""

__version__ = "0.1.0"


def load(source=None, device=None, dtype=None, progress=None, **options):
    from herd.api import load as _load

    return _load(source, device=device, dtype=dtype, progress=progress, **options)


load.__doc__ = "Load a model; see herd.api.load."


def __getattr__(name):
    # Heavy imports (torch) wait until they are used, so `herd --help` is instant.
    if name == "LLM":
        from herd.api import LLM

        return LLM
    if name == "finetune":  # the package, callable: herd.finetune(source, data, out, ...)
        import herd.finetune

        return herd.finetune
    if name == "eval":  # herd.eval.evaluate(llm, tasks, ...), reports, verify, compare
        import herd.eval

        return herd.eval
    if name == "SamplingParams":
        from herd.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(name)


__all__ = ["load", "finetune", "eval", "LLM", "SamplingParams", "__version__"]
