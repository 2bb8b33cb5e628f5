"""The ``device`` key: its resolution (CUDA availability monkeypatched, nothing runs on a
GPU here), CPU runs that match the default bit for bit, and ``device=cuda`` refused on a
machine without CUDA with one line and exit status 2 before any file is written."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignkit.cli import main
from alignkit.config import load_config
from alignkit.errors import InputError
from alignkit.models import model_device, resolve_device
from alignkit.recipes import best_of_n, ppo, reinforce, sample, sft
from alignkit.training.distributed import setup

from .online_toy import toy_overrides, write_prompts


def _fake_cuda(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


# --- resolution ----------------------------------------------------------------------


def test_resolution_without_cuda(monkeypatch):
    _fake_cuda(monkeypatch, 0)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    for spec in ("cuda", "cuda:0", "cuda:3"):
        with pytest.raises(InputError) as info:
            resolve_device(spec)
        assert str(info.value) == (
            f"config: field 'device' is '{spec}' but CUDA is not available on this machine "
            "(use cpu or auto)"
        )
    for spec in ("gpu", "cuda:x", "cuda:", "mps", ""):
        with pytest.raises(InputError) as info:
            resolve_device(spec)
        assert str(info.value).startswith("config: field 'device' expects auto, cpu, cuda or")


def test_resolution_with_cuda_follows_local_rank(monkeypatch):
    _fake_cuda(monkeypatch, 4)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "2")  # torchrun's rank on this node
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:3") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError) as info:
        resolve_device("cuda:4", key="--device", source="command line")
    assert (
        str(info.value) == "command line: field '--device' asks for GPU 4, but this machine has 4"
    )


def test_one_gpu_for_several_processes_on_a_machine_is_refused(monkeypatch):
    """``cuda:N`` under torchrun would put every rank of the machine on GPU N."""
    _fake_cuda(monkeypatch, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # WORLD_SIZE then counts
    with pytest.raises(InputError) as info:
        resolve_device("cuda:1")
    assert str(info.value) == (
        "config: field 'device' is 'cuda:1', which would put all 2 processes of this machine "
        "on GPU 1 (use cuda or auto: each rank takes cuda:LOCAL_RANK)"
    )
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(InputError):
        resolve_device("cuda:0")
    assert resolve_device("cuda") == resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    # one process per machine (e.g. one per SLURM node): its GPU may be named
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert resolve_device("cuda:3") == torch.device("cuda", 3)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LOCAL_RANK": "first"}, "field 'LOCAL_RANK' expects an integer, got 'first'"),
        ({"LOCAL_RANK": "-1"}, "field 'LOCAL_RANK' must be >= 0, got -1"),
        ({"WORLD_SIZE": "2.0"}, "field 'WORLD_SIZE' expects an integer, got '2.0'"),
        ({"WORLD_SIZE": "0"}, "field 'WORLD_SIZE' must be >= 1, got 0"),
        ({"WORLD_SIZE": "2", "RANK": "0x1"}, "field 'RANK' expects an integer, got '0x1'"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "field 'RANK' is 2, but WORLD_SIZE is 2"),
        (
            {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_WORLD_SIZE": "two"},
            "field 'LOCAL_WORLD_SIZE' expects an integer, got 'two'",
        ),
    ],
)
def test_torchrun_variables_that_are_not_integers_are_named(env, message, monkeypatch):
    """Every reader of torchrun's variables (device resolution, joining the process
    group) refuses a malformed one with one line naming it, before torch sees it."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for call in (lambda: resolve_device("cpu"), lambda: setup("ddp", 8)):
        with pytest.raises(InputError) as info:
            call()
        assert str(info.value) == f"environment: {message}"


def test_stray_rank_on_one_process_is_not_read(monkeypatch):
    """RANK and LOCAL_WORLD_SIZE matter only on several processes: a single-process
    run does not read them."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "not-a-rank")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "x")
    assert resolve_device("cpu") == torch.device("cpu")
    assert setup("ddp", 8).world_size == 1


def test_bf16_and_autocast_follow_the_device(monkeypatch):
    from alignkit.models import autocast, bf16_supported

    assert autocast("cpu", enabled=True).device == "cpu"
    with warnings.catch_warnings():  # torch disables CUDA autocast where CUDA is missing
        warnings.simplefilter("ignore")
        assert autocast(torch.device("cuda", 0), enabled=True).device == "cuda"
    cpu_answer = bf16_supported("cpu")  # the CPU's flags, whatever the GPUs say
    _fake_cuda(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: not cpu_answer)
    assert bf16_supported("cuda:1") is (not cpu_answer)
    assert bf16_supported(None) is (not cpu_answer)  # None asks the GPU when there is one
    assert bf16_supported("cpu") is cpu_answer


def test_single_process_job_carries_the_device():
    assert setup("none", 8).device == torch.device("cpu")
    assert setup("none", 8, device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize(
    ("cls", "recipe", "extra"),
    [
        (sft.Config, "sft", ["data=x.jsonl"]),
        (reinforce.Config, "rl", []),
        (best_of_n.Config, "bon", []),
        (sample.Config, "sample", []),
    ],
)
def test_configs_resolve_to_the_cpu_here(cls, recipe, extra):
    assert not torch.cuda.is_available()  # this project's machines have no GPU
    for value in ("auto", "cpu"):
        config = load_config(cls, recipe, None, [*extra, f"device={value}"])
        assert resolve_device(config.device) == torch.device("cpu")
    assert load_config(cls, recipe, None, extra).device == "auto"


# --- device=cpu is the default here, bit for bit -------------------------------------


def _run_sft(tiny_model, sft_data, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    overrides = [
        f"model={tiny_model}",
        f"data={sft_data}",
        f"output_dir={out}",
        "max_steps=3",
        "batch_size=4",
        "lr=3e-3",
        "bf16=false",
        *extra,
    ]
    sft.run(load_config(sft.Config, "sft", None, overrides))
    return load_file(str(out / "model.safetensors"))


def test_sft_on_cpu_equals_the_default(tiny_model, sft_data, tmp_path, one_thread):
    default = _run_sft(tiny_model, sft_data, tmp_path / "default")
    on_cpu = _run_sft(tiny_model, sft_data, tmp_path / "cpu", "device=cpu")
    start = load_file(str(Path(tiny_model) / "model.safetensors"))
    assert max((default[k] - start[k]).abs().max().item() for k in start) > 1e-4
    assert default.keys() == on_cpu.keys()
    for key in default:
        assert torch.equal(default[key], on_cpu[key]), key


@pytest.mark.parametrize(
    ("module", "recipe", "extra", "files"),
    [
        (reinforce, "rl", {"algo": "grpo"}, ["model.safetensors"]),
        (ppo, "ppo", {}, ["model.safetensors", "value_head.safetensors"]),
    ],
    ids=["grpo", "ppo"],
)
def test_online_run_on_cpu_equals_the_default(
    module, recipe, extra, files, tiny_model, tmp_path, one_thread
):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    saved = {}
    for name, device in (("default", {}), ("cpu", {"device": "cpu"})):
        out = tmp_path / name
        overrides = toy_overrides(tiny_model, prompts, out, max_steps=2, **extra, **device)
        module.run(load_config(module.Config, recipe, None, overrides), overwrite=True)
        saved[name] = {f: load_file(str(out / f)) for f in files}
    start = load_file(str(Path(tiny_model) / "model.safetensors"))
    policy = saved["default"]["model.safetensors"]
    assert max((policy[k] - start[k]).abs().max().item() for k in start) > 0
    for f in files:
        assert saved["default"][f].keys() == saved["cpu"][f].keys()
        for key in saved["default"][f]:
            assert torch.equal(saved["default"][f][key], saved["cpu"][f][key]), (f, key)


def test_loaded_models_sit_on_the_asked_device(tiny_model):
    from alignkit.models import load_policy, load_reward_backbone

    assert model_device(load_policy(tiny_model, device="cpu")) == torch.device("cpu")
    assert model_device(load_reward_backbone(tiny_model, device="cpu")) == torch.device("cpu")
    assert model_device(torch.nn.Module()) == torch.device("cpu")  # no parameters


# --- device=cuda without CUDA: one line, exit 2, nothing written ---------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("command", "where"),
    [
        (["sft", "data={data}", "output_dir={out}"], "config: field 'device'"),
        (["reward", "data={prefs}", "output_dir={out}"], "config: field 'device'"),
        (["dpo", "data={prefs}", "output_dir={out}"], "config: field 'device'"),
        (["ppo", "data={prompts}", "output_dir={out}"], "config: field 'device'"),
        (["rl", "data={prompts}", "output_dir={out}"], "config: field 'device'"),
        (["rsft", "data={prompts}", "output_dir={out}"], "config: field 'device'"),
        (["online-dpo", "data={prompts}", "output_dir={out}"], "config: field 'device'"),
        (["dm", "data={prompts}", "output_dir={out}"], "config: field 'device'"),
        (["bon", "data={prompts}", "output_dir={out}"], "config: field 'device'"),
        (["sample", "data={prompts}", "output={out}/s.jsonl"], "config: field 'device'"),
    ],
    ids=lambda c: c[0] if isinstance(c, list) else "",
)
def test_device_cuda_is_refused_before_any_file(
    command, where, tiny_model, sft_data, separable_prefs, tmp_path, capsys, monkeypatch
):
    _fake_cuda(monkeypatch, 0)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    names = {"data": sft_data, "prefs": separable_prefs, "prompts": prompts, "out": out}
    args = [a.format(**names) for a in command] + [f"model={tiny_model}", "device=cuda"]
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].endswith(
        f"{where} is 'cuda' but CUDA is not available on this machine (use cpu or auto)"
    ), lines[0]
    assert not out.exists()
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "command",
    [["sft", "data={data}"], ["ppo", "data={prompts}"], ["online-dpo", "data={prompts}"]],
    ids=lambda c: c[0],
)
def test_device_cuda_n_under_torchrun_is_refused_before_any_file(
    command, tiny_model, sft_data, tmp_path, capsys, monkeypatch
):
    """As torchrun's rank 0 of 2 on a machine with 2 GPUs: ``device=cuda:1`` is refused
    with one line naming the key, before any file is written or the group is joined."""
    _fake_cuda(monkeypatch, 2)
    for name, value in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "out"
    args = [a.format(data=sft_data, prompts=prompts) for a in command]
    args += [f"model={tiny_model}", f"output_dir={out}", "distributed=ddp", "device=cuda:1"]
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.strip() == (
        "alignkit: config: field 'device' is 'cuda:1', which would put all 2 processes of "
        "this machine on GPU 1 (use cuda or auto: each rank takes cuda:LOCAL_RANK)"
    ), err
    assert not out.exists()
    assert _snapshot(tmp_path) == before


def test_eval_and_judge_refuse_device_cuda(tiny_model, tmp_path, capsys, monkeypatch):
    _fake_cuda(monkeypatch, 0)
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "turns": ["Hi?"]}) + "\n")
    out = str(tmp_path / "o.json")
    judge = ["--judge-model", tiny_model, "--device", "cuda"]
    commands = [
        ["eval", "--reference", tiny_model, "--policy", f"p={tiny_model}", "--output", out,
         "--device", "cuda"],
        ["judge", "grade", "--questions", str(questions), "--model", tiny_model, "--output", out,
         *judge],
        ["judge", "pairwise", "--questions", str(questions), "--model-a", tiny_model,
         "--model-b", tiny_model, "--output", out, *judge],
        ["judge", "label", "--project", "p", "--db", str(tmp_path / "db.sqlite"), *judge],
    ]  # fmt: skip
    for args in commands:
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, err)
        assert err.strip() == (
            "alignkit: command line: field '--device' is 'cuda' but CUDA is not available on "
            "this machine (use cpu or auto)"
        ), (args, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["q.jsonl"], args
