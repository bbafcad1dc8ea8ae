"""Tests for vlbridge.config: typed dataclass configs, YAML round trip, dotted overrides, `base:` inheritance."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from vlbridge.config import apply_overrides, from_dict, load_yaml, save_yaml, to_dict
from vlbridge.errors import ConfigError

# Example configs live at module level: field types are resolved with typing.get_type_hints.


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class DataConfig:
    root: Path = Path("data")
    image_size: int = 224
    datasets: list[str] = field(default_factory=lambda: ["coco"])
    shuffle: bool = True
    revision: str = "main"


@dataclass
class TrainConfig:
    run_name: str  # required: no default
    seed: int = 0
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    max_steps: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_from_dict_builds_nested_and_fills_defaults() -> None:
    cfg = from_dict(TrainConfig, {"run_name": "x", "optim": {"lr": 2}, "schedule": {"warmup_steps": 10}})
    assert cfg.optim == OptimConfig(lr=2.0)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.schedule == ScheduleConfig(warmup_steps=10)
    assert cfg.data == DataConfig()


@dataclass
class TwoStages:
    first: OptimConfig = field(default_factory=lambda: OptimConfig(lr=0.5, weight_decay=0.0))
    second: OptimConfig = field(default_factory=OptimConfig)
    widths: dict[str, int] = field(default_factory=lambda: {"hidden": 128, "ffn": 256})


def test_a_partial_section_keeps_the_rest_of_its_field_default(tmp_path: Path) -> None:
    cfg = from_dict(TwoStages, {"first": {"name": "sgd"}, "widths": {"ffn": 512}})
    assert cfg.first == OptimConfig(name="sgd", lr=0.5, weight_decay=0.0)  # the field's default, not the class's
    assert cfg.widths == {"hidden": 128, "ffn": 512}
    assert cfg.second == OptimConfig()
    save_yaml(TwoStages(), tmp_path / "two.yaml")
    assert load_yaml(TwoStages, tmp_path / "two.yaml", ["first.lr=0.1"]).first == OptimConfig(lr=0.1, weight_decay=0.0)
    assert from_dict(TwoStages, to_dict(cfg)) == cfg


def test_coercions() -> None:
    cfg = from_dict(
        TrainConfig,
        {
            "run_name": "x",
            "optim": {"lr": "1e-4", "betas": [0.8, 0.9]},  # a string float, as YAML 1.1 would give it
            "data": {"root": "/tmp/d", "shuffle": "false"},
            "max_steps": 1e5,  # an integral float is a fine int
        },
    )
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.root == Path("/tmp/d")
    assert cfg.data.shuffle is False
    assert cfg.max_steps == 100_000 and isinstance(cfg.max_steps, int)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = TrainConfig(
        run_name="stage1",
        optim=OptimConfig(name="sgd", lr=3e-5, betas=(0.5, 0.6)),
        schedule=ScheduleConfig(warmup_steps=100, min_lr=1e-6),
        data=DataConfig(root=Path("/d/coco"), datasets=["coco", "vg"], revision="1e5"),  # must stay a string
        max_steps=1000,
        extra={"note": "hi", "nested": {"k": [1, 2]}},
    )
    path = tmp_path / "sub" / "cfg.yaml"
    save_yaml(cfg, path)
    assert load_yaml(TrainConfig, path) == cfg
    assert yaml.safe_load(path.read_text())["optim"]["betas"] == [0.5, 0.6]  # plain YAML, tuples as lists
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp file behind
    assert to_dict(cfg)["data"]["root"] == "/d/coco"


def test_yaml_reads_exponent_floats(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "run_name: r\noptim:\n  lr: 1e-4\nextra:\n  eps: 1e-8\n")
    cfg = load_yaml(TrainConfig, path)
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.extra["eps"] == pytest.approx(1e-8)  # also inside free-form dicts, where no type says float


def test_overrides(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "run_name: r\noptim:\n  lr: 0.1\n")
    cfg = load_yaml(
        TrainConfig,
        path,
        [
            "optim.lr=3e-5",
            "optim.weight_decay=1e-4",
            "optim.name=sgd",
            "data.shuffle=false",
            "data.datasets=[vg, cc3m]",
            "schedule.warmup_steps=500",  # creates the optional section
            "max_steps=2000",
            "extra.anything.goes=1",
            "run_name=",  # empty value: the empty string
        ],
    )
    assert cfg.optim == OptimConfig(name="sgd", lr=3e-5, weight_decay=1e-4)
    assert cfg.data.shuffle is False
    assert cfg.data.datasets == ["vg", "cc3m"]
    assert cfg.schedule == ScheduleConfig(warmup_steps=500)
    assert cfg.max_steps == 2000
    assert cfg.extra == {"anything": {"goes": 1}}
    assert cfg.run_name == ""


def test_apply_overrides_copies() -> None:
    data = {"optim": {"lr": 0.1}, "schedule": None}
    out = apply_overrides(data, ["optim.lr=1e-4", "schedule.min_lr=0", "seed=3"])
    assert out == {"optim": {"lr": 1e-4}, "schedule": {"min_lr": 0}, "seed": 3}
    assert data == {"optim": {"lr": 0.1}, "schedule": None}
    with pytest.raises(ConfigError, match="optim.lr"):
        apply_overrides(data, ["optim.lr.x=1"])
    with pytest.raises(ConfigError, match="malformed override"):
        apply_overrides(data, ["optim.lr"])


def test_unknown_key_in_yaml(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "run_name: r\noptim:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_yaml(TrainConfig, path)
    msg = str(e.value)
    assert "'optim.lrr'" in msg and "did you mean 'lr'" in msg and "weight_decay" in msg and str(path) in msg


def test_unknown_override_key(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "run_name: r\n")
    with pytest.raises(ConfigError, match=r"unknown override key 'data\.image_szie'; did you mean 'image_size'"):
        load_yaml(TrainConfig, path, ["data.image_szie=384"])
    with pytest.raises(ConfigError, match=r"'optim\.lr' is a float"):
        load_yaml(TrainConfig, path, ["optim.lr.x=1"])


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"optim": {"lr": "fast"}}, r"'optim\.lr': expected float, got 'fast'"),
        ({"seed": 1.5}, r"'seed': expected int, got 1\.5"),
        ({"seed": True}, r"'seed': expected int, got True"),
        ({"data": {"shuffle": 1}}, r"'data\.shuffle': expected bool"),
        ({"data": {"revision": 123}}, r"'data\.revision': expected str, got 123 \(int\) \(quote it in YAML\)"),
        ({"data": {"datasets": ["coco", 3]}}, r"'data\.datasets\[1\]': expected str"),
        ({"optim": {"betas": [0.9]}}, r"'optim\.betas': expected tuple\[float, float\]"),
        ({"schedule": 5}, r"'schedule': expected ScheduleConfig"),
        ({"max_steps": "many"}, r"'max_steps': expected int \| None, got 'many'"),
        ({"optim": None}, r"'optim': expected OptimConfig, got None"),
    ],
)
def test_wrong_types(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_dict(TrainConfig, {"run_name": "r", **data})


def test_missing_required_key() -> None:
    with pytest.raises(ConfigError, match="missing required config key 'run_name'"):
        from_dict(TrainConfig, {"seed": 1})


def test_literal_violation(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", "run_name: r\n")
    with pytest.raises(ConfigError, match=r"'optim\.name': expected one of 'adamw', 'sgd', got 'adam'.*did you mean"):
        load_yaml(TrainConfig, path, ["optim.name=adam"])


def test_base_inheritance(tmp_path: Path) -> None:
    (tmp_path / "common").mkdir()
    write(
        tmp_path / "common" / "base.yaml",
        "run_name: base\nseed: 1\noptim:\n  lr: 1e-3\n  weight_decay: 0.1\ndata:\n  datasets: [coco, vg]\n",
    )
    write(tmp_path / "mid.yaml", "base: common/base.yaml\noptim:\n  name: sgd\n")
    child = write(
        tmp_path / "child.yaml", "base: mid.yaml\nrun_name: child\noptim:\n  lr: 1e-4\ndata:\n  datasets: [cc3m]\n"
    )

    cfg = load_yaml(TrainConfig, child)
    assert cfg.run_name == "child"
    assert cfg.seed == 1  # from the base
    assert cfg.optim == OptimConfig(name="sgd", lr=1e-4, weight_decay=0.1)  # deep merge across three files
    assert cfg.data.datasets == ["cc3m"]  # lists are replaced, not merged

    cfg = load_yaml(TrainConfig, child, ["optim.lr=5e-5", "seed=7"])  # base < file < overrides
    assert cfg.optim.lr == pytest.approx(5e-5) and cfg.seed == 7 and cfg.optim.weight_decay == 0.1


def test_base_errors(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_yaml(TrainConfig, a)
    c = write(tmp_path / "c.yaml", "base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found.*nowhere.yaml"):
        load_yaml(TrainConfig, c)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(TrainConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_yaml(TrainConfig, write(tmp_path / "bad.yaml", "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_yaml(TrainConfig, write(tmp_path / "list.yaml", "- 1\n"))
