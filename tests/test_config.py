"""Configuration: defaults, YAML + --set overrides, type checks, validation messages, round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from essa_hpc.config import Config, ConfigError, all_keys, describe, from_dict, load_config, parse_override

from .conftest import REPO, cli_env


def test_defaults_validate() -> None:
    cfg = load_config()
    assert cfg.search.popsize >= 2
    assert cfg.model.path.startswith("embedded:")
    assert cfg.task.name == "arithmetic"


def test_design_keys_exist() -> None:
    keys = set(all_keys())
    design = [
        "run.name",
        "run.dir",
        "run.seed",
        "run.generations",
        "run.time_budget_s",
        "model.path",
        "model.dtype",
        "model.quantization",
        "model.gguf_file",
        "lora.adapter",
        "lora.rank",
        "lora.alpha_fraction",
        "lora.targets",
        "lora.init",
        "search.optimizer",
        "search.popsize",
        "search.sigma0",
        "search.diagonal",
        "search.digest_every",
        "backend.name",
        "backend.max_new_tokens",
        "backend.temperature",
        "backend.top_p",
        "backend.tensor_parallel_size",
        "task.name",
        "task.path",
        "task.batch_size",
        "task.system_prompt",
        "eval.every",
        "eval.k",
        "eval.split",
        "eval.size",
        "log.checkpoint_every",
    ]
    assert not set(design) - keys


def test_overrides_are_typed() -> None:
    cfg = load_config(
        overrides=[
            "search.popsize=48",
            "search.sigma0=1",
            "lora.targets=[q_proj, v_proj]",
            "search.diagonal=false",
            "run.target_metric=accuracy",
            "run.target_value=0.5",
        ]
    )
    assert cfg.search.popsize == 48 and isinstance(cfg.search.sigma0, float) and cfg.search.sigma0 == 1.0
    assert cfg.lora.targets == ["q_proj", "v_proj"]
    assert cfg.search.diagonal is False


@pytest.mark.parametrize(
    "override,needle",
    [
        ("search.popsize=1", "search.popsize"),
        ("search.popsize=abc", "search.popsize: expected an integer"),
        ("lora.alpha_fraction=0", "lora.alpha_fraction"),
        ("lora.alpha_fraction=1.5", "lora.alpha_fraction"),
        ("lora.alpha_fraction=0.1", "floor"),  # 0.1 * 8 rounds to zero searched values
        ("lora.rank=0", "lora.rank"),
        ("log.checkpoint_every=0", "log.checkpoint_every"),
        ("eval.every=-1", "eval.every"),
        ("search.digest_every=0", "search.digest_every"),
        ("search.cmean=0", "search.cmean"),
        ("search.cmean=1.5", "search.cmean"),
        ("search.mirrors=-1", "search.mirrors"),
        ("search.mirrors=5", "search.mirrors"),  # λ 8: at most 4 pairs
        ("search.step_size=median", "search.step_size"),
        ("search.active=sometimes", "expected true or false"),
        ("backend.name=vlm", "did you mean vllm"),
        ("backend.max_loras=-1", "backend.max_loras"),
        ("backend.max_model_len=-5", "backend.max_model_len"),
        ("task.name=gsm8", "did you mean gsm8k"),
        ("lora.adapter=/nonexistent/adapter", "no such file"),
        ("task.path=/nonexistent.jsonl", "task.path"),
        ("search.diagonal=maybe", "expected true or false"),
        ("run.target_metric=accuracy", "go together"),
        ("eval.k=4", "eval.temperature"),
        ("search", "expected key=value"),
    ],
)
def test_bad_values_name_the_field(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        load_config(overrides=[override])
    assert needle in str(e.value)


def test_mirrors_belong_to_cma() -> None:
    es = ["search.optimizer=es", "search.learning_rate=1.0"]
    with pytest.raises(ConfigError, match=r"search\.mirrors.*search\.antithetic.*got 2"):
        load_config(overrides=[*es, "search.mirrors=2"])
    assert load_config(overrides=["search.mirrors=4"]).search.mirrors == 4


def test_active_and_step_size_belong_to_cma() -> None:
    """search.active / search.step_size: CMA-ES options, refused by name with es; TPA needs λ >= 4 and
    keeps its two line samples out of the mirrors; the optimizer and the config agree on the rule names."""
    from essa_hpc.config import STEP_SIZES
    from essa_hpc.search import cma_es

    assert STEP_SIZES == cma_es.STEP_SIZES
    es = ["search.optimizer=es", "search.learning_rate=1.0"]
    for override in ("search.active=false", "search.step_size=csa"):
        with pytest.raises(ConfigError, match=rf"{override.split('=')[0]}.*CMA-ES option.*search\.optimizer=es"):
            load_config(overrides=[*es, override])
    with pytest.raises(ConfigError, match=r"search\.popsize.*4 with search\.step_size=tpa.*got 3"):
        load_config(overrides=["search.step_size=tpa", "search.popsize=3"])
    with pytest.raises(ConfigError, match=r"search\.mirrors.*0 to 3.*TPA.*got 4"):
        load_config(overrides=["search.step_size=tpa", "search.mirrors=4"])
    cfg = load_config(overrides=["search.step_size=tpa", "search.active=false", "search.mirrors=3"])
    assert (cfg.search.step_size, cfg.search.active, cfg.search.mirrors) == ("tpa", False, 3)


def test_cmean_belongs_to_cma() -> None:
    """es has no mean learning rate: its default value is accepted (a config need not spell it), any other
    value with search.optimizer=es is refused by name."""
    es = ["search.optimizer=es", "search.learning_rate=1.0"]
    assert load_config(overrides=es).search.optimizer == "es"
    with pytest.raises(ConfigError, match=r"search\.cmean.*search\.learning_rate.*got 1\.0"):
        load_config(overrides=[*es, "search.cmean=1.0"])


def test_unknown_key_suggests_close_match() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(overrides=["search.popsiz=8"])
    assert "search.popsize" in str(e.value) and "search.popsiz" in str(e.value)
    with pytest.raises(ConfigError) as e:
        from_dict({"serch": {"popsize": 8}})
    assert "search" in str(e.value)


def test_yaml_file_and_round_trip(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("run: {name: t1, generations: 3}\nsearch:\n  popsize: 12\n")
    cfg = load_config(p, ["search.popsize=16"])  # --set wins over the file
    assert cfg.run.name == "t1" and cfg.search.popsize == 16
    again = tmp_path / "again.yaml"
    again.write_text(cfg.to_yaml())
    assert load_config(again) == cfg
    assert from_dict(yaml.safe_load(cfg.to_yaml())).digest() == cfg.digest()


def test_bad_yaml_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_digest_ignores_stop_criteria_only() -> None:
    a = Config()
    assert a.replace(**{"run.generations": 99}).digest() == a.digest()
    assert a.replace(**{"search.popsize": 9}).digest() != a.digest()


def test_parse_override_values() -> None:
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])


def test_describe_lists_every_key() -> None:
    text = describe()
    assert all(k in text for k in all_keys())


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "essa_hpc.run", *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=120
    )


def test_cli_bad_popsize_exits_2() -> None:
    r = _cli("--set", "search.popsize=1")
    assert r.returncode == 2, r.stderr
    assert "search.popsize" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_typo_suggests() -> None:
    r = _cli("--set", "search.popsiz=8")
    assert r.returncode == 2
    assert "did you mean search.popsize" in r.stderr


def test_head_to_head_variants_validate_and_keep_their_measured_mean_step() -> None:
    """bench/bench_vs_grpo.py's named variants are what its result files cite: each must still load,
    and those measured while CMA's mean step defaulted to 1 must still run at 1 after the default moved."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_vs_grpo", REPO / "bench" / "bench_vs_grpo.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, sets in mod.ESSA_VARIANTS.items():
        cfg = load_config(overrides=list(sets), check_paths=False)
        if name != "default":  # λ and prompts per candidate moved on 2026-12-07: every measured variant names its own
            keys = {o.split("=", 1)[0] for o in sets}
            assert {"search.popsize", "task.batch_size"} <= keys, name
            assert cfg.search.optimizer != "cma" or "search.diagonal" in keys, name
        if cfg.search.optimizer == "cma":
            measured_at_one = name in {"cmean1", "crn", "crn_b32", "full_b48", "alpha1", "sigma03", "crn_s03", "ranks", "full_l8_b64"}
            assert cfg.search.cmean == (1.0 if measured_at_one else 0.25), name
    # "default" is today's defaults, and today's defaults are the variant they were chosen from
    chosen = load_config(overrides=list(mod.ESSA_VARIANTS["full_l8_b64_c025"]), check_paths=False)
    assert load_config(overrides=[], check_paths=False).digest() == chosen.digest()
