"""Configs: defaults and config.json compatibility with transformers 5.23.0, v4/v5 spellings, hub extras,
validation, and the named-config registry."""
import copy
import dataclasses
import json

import pytest
import torch
import transformers

import moelm
from moelm import AutoConfig, AutoModelForCausalLM, Ernie4_5_MoeConfig, Ernie4_5Config, PhimoeConfig
from moelm.config import NAMED_CONFIGS, named_config

FAMILIES = {
    "ernie4_5": (Ernie4_5Config, transformers.Ernie4_5Config),
    "ernie4_5_moe": (Ernie4_5_MoeConfig, transformers.Ernie4_5_MoeConfig),
    "phimoe": (PhimoeConfig, transformers.PhimoeConfig),
}
MOELM_ONLY = {"architectures", "dtype", "id2label", "problem_type", "attn_implementation", "extra"}
TINY = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            intermediate_size=96)
TINY_KW = {"ernie4_5": dict(TINY, head_dim=16),
           "ernie4_5_moe": dict(TINY, moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1),
           "phimoe": dict(TINY, num_local_experts=4)}


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))


def field_names(config):
    return [f.name for f in dataclasses.fields(config) if f.name not in MOELM_ONLY]


def assert_same_values(ours, theirs):
    """Every moelm field equals the transformers attribute of the same name."""
    for name in field_names(ours):
        if name == "head_dim" and not hasattr(theirs, "head_dim"):  # transformers' ERNIE MoE derives it
            assert ours.head_dim == theirs.hidden_size // theirs.num_attention_heads
            continue
        expected = getattr(theirs, name)
        if name == "rope_parameters":
            expected = {k: v for k, v in expected.items() if k != "type"}  # transformers keeps a v4 "type" key
        assert getattr(ours, name) == expected, name


# ---------------------------------------------------------------- defaults


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_equal_transformers(family):
    ours_cls, theirs_cls = FAMILIES[family]
    ours, theirs = ours_cls(), theirs_cls()
    assert ours.model_type == theirs.model_type == family
    assert_same_values(ours, theirs)


def test_default_values():
    e = Ernie4_5Config()
    assert (e.vocab_size, e.hidden_size, e.head_dim, e.num_hidden_layers) == (103424, 1024, 128, 18)
    assert (e.num_attention_heads, e.num_key_value_heads, e.intermediate_size) == (16, 2, 3072)
    assert e.tie_word_embeddings is True and e.use_bias is False
    assert e.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}

    m = Ernie4_5_MoeConfig()
    assert (m.vocab_size, m.hidden_size, m.num_hidden_layers, m.head_dim) == (103424, 2560, 28, 128)
    assert (m.moe_k, m.moe_num_experts, m.moe_num_shared_experts, m.moe_intermediate_size) == (6, 64, 2, 1536)
    assert (m.moe_layer_start_index, m.moe_layer_end_index, m.moe_layer_interval) == (1, 27, 1)
    assert m.moe_norm_min == 1e-12 and m.router_aux_loss_coef == 0.001
    assert m.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert Ernie4_5_MoeConfig(num_hidden_layers=5).moe_layer_end_index == 4  # -1 -> last layer

    p = PhimoeConfig()
    assert (p.vocab_size, p.hidden_size, p.intermediate_size, p.num_hidden_layers) == (32064, 4096, 6400, 32)
    assert (p.num_attention_heads, p.num_key_value_heads, p.num_local_experts, p.num_experts_per_tok) == (32, 8, 16, 2)
    assert (p.router_jitter_noise, p.input_jitter_noise) == (0.01, 0.0)
    assert p.attention_bias is False and p.lm_head_bias is False and p.tie_word_embeddings is False
    assert p.sliding_window is None
    assert p.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}


# ---------------------------------------------------------------- reading and writing


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_dir_and_file(tmp_path, family):
    ours_cls = FAMILIES[family][0]
    config = ours_cls(**TINY_KW[family], moe_gate="top2")
    config.save_pretrained(tmp_path)
    for path in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        for loader in (ours_cls.from_pretrained, AutoConfig.from_pretrained):
            got = loader(path)
            assert type(got) is ours_cls
            assert got == config


@pytest.mark.parametrize("family", FAMILIES)
def test_dict_round_trip(family):
    ours_cls = FAMILIES[family][0]
    config = ours_cls(**TINY_KW[family], dtype="bfloat16", moe_capacity=[4, 4], auto_map={"AutoConfig": "x.Y"})
    d = config.to_dict()
    assert d["model_type"] == family and d["dtype"] == d["torch_dtype"] == "bfloat16"
    assert d["moe_capacity"] == [4, 4] and d["auto_map"] == {"AutoConfig": "x.Y"}
    again = ours_cls.from_dict(d)
    assert again == config and again.to_dict() == d
    assert AutoConfig.from_dict(d) == config
    assert json.loads(config.to_json_string()) == json.loads(json.dumps(d))


LONGROPE = dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + i / 10 for i in range(8)],
                long_factor=[2.0 + i for i in range(8)], short_mscale=1.1, long_mscale=1.2,
                original_max_position_embeddings=256)
EXTRA_REF_KW = {"ernie4_5": dict(rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.0),
                                 use_bias=True, tie_word_embeddings=False, dtype="bfloat16"),
                "ernie4_5_moe": dict(moe_layer_start_index=0, moe_layer_interval=2, moe_norm_min=1e-6),
                "phimoe": dict(rope_parameters=LONGROPE, sliding_window=64, attention_bias=True, lm_head_bias=True,
                               input_jitter_noise=0.01, router_jitter_noise=0.05)}


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_reads_what_we_write(tmp_path, family):
    ours_cls, theirs_cls = FAMILIES[family]
    ours = ours_cls(**TINY_KW[family], **EXTRA_REF_KW[family])
    ours.save_pretrained(tmp_path)
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs) is theirs_cls
    assert_same_values(ours, theirs)
    # and what transformers builds from the same arguments is the same config
    direct = theirs_cls(**TINY_KW[family], **EXTRA_REF_KW[family]).to_dict()
    reread = theirs.to_dict()
    for key in direct.keys() - {"_name_or_path", "architectures"}:
        assert reread[key] == direct[key], key
    extra = reread.keys() - direct.keys()
    assert extra <= {"head_dim"}, extra
    assert reread["architectures"] is None


@pytest.mark.parametrize("family", FAMILIES)
def test_we_read_what_transformers_writes(tmp_path, family):
    ours_cls, theirs_cls = FAMILIES[family]
    theirs = theirs_cls(**TINY_KW[family], **EXTRA_REF_KW[family])
    theirs.save_pretrained(tmp_path)
    ours = AutoConfig.from_pretrained(tmp_path)
    assert type(ours) is ours_cls
    assert_same_values(ours, theirs)
    direct = ours_cls(**TINY_KW[family], **EXTRA_REF_KW[family])
    for f in dataclasses.fields(ours):
        if f.name not in ("extra", "architectures"):
            assert getattr(ours, f.name) == getattr(direct, f.name), f.name
    # transformers' PhiMoE also writes original_max_position_embeddings at the top level: kept as an extra
    assert ours.extra == ({"original_max_position_embeddings": 256} if family == "phimoe" else {})


def write_json(path, data):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(data))
    return path


def test_v4_style_json(tmp_path):
    v4 = {"model_type": "phimoe", **TINY_KW["phimoe"], "rope_theta": 10000.0, "torch_dtype": "bfloat16",
          "transformers_version": "4.43.3", "original_max_position_embeddings": 256,
          "rope_scaling": {"type": "longrope", "short_factor": LONGROPE["short_factor"],
                           "long_factor": LONGROPE["long_factor"], "short_mscale": 1.1, "long_mscale": 1.2}}
    assert_same_values(AutoConfig.from_dict(v4), transformers.PhimoeConfig.from_dict(copy.deepcopy(v4)))
    v4["rope_scaling"]["original_max_position_embeddings"] = 512  # the rope dict's value wins, as in transformers
    assert AutoConfig.from_dict(v4).rope_parameters["original_max_position_embeddings"] == 512
    assert_same_values(AutoConfig.from_dict(v4), transformers.PhimoeConfig.from_dict(copy.deepcopy(v4)))
    del v4["rope_scaling"]["original_max_position_embeddings"]
    config = AutoConfig.from_pretrained(write_json(tmp_path / "a", v4))
    # the top-level original_max_position_embeddings is ignored when rope_scaling lacks it, as in transformers
    assert config.rope_parameters == dict(LONGROPE, original_max_position_embeddings=131072)
    assert config.original_max_position_embeddings == 256
    assert config.rope_theta == 10000.0
    assert config.dtype == "bfloat16" and config.torch_dtype is torch.bfloat16
    assert "transformers_version" not in config.to_dict()
    assert_same_values(config, transformers.AutoConfig.from_pretrained(tmp_path / "a"))

    dense = {"model_type": "ernie4_5", **TINY_KW["ernie4_5"], "rope_theta": 1234.0, "rope_scaling": None,
             "torch_dtype": "float16"}
    config = AutoConfig.from_pretrained(write_json(tmp_path / "b", dense))
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1234.0}
    assert config.torch_dtype is torch.float16

    dense["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}  # the later v4 spelling
    config = AutoConfig.from_pretrained(write_json(tmp_path / "c", dense))
    assert config.rope_parameters == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0}
    assert_same_values(config, transformers.AutoConfig.from_pretrained(tmp_path / "c"))


def test_v5_style_json(tmp_path):
    v5 = {"model_type": "phimoe", **TINY_KW["phimoe"], "rope_parameters": LONGROPE, "dtype": "float32"}
    config = AutoConfig.from_pretrained(write_json(tmp_path, v5))
    assert config.rope_parameters == LONGROPE and config.torch_dtype is torch.float32
    # original_max_position_embeddings is filled in for longrope when absent, as transformers does
    rope = {k: v for k, v in LONGROPE.items() if k != "original_max_position_embeddings"}
    config = PhimoeConfig(**TINY_KW["phimoe"], rope_parameters=rope, max_position_embeddings=512)
    assert config.rope_parameters["original_max_position_embeddings"] == 512


REAL_21B = {  # shaped like baidu/ERNIE-4.5-21B-A3B-PT's config.json
    "architectures": ["Ernie4_5_MoeForCausalLM"],
    "auto_map": {"AutoConfig": "configuration_ernie4_5_moe.Ernie4_5_MoeConfig",
                 "AutoModelForCausalLM": "modeling_ernie4_5_moe.Ernie4_5_MoeForCausalLM"},
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu", "hidden_size": 2560,
    "intermediate_size": 12288, "max_position_embeddings": 131072, "model_type": "ernie4_5_moe",
    "num_attention_heads": 20, "num_key_value_heads": 4, "num_hidden_layers": 28, "rms_norm_eps": 1e-05,
    "use_cache": False, "vocab_size": 103424, "rope_theta": 500000, "use_bias": False, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
    "moe_layer_end_index": 27, "moe_intermediate_size": 1536, "moe_capacity": [64, 64, 64], "moe_gate": "topk",
    "moe_k": 6, "moe_layer_interval": 1, "moe_use_aux_free": True, "num_nextn_predict_layers": 1,
    "multi_token_pred_lambda": 0.3, "use_flash_attention": True,
}


def test_hub_extra_fields_are_kept(tmp_path):
    config = AutoConfig.from_pretrained(write_json(tmp_path / "a", REAL_21B))
    assert type(config) is Ernie4_5_MoeConfig
    assert config.torch_dtype is torch.bfloat16 and config.rope_theta == 500000
    assert (config.moe_num_experts, config.moe_k, config.moe_layer_end_index) == (64, 6, 27)
    extras = ["auto_map", "moe_capacity", "moe_gate", "moe_use_aux_free", "num_nextn_predict_layers",
              "multi_token_pred_lambda", "use_flash_attention"]
    for key in extras:
        assert getattr(config, key) == REAL_21B[key], key
        assert config.extra[key] == REAL_21B[key]
    config.save_pretrained(tmp_path / "b")
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    for key in extras:
        assert written[key] == REAL_21B[key], key
    assert AutoConfig.from_pretrained(tmp_path / "b") == config
    assert_same_values(config, transformers.AutoConfig.from_pretrained(tmp_path / "a"))
    with pytest.raises(AttributeError, match="no_such_field"):
        config.no_such_field
    config.moe_gate = "top2"  # an extra set as an attribute is what gets written
    assert config.to_dict()["moe_gate"] == "top2"


def test_ernie_moe_optional_mtp_keys(tmp_path):
    """num_nextn_predict_layers and multi_token_pred_lambda (the -PT config.json keys of the MTP head) are known to
    Ernie4_5_MoeConfig without being written into every config.json: absent until set, then saved and read back."""
    config = named_config("ernie4_5_moe-tiny")
    for key in ("num_nextn_predict_layers", "multi_token_pred_lambda"):
        assert config.has_field(key) and key not in config.to_dict()
        assert getattr(config, key, None) is None
    assert not named_config("ernie4_5-tiny").has_field("num_nextn_predict_layers")  # the dense family has no head
    config.num_nextn_predict_layers, config.multi_token_pred_lambda = 2, 0.5
    assert config.extra == {"num_nextn_predict_layers": 2, "multi_token_pred_lambda": 0.5}
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["num_nextn_predict_layers"], written["multi_token_pred_lambda"]) == (2, 0.5)
    assert AutoConfig.from_pretrained(tmp_path) == config
    built = Ernie4_5_MoeConfig(**TINY_KW["ernie4_5_moe"], num_nextn_predict_layers=1)  # as a recipe's overrides
    assert built.num_nextn_predict_layers == 1
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_nextn_predict_layers"):
            Ernie4_5_MoeConfig(**TINY_KW["ernie4_5_moe"], num_nextn_predict_layers=bad)


def test_moe_layer_index_lists():
    config = Ernie4_5_MoeConfig(**TINY_KW["ernie4_5_moe"], moe_layer_start_index=[2, 1],
                                moe_layer_end_index=[1, 2])
    assert (config.moe_layer_start_index, config.moe_layer_end_index) == (1, 2)
    assert [config.is_moe_layer(i) for i in range(3)] == [False, True, True]
    config = Ernie4_5_MoeConfig(**dict(TINY_KW["ernie4_5_moe"], num_hidden_layers=6), moe_layer_start_index=1,
                                moe_layer_interval=2)
    assert [config.is_moe_layer(i) for i in range(6)] == [False, True, False, True, False, True]


def test_ernie_moe_aliases(tmp_path):
    kw = {k: v for k, v in TINY_KW["ernie4_5_moe"].items() if k not in ("moe_num_experts", "moe_k")}
    config = Ernie4_5_MoeConfig(**kw, num_experts=6, num_experts_per_tok=3)
    assert (config.moe_num_experts, config.moe_k, config.num_experts, config.num_experts_per_tok) == (6, 3, 6, 3)
    config.num_experts = 12  # writes through the alias
    assert config.moe_num_experts == 12 and config.num_experts == 12
    d = config.to_dict()
    assert d["moe_num_experts"] == 12 and "num_experts" not in d
    loaded = AutoConfig.from_pretrained(write_json(tmp_path, {"model_type": "ernie4_5_moe", **kw,
                                                              "num_experts": 4, "num_experts_per_tok": 1}))
    assert (loaded.moe_num_experts, loaded.moe_k) == (4, 1)
    assert PhimoeConfig(**TINY_KW["phimoe"]).num_experts == 4


@pytest.mark.parametrize("arch,family", [("Ernie4_5_ForCausalLM", "ernie4_5"), ("PhiMoEForCausalLM", "phimoe")])
def test_old_architecture_names(tmp_path, arch, family):
    ours_cls = FAMILIES[family][0]
    config = ours_cls(**TINY_KW[family])
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    del data["model_type"]
    data["architectures"] = [arch]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert type(AutoConfig.from_pretrained(tmp_path)) is ours_cls
    assert type(AutoConfig.from_dict(data)) is ours_cls
    assert type(ours_cls.from_pretrained(tmp_path)) is ours_cls
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


# ---------------------------------------------------------------- validation


BAD = [
    (Ernie4_5_MoeConfig, dict(moe_k=9, moe_num_experts=8), "moe_k"),
    (PhimoeConfig, dict(router_jitter_noise=None), "router_jitter_noise must be a number, got None"),
    (Ernie4_5_MoeConfig, dict(router_aux_loss_coef="0.1"), "router_aux_loss_coef must be a number, got '0.1'"),
    (Ernie4_5_MoeConfig, dict(moe_num_shared_experts=None), "moe_num_shared_experts must be an integer, got None"),
    (Ernie4_5Config, dict(num_attention_heads=6, num_key_value_heads=4), "num_key_value_heads"),
    (PhimoeConfig, dict(num_attention_heads=32, num_key_value_heads=3), "num_key_value_heads"),
    (Ernie4_5Config, dict(rope_parameters={"rope_type": "bogus"}), "rope type 'bogus'"),
    (Ernie4_5Config, dict(rope_scaling={"type": "bogus"}), "rope type 'bogus'"),
    (Ernie4_5Config, dict(rope_scaling={"type": "linear"}), "factor"),
    (Ernie4_5Config, dict(rope_parameters="x"), "rope_parameters must be a dict .*got str 'x'"),
    (PhimoeConfig, dict(rope_scaling=["longrope"]), "rope_scaling must be a dict"),
    (PhimoeConfig, dict(rope_scaling=dict(LONGROPE, short_factor=[1.0] * 3, long_factor=[1.0] * 64)),
     "short_factor.*64"),
    (PhimoeConfig, dict(rope_scaling=dict(LONGROPE, short_factor=[1.0] * 64, long_factor=[1.0] * 65)),
     "long_factor.*64"),
    (Ernie4_5Config, dict(hidden_size=0), "hidden_size"),
    (Ernie4_5Config, dict(num_hidden_layers=-1), "num_hidden_layers"),
    (Ernie4_5_MoeConfig, dict(num_hidden_layers=-1), "num_hidden_layers"),
    (Ernie4_5_MoeConfig, dict(num_attention_heads=0), "num_attention_heads"),
    (Ernie4_5Config, dict(num_attention_heads=0, head_dim=None), "num_attention_heads"),
    (Ernie4_5_MoeConfig, dict(hidden_size=None), "hidden_size"),
    (PhimoeConfig, dict(hidden_size="64"), "hidden_size"),
    (Ernie4_5Config, dict(vocab_size=0), "vocab_size"),
    (Ernie4_5Config, dict(intermediate_size=-3), "intermediate_size"),
    (Ernie4_5Config, dict(num_key_value_heads=0), "num_key_value_heads"),
    (Ernie4_5_MoeConfig, dict(moe_num_experts=0), "moe_num_experts"),
    (Ernie4_5_MoeConfig, dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (PhimoeConfig, dict(num_local_experts=0), "num_local_experts"),
    (PhimoeConfig, dict(max_position_embeddings=0), "max_position_embeddings"),
]


@pytest.mark.parametrize("cls,kwargs,field", BAD, ids=[f"{c.__name__}-{'-'.join(k)}" for c, k, _ in BAD])
def test_validation_errors(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)


def test_unknown_model_type_and_architecture(tmp_path):
    with pytest.raises(ValueError, match="model_type 'llama'"):
        AutoConfig.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        AutoConfig.from_dict({"architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="model_type"):
        AutoConfig.from_dict({})
    with pytest.raises(ValueError, match="bogus"):
        AutoConfig.for_model("bogus")
    with pytest.raises(ValueError, match="model_type 'phimoe'"):
        Ernie4_5Config.from_dict({"model_type": "phimoe"})
    with pytest.raises(ValueError, match="'llama'"):
        AutoConfig.from_pretrained(write_json(tmp_path, {"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ValueError, match="'llama'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "ernie4_5", "hidden_size": 64,')
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}.*not valid JSON"):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not valid JSON"):
        Ernie4_5Config.from_pretrained(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        AutoConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"config.json in {tmp_path}"):
        AutoConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        PhimoeConfig.from_pretrained(tmp_path / "nope")


# ---------------------------------------------------------------- named configs

# From /work/shared/reference/models.md: hidden, layers, heads, kv heads, head_dim, dense intermediate, experts,
# top-k, shared, expert intermediate, MoE layer range, vocab, rope theta, tied.
REAL = {
    "ernie-4.5-0.3b": (Ernie4_5Config, 1024, 18, 16, 2, 128, 3072, None, None, None, None, None, 103424, 5e5, True),
    "ernie-4.5-21b-a3b": (Ernie4_5_MoeConfig, 2560, 28, 20, 4, 128, 12288, 64, 6, 2, 1536, (1, 27), 103424, 5e5,
                          True),
    "ernie-4.5-300b-a47b": (Ernie4_5_MoeConfig, 8192, 54, 64, 8, 128, 28672, 64, 8, 0, 3584, (3, 53), 103424, 5e5,
                            True),
    "phi-3.5-moe": (PhimoeConfig, 4096, 32, 32, 8, 128, None, 16, 2, None, 6400, (0, 31), 32064, 1e4, False),
}


@pytest.mark.parametrize("name", REAL)
def test_named_real_configs(name):
    cls, hidden, layers, heads, kv, head_dim, inter, experts, k, shared, moe_inter, moe_range, vocab, theta, tied = \
        REAL[name]
    c = named_config(name)
    assert type(c) is cls
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == \
        (hidden, layers, heads, kv)
    assert c.head_size == head_dim and c.vocab_size == vocab and c.rope_theta == theta
    assert c.tie_word_embeddings is tied
    if cls is Ernie4_5_MoeConfig:
        assert (c.intermediate_size, c.moe_num_experts, c.moe_k, c.moe_num_shared_experts) == (inter, experts, k, shared)
        assert c.moe_intermediate_size == moe_inter
        assert (c.moe_layer_start_index, c.moe_layer_end_index, c.moe_layer_interval) == (*moe_range, 1)
        assert c.num_nextn_predict_layers == 1
    elif cls is PhimoeConfig:
        assert (c.num_local_experts, c.num_experts_per_tok, c.intermediate_size) == (experts, k, moe_inter)
        assert c.attention_bias and c.lm_head_bias and c.sliding_window == 131072
        assert c.router_jitter_noise == 0.01 and c.input_jitter_noise == 0.01
        rope = c.rope_parameters
        assert rope["rope_type"] == "longrope" and rope["original_max_position_embeddings"] == 4096
        assert len(rope["short_factor"]) == len(rope["long_factor"]) == 64
        assert rope["short_mscale"] == rope["long_mscale"] == pytest.approx(1.2432, abs=1e-4)
    else:
        assert c.intermediate_size == inter
    # a fresh copy each time
    c.hidden_size = 1
    assert named_config(name).hidden_size == hidden


# total parameters (and active parameters per token for MoE) from the model cards, in billions
SIZES = {"ernie-4.5-0.3b": (0.36, None), "ernie-4.5-21b-a3b": (21.8, 3.0),
         "ernie-4.5-300b-a47b": (300.0, 47.0), "phi-3.5-moe": (41.9, 6.6)}


@pytest.mark.parametrize("name", SIZES)
def test_named_config_parameter_counts(name):
    total, active = SIZES[name]
    config = named_config(name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # the -PT configs' MTP head (from_config adds it): a dense decoder layer, a [H, 2H] projection and two norms,
    # not counted in the models' names
    head = sum(p.numel() for k, p in model.named_parameters() if ".mtp_" in k)
    h = config.hidden_size
    assert head == (sum(p.numel() for p in model.model.layers[0].parameters()) + 2 * h * h + 2 * h
                    if getattr(config, "num_nextn_predict_layers", 0) else 0)
    n = model.num_parameters() - head
    assert n == pytest.approx(total * 1e9, rel=0.03)
    if config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    if active is not None:
        experts = sum(p.numel() for k, p in model.named_parameters() if ".experts." in k)
        per_token = n - experts * (1 - config.num_experts_per_tok / config.num_experts)
        # the A3B/A47B/6.6B names are rounded; 21B-A3B activates ~3.35B with its (tied) embeddings
        assert per_token == pytest.approx(active * 1e9, rel=0.12 if name == "ernie-4.5-21b-a3b" else 0.03)


@pytest.mark.parametrize("name", ["ernie4_5-tiny", "ernie4_5_moe-tiny", "phimoe-tiny"])
def test_named_tiny_configs_run(name):
    config = named_config(name)
    assert config.hidden_size <= 128 and config.num_hidden_layers <= 4
    model = AutoModelForCausalLM.from_config(config, seed=0).eval()
    ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 7, config.vocab_size) and torch.isfinite(logits).all()
    assert logits.std() > 0


def test_named_config_registry():
    assert {"ernie-4.5-0.3b", "ernie-4.5-21b-a3b", "ernie-4.5-300b-a47b", "phi-3.5-moe", "ernie4_5-tiny",
            "ernie4_5_moe-tiny", "phimoe-tiny"} <= set(NAMED_CONFIGS)
    assert moelm.named_config is named_config
    with pytest.raises(ValueError, match="no-such-model"):
        named_config("no-such-model")
