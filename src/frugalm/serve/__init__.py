"""frugalm.serve: a small paged-latent-cache inference engine for DeepSeek-V3-style models.

Layout (nano-vllm's): `engine` (step loop, `LLM`), `scheduler`, `block_manager`, `model_runner` +
`mla` (prefill and absorbed-decode attention), `sampler`, and for HTTP `async_engine`, `server`,
`protocol`, `metrics`, `reasoning`.
"""

from frugalm.serve.config import EngineConfig, ServerConfig
from frugalm.serve.engine import LLM, LLMEngine, PromptError
from frugalm.serve.sampling_params import SamplingParams
from frugalm.serve.sequence import Completion, RequestOutput, TokenLogprob

__all__ = [
    "LLM", "LLMEngine", "SamplingParams", "Completion", "RequestOutput", "TokenLogprob", "EngineConfig",
    "ServerConfig", "PromptError",
]
