"""Wav2Vec2BertConfig: reads transformers' config.json, keeps unknown keys, rejects bad values by name."""

import json

import pytest

from w2vbert_fast import Wav2Vec2BertConfig


def test_defaults_are_the_w2v_bert_2_architecture():
    config = Wav2Vec2BertConfig()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        1024, 24, 16, 4096)
    assert (config.position_embeddings_type, config.left_max_position_embeddings,
            config.right_max_position_embeddings, config.conv_depthwise_kernel_size) == ("relative_key", 64, 8, 31)
    assert config.output_hidden_size == 1024


def test_reads_a_transformers_config_json_and_keeps_unknown_keys(tmp_path):
    transformers = pytest.importorskip("transformers")  # the writer; the reader never needs it
    transformers.Wav2Vec2BertConfig(hidden_size=48, num_attention_heads=3, vocab_size=7,
                                    architectures=["Wav2Vec2BertForCTC"]).save_pretrained(tmp_path)
    config = Wav2Vec2BertConfig.from_pretrained(tmp_path)
    assert config.hidden_size == 48 and config.vocab_size == 7
    assert config.architectures == ["Wav2Vec2BertForCTC"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert config.to_dict()["transformers_version"] == saved["transformers_version"]


def test_round_trips_through_json(tmp_path):
    config = Wav2Vec2BertConfig(hidden_size=48, num_attention_heads=3, my_custom_field={"a": 1})
    config.save_pretrained(tmp_path)
    assert Wav2Vec2BertConfig.from_pretrained(tmp_path) == config


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(conv_depthwise_kernel_size=30), "conv_depthwise_kernel_size must be odd"),
        (dict(position_embeddings_type="alibi"), "position_embeddings_type"),
        (dict(hidden_size=50, num_attention_heads=3), "divisible"),
        (dict(hidden_size=0), "hidden_size must be a positive integer"),
        (dict(num_hidden_layers=2.5), "num_hidden_layers must be a positive integer"),
        (dict(left_max_position_embeddings=-1), "left_max_position_embeddings"),
        (dict(hidden_act="swoosh"), "hidden_act"),
        (dict(adapter_act="nope"), "adapter_act"),
        (dict(layer_norm_eps=0), "layer_norm_eps"),
        (dict(hidden_dropout=1.5), "hidden_dropout"),
        (dict(use_intermediate_ffn_before_adapter=True), "add_adapter"),
        (dict(add_adapter=True, output_hidden_size=50, num_attention_heads=16), "output_hidden_size"),
        (dict(position_embeddings_type="rotary", hidden_size=45, num_attention_heads=3), "even head size"),
        (dict(vocab_size=0), "vocab_size"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(v),
)
def test_bad_values_raise_value_errors_naming_the_field(values, message):
    with pytest.raises(ValueError, match=message):
        Wav2Vec2BertConfig(**values)


def test_missing_config_json_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Wav2Vec2BertConfig.from_pretrained(tmp_path)


def test_invalid_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Wav2Vec2BertConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "must hold a JSON object of config fields, got list"),
], ids=["not-utf8", "array"])
def test_unreadable_config_names_the_file(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        Wav2Vec2BertConfig.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(error.value)
