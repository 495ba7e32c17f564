"""frugalm: the DeepSeek-V3 recipe (MLA + DeepSeekMoE + MTP, FP8, DualPipe, GRPO) on a frugal budget."""

__version__ = "0.1.0"


def from_pretrained(path, device=None, dtype=None, *, with_mtp: bool = False):
    """Load a HF-format DeepSeek-V3 checkpoint folder; see `frugalm.model.checkpoint.from_pretrained`."""
    from frugalm.model.checkpoint import from_pretrained as _load

    return _load(path, device=device, dtype=dtype, with_mtp=with_mtp)


def __getattr__(name):
    """`from frugalm import LLM, SamplingParams` without importing torch for `import frugalm`."""
    if name in ("LLM", "SamplingParams"):
        from frugalm import serve

        return getattr(serve, name)
    raise AttributeError(f"module 'frugalm' has no attribute {name!r}")
