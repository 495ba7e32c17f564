"""The engine's greedy output equals transformers' greedy `generate` on the same HF checkpoint folder,
with and without MTP speculation, single and batched."""

from __future__ import annotations

import pytest
import torch

from frugalm import LLM, SamplingParams
from serve_helpers import TIE, one_thread, random_model, random_prompts  # noqa: F401

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
NEW = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_ckpt")
    model = random_model(11)
    gen = torch.Generator().manual_seed(5)
    for moe in model.moe_layers():  # a non-zero router bias so routing must match exactly
        moe.gate.e_score_correction_bias.copy_(torch.randn(model.config.n_routed_experts, generator=gen) * 0.5)
    model.save_pretrained(path)
    return path


def hf_greedy(hf, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    gc = transformers.GenerationConfig(max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=gc)[0, len(prompt):].tolist()
        logits = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1:]
    return out, logits


@pytest.mark.parametrize("speculative", [None, "mtp"])
def test_engine_equals_transformers_generate(checkpoint, speculative):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # generate exactly NEW tokens, as ignore_eos does for us
    llm = LLM(checkpoint, speculative=speculative, num_speculative_tokens=2, block_size=8)
    prompts = random_prompts(4, [6, 19, 31, 2], seed=7)
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    for prompt, c in zip(prompts, ours):
        ref, logits = hf_greedy(hf, prompt)
        assert len(c.token_ids) == len(ref) == NEW
        if c.token_ids != ref:  # only a numerical tie may make them diverge, and only at the tie
            i = next(j for j, (a, b) in enumerate(zip(c.token_ids, ref)) if a != b)
            gap = (logits[i, ref[i]] - logits[i, c.token_ids[i]]).item()
            assert gap < TIE, f"diverged from transformers at token {i} (logit gap {gap:.3g})"
