"""alignkit's side of a benchmark case, run as its own process by ``run.py``.

Usage: ``worker_alignkit.py CASE PARAMS_JSON``. Each case runs alignkit the way the
CLI does (the recipe's ``run`` with a config), with one hook: the batch function of the
training loop waits at the gate, so every optimizer step is one measured unit.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Gate, emit  # noqa: E402


def gated_fit(module, gate: Gate, count_tokens, flops=None):
    """Wrap ``module.fit`` so that each micro-batch waits at the gate before it is used."""
    original = module.fit

    def fit(**kwargs):
        make_batch = kwargs["make_batch"]
        pending: dict = {}

        def make_gated(indices):
            batch = make_batch(indices)
            if gate.open:
                gate.end(**pending)
            gate.begin()
            pending.clear()
            pending["tokens"] = count_tokens(batch)
            if flops is not None:
                pending["flops"] = flops(batch)
            return batch

        kwargs["make_batch"] = make_gated
        return original(**kwargs)

    module.fit = fit


def overrides(params: dict, out: Path) -> list[str]:
    keys = {k: v for k, v in params.items() if not k.startswith("_")}
    return [f"{k}={v}" for k, v in keys.items()] + [f"output_dir={out}", "max_steps=100000"]


def model_flops(model_dir: str):
    """FLOPs of a training step: per token, per scored token, per attended pair.

    6 x (non-embedding parameters) per token for forward + backward; 6 x (V x H) per
    token that goes through the LM head; 12 x (heads x head_dim) per layer for each
    (query, key) pair causal attention needs (scores and weighted values, forward and
    backward; the blocks a causal kernel can skip are not counted).
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = h // heads
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * i
    per_pair = 12 * heads * head_dim * layers
    return 6 * per_layer * layers, 6 * config.vocab_size * h, per_pair


def unique_tokens(batch, pairs: bool) -> tuple[int, int, int]:
    """(tokens the model must see, tokens scored, causal attention pairs).

    A pair's prompt counts once: chosen attends over [prompt, chosen] causally,
    rejected over the prompt and itself.
    """
    mask = batch["attention_mask"]
    scored = int(batch["completion_mask"][:, 1:].sum())
    lengths = mask.sum(-1).tolist()
    if not pairs:
        return int(mask.sum()), scored, sum(n * (n + 1) // 2 for n in lengths)
    half = mask.shape[0] // 2
    prompts = (mask.sum(-1) - batch["completion_mask"].sum(-1))[:half].tolist()
    attended = 0
    for chosen, rejected, prompt in zip(lengths[:half], lengths[half:], prompts, strict=True):
        own = rejected - prompt
        attended += chosen * (chosen + 1) // 2 + own * prompt + own * (own + 1) // 2
    return int(mask.sum()) - int(sum(prompts)), scored, attended


def offline(case: str, params: dict, gate: Gate) -> None:
    from alignkit.config import load_config
    from alignkit.models import resolve_model
    from alignkit.recipes import dpo, reward, sft

    module = {"dpo": dpo, "reward": reward, "sft": sft}[case]
    model_dir = resolve_model(params.get("model", "smollm2-135m-instruct"))
    per_token, per_scored, per_pair = model_flops(model_dir)

    def flops(batch) -> float:
        if case == "reward":
            return 0.0
        tokens, scored, attended = unique_tokens(batch, pairs=case == "dpo")
        return float(per_token * tokens + per_scored * scored + per_pair * attended)

    gated_fit(module, gate, lambda batch: int(batch["attention_mask"].sum()), flops)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{case}-"))
    config = load_config(module.Config, case, None, overrides(params, out))
    module.run(config, overwrite=True)


def online(case: str, params: dict, gate: Gate) -> None:
    """One online step (generate, score, update) per unit: ``rl`` (GRPO / RLOO) or ``ppo``."""
    from alignkit.config import load_config
    from alignkit.recipes import ppo, reinforce

    recipe = reinforce if case == "rl" else ppo
    original = recipe.collect_experience
    pending: dict = {}

    def collect(*args, **kwargs):
        if gate.open:
            gate.end(**pending)
        gate.begin()
        experience = original(*args, **kwargs)
        pending.clear()
        pending["tokens"] = int(experience.rollout.completion_lengths.sum())
        return experience

    recipe.collect_experience = collect
    out = Path(tempfile.mkdtemp(prefix=f"bench-{case}-"))
    config = load_config(recipe.Config, case, None, overrides(params, out))
    recipe.run(config, overwrite=True)


def generation(params: dict, gate: Gate) -> None:
    """``go BATCH``: one call of the sampler on BATCH prompts."""
    import torch

    from alignkit.data import encode_prompt
    from alignkit.models import EMBEDDED_MODEL, load_sampler, load_tokenizer
    from alignkit.rollout import SamplingParams, generate

    torch.manual_seed(0)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    model = load_sampler(EMBEDDED_MODEL)  # as ``alignkit sample`` loads it
    prompts = [encode_prompt(tokenizer, row["prompt"]) for row in params["_prompts"]]
    calls = 0
    while True:
        batch = int(gate.begin())
        sampling = SamplingParams(
            max_new_tokens=params["max_new_tokens"],
            temperature=params["temperature"],
            top_p=1.0,
            top_k=0,
            seed=calls,
        )
        chosen = [prompts[(calls * batch + j) % len(prompts)] for j in range(batch)]
        rollout = generate(model, tokenizer, chosen, sampling)
        calls += 1
        gate.end(tokens=int(rollout.completion_lengths.sum()), batch=batch)


def main() -> None:
    case, params = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    gate = Gate()
    emit("start", case=case, python=sys.executable, time=time.time())
    import torch

    import alignkit

    policy = os.environ.get("OMP_WAIT_POLICY", "default")
    emit("env", threads=torch.get_num_threads(), alignkit=alignkit.__file__, omp_wait_policy=policy)
    if case in ("dpo", "reward", "sft"):
        offline(case, params, gate)
    elif case in ("rl", "ppo"):
        online(case, params, gate)
    elif case == "generate":
        generation(params, gate)
    else:
        raise SystemExit(f"unknown case {case}")
    gate.finish()


if __name__ == "__main__":
    main()
