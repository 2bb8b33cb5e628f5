"""The peer's side of a benchmark case: TRL trainers and HF ``generate``.

Run by ``run.py`` with the benchmark venv's Python (TRL installed there, never in the
project's venv). Usage: ``worker_trl.py CASE PARAMS_JSON``. Each optimizer step of a
TRL trainer is one measured unit: a callback waits at the gate in ``on_step_begin``
and reports in ``on_step_end``; a wrapped data collator counts the batch's tokens.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Gate, emit, length_reward  # noqa: E402


def _gate_callback(gate: Gate, counter: dict):
    from transformers import TrainerCallback

    class GateCallback(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            gate.begin()

        def on_step_end(self, args, state, control, **kwargs):
            gate.end(tokens=counter.get("tokens", 0))

    return GateCallback()


def _counting(collator, counter: dict):
    def collate(examples):
        batch = collator(examples)
        counter["tokens"] = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        if "chosen_attention_mask" in batch:  # reward collator: chosen and rejected apart
            counter["tokens"] = int(batch["chosen_attention_mask"].sum()) + int(
                batch["rejected_attention_mask"].sum()
            )
        return batch

    return collate


def _common_args(params: dict, out: str) -> dict:
    return {
        "output_dir": out,
        "per_device_train_batch_size": params["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": 100000,
        "learning_rate": params["lr"],
        "lr_scheduler_type": "linear",
        "bf16": params["bf16"],
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 10,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "gradient_checkpointing": params.get("gradient_checkpointing", True),
    }


def _train_gated(trainer_cls, model, args, tokenizer, params: dict, gate: Gate) -> None:
    """Build a TRL trainer on the case's rows and train it, one gated step at a time."""
    from datasets import Dataset

    counter: dict = {}
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(params["_rows"]),
        processing_class=tokenizer,
        callbacks=[_gate_callback(gate, counter)],
    )
    trainer.data_collator = _counting(trainer.data_collator, counter)
    trainer.train()


def dpo(params: dict, gate: Gate) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForCausalLM.from_pretrained(params["model_dir"], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(params["model_dir"])
    args = DPOConfig(
        **_common_args(params, tempfile.mkdtemp(prefix="bench-trl-dpo-")),
        max_length=params["max_length"],
        beta=params["beta"],
        precompute_ref_log_probs=params.get("precompute_ref_log_probs", False),
    )
    _train_gated(DPOTrainer, model, args, tokenizer, params, gate)


def reward(params: dict, gate: Gate) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(params["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(
        params["model_dir"], num_labels=1, dtype="float32", pad_token_id=tokenizer.pad_token_id
    )
    args = RewardConfig(
        **_common_args(params, tempfile.mkdtemp(prefix="bench-trl-rm-")),
        max_length=params["max_length"],
    )
    _train_gated(RewardTrainer, model, args, tokenizer, params, gate)


def grpo(params: dict, gate: Gate) -> None:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = AutoModelForCausalLM.from_pretrained(params["model_dir"], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(params["model_dir"], padding_side="left")
    k = params["samples_per_prompt"]
    args = GRPOConfig(
        **_common_args(
            {**params, "batch_size": k * params["prompts_per_step"]},
            tempfile.mkdtemp(prefix="bench-trl-grpo-"),
        ),
        num_generations=k,
        max_completion_length=params["max_new_tokens"],
        temperature=params["temperature"],
        top_p=1.0,
        top_k=0,
        beta=params["kl_coef"],
    )
    counter: dict = {}

    def reward_fn(prompts, completions, **kwargs):
        return length_reward(prompts, completions)

    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_fn,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": row["prompt"]} for row in params["_prompts"]]),
        processing_class=tokenizer,
        callbacks=[_gate_callback(gate, counter)],
    )
    original = trainer._generate_and_score_completions

    def generate_and_count(inputs):
        output = original(inputs)
        counter["tokens"] = int(output["completion_mask"].sum())
        return output

    trainer._generate_and_score_completions = generate_and_count
    trainer.train()


def generation(params: dict, gate: Gate) -> None:
    """``go BATCH``: one ``model.generate`` call on BATCH prompts, HF's defaults otherwise."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    dtype = torch.bfloat16 if params["bf16_weights"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(params["model_dir"], dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(params["model_dir"], padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = [
        tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        for row in params["_prompts"]
    ]
    calls = 0
    autocast = params["bf16"] and not params["bf16_weights"]
    while True:
        batch = int(gate.begin())
        chosen = [texts[(calls * batch + j) % len(texts)] for j in range(batch)]
        inputs = tokenizer(chosen, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            output = model.generate(
                **inputs,
                do_sample=True,
                temperature=params["temperature"],
                top_k=0,
                top_p=1.0,
                max_new_tokens=params["max_new_tokens"],
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[:, inputs["input_ids"].shape[1] :]
        # Generated tokens up to and including each row's first EOS.
        is_eos = new == tokenizer.eos_token_id
        after = (is_eos.cumsum(-1) - is_eos.long()) > 0
        calls += 1
        gate.end(tokens=int((~after).sum()), batch=batch)


def main() -> None:
    case, params = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    gate = Gate()
    emit("start", case=case, python=sys.executable, time=time.time())
    import torch
    import trl

    emit("env", threads=torch.get_num_threads(), trl=trl.__version__)
    {"dpo": dpo, "reward": reward, "rl": grpo, "generate": generation}[case](params, gate)
    gate.finish()


if __name__ == "__main__":
    main()
