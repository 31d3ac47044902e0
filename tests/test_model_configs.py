"""What the model families share: the kind a command asks (`models/kind.py`), one naming for
both configs, presets by name and saved configs read strictly (`models/configs.py`)."""

from __future__ import annotations

import pytest

from llmscratch.errors import UserError
from llmscratch.models.attention import CausalSelfAttention, FusedSelfAttention
from llmscratch.models.bert import Bert, BertConfig
from llmscratch.models.gpt import GPT, GPTConfig
from llmscratch.models.kind import DECODER, ENCODER, USES


def test_each_family_names_its_kind_and_the_kinds_cover_every_use():
    assert GPT.kind is DECODER and Bert.kind is ENCODER
    assert all(DECODER.can(u) or ENCODER.can(u) for u in USES)
    assert DECODER.can("generate") and not ENCODER.can("generate")
    assert ENCODER.can("classify-cls") and DECODER.can("classify-last-token")
    with pytest.raises(ValueError, match="unknown use 'sing'"):
        DECODER.can("sing")


def test_a_command_given_the_wrong_kind_says_so_in_one_line():
    with pytest.raises(UserError) as e:
        ENCODER.require("generate", "generate")
    assert str(e.value) == ("generate needs a decoder (GPT); this model is an encoder (BERT), which fills in "
                            "[MASK]s rather than continuing text: use `llmscratch fill-mask` or `llmscratch embed`")
    with pytest.raises(UserError) as e:
        DECODER.require("embed", "embed")
    assert str(e.value) == ("embed needs an encoder (a BERT-style model: `llmscratch pretrain --model bert-tiny`, "
                            "or a Hugging Face BERT folder); this model is a decoder (GPT)")
    DECODER.require("score", "eval lm")  # no error


def test_both_configs_use_the_same_names():
    bert, gpt = BertConfig.from_name("bert-tiny"), GPTConfig.from_name("tiny")
    assert bert.intermediate_size is None and gpt.intermediate_size is None
    assert (bert.mlp_width, gpt.mlp_width) == (4 * bert.n_embd, 4 * gpt.n_embd)
    assert bert.norm_eps == 1e-12 and bert.ffn_dim == bert.mlp_width  # the old name still reads


def test_an_old_encoder_run_config_still_loads():
    saved = BertConfig.from_name("bert-tiny", vocab_size=99).to_dict()
    old = {**{k: v for k, v in saved.items() if k != "norm_eps"}, "layer_norm_eps": 1e-12, "intermediate_size": 0}
    assert BertConfig.from_dict(old) == BertConfig.from_dict(saved) == BertConfig.from_name("bert-tiny", vocab_size=99)


@pytest.mark.parametrize("cls", [GPTConfig, BertConfig])
def test_a_saved_config_with_an_unknown_field_names_it(cls):
    with pytest.raises(UserError, match=r"unknown \w+Config field\(s\) \['colour'\] in the saved model config"):
        cls.from_dict({**cls().to_dict(), "colour": "blue"})


def test_presets_and_overrides_fail_alike():
    with pytest.raises(UserError, match="unknown model preset 'huge'"):
        GPTConfig.from_name("huge")
    with pytest.raises(UserError, match="unknown encoder preset 'huge'"):
        BertConfig.from_name("huge")
    with pytest.raises(UserError, match=r"unknown BertConfig field\(s\) \['colour'\]"):
        BertConfig.from_name("bert-tiny", colour="blue")


def test_the_attention_layer_is_named_for_what_it_is():
    assert CausalSelfAttention is FusedSelfAttention
    assert type(Bert(BertConfig.from_name("bert-tiny", vocab_size=50)).h[0].attn) is FusedSelfAttention
    assert not Bert(BertConfig.from_name("bert-tiny", vocab_size=50)).h[0].attn.causal
