import pytest

from tinygpt import config
from tinygpt.errors import UsageError


def test_layers_apply_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_layer: 6\ntrain:\n  lr: 0.002\n")
    cfg = config.resolve("cpu-tiny", f, {"train.lr": "3e-4", "model.bias": "false"})
    assert cfg.model.n_embd == 128 and cfg.model.block_size == 64  # preset
    assert cfg.model.n_layer == 6  # file over preset
    assert cfg.train.lr == 3e-4 and cfg.model.bias is False  # flags over file


def test_cpu_tiny_is_the_classic_recipe():
    cfg = config.resolve("cpu-tiny")
    m, t = cfg.model, cfg.train
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout) == (4, 4, 128, 64, 0.0)
    assert (m.pos, m.norm, m.norm_placement, m.mlp, m.tie_weights, m.bias) == ("learned", "layernorm", "pre", "gelu", True, True)
    assert (t.batch_size, t.lr, t.min_lr, t.max_iters, t.warmup_iters) == (12, 1e-3, 1e-4, 2000, 100)
    assert (t.beta1, t.beta2, t.weight_decay, t.grad_clip) == (0.9, 0.99, 0.1, 1.0)


@pytest.mark.parametrize("flags, message", [
    ({"model.n_layers": 3}, "unknown config key 'model.n_layers'"),
    ({"optim.lr": 1}, "unknown config section 'optim'"),
    ({"model.n_layer": "four"}, "model.n_layer='four' is not a valid int"),
    ({"model.n_layer": "2.5"}, "is not a valid int"),
    ({"model.n_layer": 0}, "model.n_layer must be positive"),
    ({"train.batch_size": -1}, "train.batch_size must be positive"),
    ({"model.n_embd": 100, "model.n_head": 3}, "must be divisible by model.n_head"),
    ({"model.pos": "alibi"}, "is not one of learned, sinusoidal, rope"),
    ({"model.bias": "maybe"}, "is not a valid bool"),
    ({"train.lr": -1}, "train.lr must not be negative"),
    ({"data.val_fraction": 1.5}, "data.val_fraction must be between 0 and 1"),
    ({"sample.top_p": 0}, "sample.top_p must be in (0, 1]"),
])
def test_bad_values_are_usage_errors(flags, message):
    with pytest.raises(UsageError) as e:
        config.resolve(flags=flags)
    assert message in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: [unclosed\n")
    with pytest.raises(UsageError, match="bad.yaml is not valid YAML"):
        config.resolve(config_file=f)
    f.write_text("model:\n  depth: 3\n")
    with pytest.raises(UsageError, match="unknown config key 'model.depth'"):
        config.resolve(config_file=f)
    with pytest.raises(UsageError, match="unknown preset"):
        config.resolve("gpt-17")


def test_optional_fields_accept_empty_and_saved_config_round_trips(tmp_path):
    cfg = config.resolve(flags={"sample.top_k": "none", "model.vocab_size": 65})
    assert cfg.sample.top_k is None
    config.save(cfg, tmp_path / "c.yaml")
    assert config.from_dict(config.load_yaml(tmp_path / "c.yaml")) == cfg


def test_every_field_has_help_text():
    missing = [key for key, _, _, doc in config.iter_fields() if not doc]
    assert not missing
