"""Config loading: YAML + key=value precedence, type conversion, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from alignkit.config import doc, load_config, yaml_scalar
from alignkit.errors import InputError
from alignkit.models import LoraSettings


@dataclass
class Demo:
    lr: float = doc("learning rate", 1e-5)
    steps: int = doc("steps", 10)
    name: str = doc("name", "a")
    flag: bool = doc("flag", False)
    lora: LoraSettings = field(default_factory=LoraSettings)


def test_precedence_yaml_then_overrides(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("lr: 0.001\nsteps: 5\nlora:\n  r: 8\n")
    config = load_config(Demo, None, config_file, ["steps=7", "lora.alpha=32", "flag=true"])
    assert config.lr == pytest.approx(0.001)
    assert config.steps == 7
    assert config.lora.r == 8 and config.lora.alpha == 32
    assert config.flag is True


def test_scientific_notation_is_a_number():
    assert yaml_scalar("1e-5") == pytest.approx(1e-5)
    assert load_config(Demo, None, None, ["lr=3e-4"]).lr == pytest.approx(3e-4)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lr=fast", "command line: field 'lr' expects a number, got 'fast'"),
        ("steps=2.5", "command line: field 'steps' expects an integer, got 2.5"),
        ("speed=3", "command line: field 'speed' unknown key"),
        ("lora.rank=3", "command line: field 'lora.rank' unknown key"),
        ("flag=maybe", "command line: field 'flag' expects true or false, got 'maybe'"),
        ("steps", "command line: expected key=value, got 'steps'"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(InputError) as err:
        load_config(Demo, None, None, [override])
    assert str(err.value).startswith(message)


def test_bad_yaml_names_file_and_line(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("lr: 1\nsteps: [1, 2\n")
    with pytest.raises(InputError) as err:
        load_config(Demo, None, config_file, [])
    assert str(err.value).startswith(f"{config_file}:3: invalid YAML")


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("learning_rate: 1\n")
    with pytest.raises(InputError) as err:
        load_config(Demo, None, config_file, [])
    assert str(err.value).startswith(f"{config_file}: field 'learning_rate' unknown key")
