import pytest
from transformers import AutoConfig, LlamaConfig

import modeling_scmmgpt  # noqa: F401  registers the Auto classes
from modeling_scmmgpt import ScMMGPTCellConfig, ScMMGPTConfig


def _without_path(config):
    d = config.to_dict()
    d.pop("_name_or_path", None)
    return d


@pytest.mark.parametrize("config", [ScMMGPTCellConfig.tiny(), ScMMGPTConfig.tiny(), ScMMGPTConfig.paper()])
def test_config_round_trips_through_autoconfig(config, tmp_path):
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is type(config)
    assert _without_path(loaded) == _without_path(config)


def test_composed_config_resolves_sub_configs():
    config = ScMMGPTConfig.tiny(cross_attention_frequency=1)
    assert isinstance(config.cell_config, ScMMGPTCellConfig)
    assert isinstance(config.text_config, LlamaConfig)
    assert config.qformer_config.model_type == "bert"
    # the Q-Former cross-attends to gene states: its key/value width is the cell encoder's
    assert config.qformer_config.encoder_hidden_size == config.cell_config.hidden_size
    gpt2 = ScMMGPTConfig.tiny(text_config={"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4})
    assert gpt2.text_config.model_type == "gpt2"


def test_presets_have_published_shapes():
    human = ScMMGPTCellConfig.scgpt_human()
    assert (human.d_model, human.num_hidden_layers, human.num_attention_heads, human.n_bins) == (512, 12, 8, 51)
    assert human.vocab_size > 60000 and human.input_value_mode == "continuous"
    paper = ScMMGPTConfig.paper()
    assert paper.num_query_tokens == 32 and paper.cross_attention_frequency == 2
    assert paper.cell_config.max_genes == 2048 and paper.text_config.hidden_size == 4096


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="divisible"):
        ScMMGPTCellConfig.tiny(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="input_value_mode"):
        ScMMGPTCellConfig.tiny(input_value_mode="ranked")
    with pytest.raises(ValueError, match="cross_attention_frequency"):
        ScMMGPTConfig.tiny(cross_attention_frequency=0)


def test_training_settings_are_declared_fields_and_old_folders_load_their_defaults(tmp_path):
    import json

    declared = {"mask_ratio": 0.4, "mask_value": -1.0, "classifier_pooling": "cls", "classifier_dropout": 0.1}
    config = ScMMGPTCellConfig.tiny()
    assert {name: getattr(config, name) for name in declared} == declared
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for name in declared:  # a folder written before the fields were declared
        saved.pop(name, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert {name: getattr(reloaded, name) for name in declared} == declared


def test_training_argument_defaults_equal_the_config_defaults():
    """A config section that leaves a model field out builds what `ScMMGPTConfig()` would, field by field."""
    from dataclasses import fields

    from scmmgpt_train.config import ClassifierArguments, ModelArguments, Stage0CellArguments, Stage1Arguments
    from scmmgpt_train.stage2 import Stage2Arguments

    model_args, config, cell = ModelArguments(), ScMMGPTConfig(), ScMMGPTCellConfig()
    # `cell_config` / `qformer_config` are overrides of a preset (None: the preset as is), checked below
    shared = [f.name for f in fields(ModelArguments) if f.name in config.to_dict() and not f.name.endswith("_config")]
    assert {"num_query_tokens", "cross_attention_frequency", "embed_dim", "projector_hidden_size",
            "expression_decoder_hidden_size", "max_text_length"} <= set(shared)
    for name in shared:
        assert getattr(model_args, name) == getattr(config, name), name
    preset = getattr(ScMMGPTCellConfig, model_args.cell_preset)()
    assert preset.to_dict() == cell.to_dict()
    assert Stage0CellArguments().mask_ratio == cell.mask_ratio
    assert ClassifierArguments().dropout == cell.classifier_dropout
    assert Stage1Arguments().captioning_max_cells == config.captioning_max_cells
    stage2 = Stage2Arguments()
    assert (stage2.cell_embed_loss_weight, stage2.expression_loss_weight) == (
        config.cell_embed_loss_weight, config.expression_loss_weight)
