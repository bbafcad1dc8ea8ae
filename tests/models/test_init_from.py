"""`model.init_from`: the saved architecture is inherited; weights that cannot fit are a named error."""

from __future__ import annotations

import pytest
import torch

from training_data import stage1_config, write_vision_model
from vlbridge.errors import CheckpointError, ConfigError
from vlbridge.models.builder import ModelConfig, build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_from")
    write_vision_model(root, width=32)
    model = build_model(stage1_config(root).model)
    with torch.no_grad():
        model.qformer.query_tokens.normal_(0, 1)  # something a fresh build would not reproduce
    model.save(root / "s1", format="native")
    return root, model


def test_stage2_style_config_inherits_the_architecture(saved):
    root, source = saved
    model = build_model(ModelConfig(init_from=str(root / "s1"), embed_dim=None))
    assert model.qformer.config == source.qformer.config  # sizes, 4 queries, cross-attention every layer
    assert model.config.vision_layer == -1 and model.bridge.config.embed_dim is None
    torch.testing.assert_close(model.qformer.query_tokens, source.qformer.query_tokens)
    for name, value in source.qformer.state_dict().items():
        torch.testing.assert_close(model.qformer.state_dict()[name], value, msg=name)
    for name, value in source.vision.state_dict().items():  # the frozen encoder stored in the checkpoint
        torch.testing.assert_close(model.vision.state_dict()[name], value, msg=name)
    assert len(model.qformer_tokenizer) == len(source.qformer_tokenizer)
    assert model.image_processor.config.image_size == source.image_processor.config.image_size


def test_a_conflicting_setting_is_named(saved):
    root, _ = saved
    with pytest.raises(ConfigError, match=r"num_query_tokens=8 \(saved with 4\)"):
        build_model(ModelConfig(init_from=str(root / "s1"), num_query_tokens=8))
    with pytest.raises(ConfigError, match=r"qformer.hidden_size=64 \(saved with 32\)"):
        build_model(ModelConfig(init_from=str(root / "s1"), qformer={"hidden_size": 64}))


def test_weights_that_do_not_fit_are_an_error_naming_them(saved, tmp_path):
    root, _ = saved
    other = write_vision_model(tmp_path, width=48)  # another encoder width: the cross-attention K/V cannot fit
    with pytest.raises(CheckpointError, match=r"crossattention.*\(32, 32\).*vs.*\(32, 48\)"):
        build_model(ModelConfig(vision=str(other), vision_layer=-1, init_from=str(root / "s1"), embed_dim=16))
