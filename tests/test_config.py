"""Config layering: flags > env > file > defaults, and one clear error per bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshd.config import DEFAULT_API_PORT, ConfigError, ListenAddress, build_config, load_config, parse_model_arg


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meshd.toml"
    path.write_text(text)
    return path


def test_defaults():
    config = build_config()
    assert config.api.listen == ListenAddress("127.0.0.1", DEFAULT_API_PORT)
    assert config.default_model and config.models == ()
    assert config.log_level == "info"


def test_precedence_flags_over_env_over_file(tmp_path):
    cfg = write(tmp_path, 'log_level = "debug"\n[api]\nlisten = "127.0.0.1:1001"\n[serving]\nmax_queue = 3\n')
    config = load_config(cfg, {}, {})
    assert config.api.listen.port == 1001 and config.serving.max_queue == 3 and config.log_level == "debug"
    config = load_config(cfg, {"MESHD_API_LISTEN": "127.0.0.1:1002"}, {})
    assert config.api.listen.port == 1002 and config.serving.max_queue == 3
    config = load_config(cfg, {"MESHD_API_LISTEN": "127.0.0.1:1002"}, {"api.listen": "0.0.0.0:1003"})
    assert config.api.listen == ListenAddress("0.0.0.0", 1003)
    assert config.serving.max_queue == 3  # untouched layers keep their value


def test_file_with_top_level_keys_after_tables_is_rejected_by_name(tmp_path):
    # In TOML, keys after [serving] belong to it: a classic mistake we name exactly.
    cfg = write(tmp_path, '[serving]\nmax_queue = 3\nlog_level = "debug"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg, {}, {})
    assert info.value.key == "serving.log_level"


def test_models_from_file_env_and_flags(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    cfg = write(tmp_path, f'[[models]]\npath = "{gguf}"\nalias = "t"\nn_ctx = 512\n')
    config = load_config(cfg, {}, {})
    assert config.models[0].id == "tiny" and config.models[0].aliases == ("t",) and config.models[0].n_ctx == 512
    config = load_config(cfg, {"MESHD_MODEL": f"other={gguf}"}, {})
    assert config.models[0].aliases == ("other",)
    config = load_config(cfg, {}, {"models": [parse_model_arg("--model", str(gguf))]})
    assert config.models[0].aliases == ()


def test_duplicate_model_names_rejected(tmp_path):
    gguf = tmp_path / "a.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="used twice"):
        build_config({"models": [{"path": str(gguf)}, {"path": str(gguf)}]})


def test_model_arg_parsing():
    assert parse_model_arg("m", "/x/y.gguf") == {"path": "/x/y.gguf"}
    assert parse_model_arg("m", "fast=/x/y.gguf") == {"path": "/x/y.gguf", "aliases": ["fast"]}
    assert parse_model_arg("m", "/x/a=b.gguf") == {"path": "/x/a=b.gguf"}


@pytest.mark.parametrize(
    "layer, key",
    [
        ({"api.listen": "nope"}, "api.listen"),
        ({"api.listen": "1.2.3.4:70000"}, "api.listen"),
        ({"serving.max_queue": -1}, "serving.max_queue"),
        ({"serving.max_queue": True}, "serving.max_queue"),
        ({"log_level": "loud"}, "log_level"),
        ({"no_default_model": "maybe"}, "no_default_model"),
        ({"api.mystery": 1}, "api.mystery"),
        ({"models": [{"path": "/nope.gguf"}]}, "models[0].path"),
        ({"models": [{"id": "x"}]}, "models[0].path"),
    ],
)
def test_bad_values_name_their_key(layer, key):
    with pytest.raises(ConfigError) as info:
        build_config(layer)
    assert info.value.key == key


def test_env_booleans():
    assert not build_config({"no_default_model": "1"}).default_model
    assert build_config({"no_default_model": "0"}).default_model


def test_kvcache_section(tmp_path):
    from meshd.config import KvCacheConfig, load_config

    assert build_config().kvcache == KvCacheConfig() and not KvCacheConfig().enabled
    path = tmp_path / "meshd.toml"
    path.write_text('[kvcache]\nenabled = true\nmax_bytes = 2097152\nwire_format = "q8_0"\n')
    config = load_config(path, {"MESHD_KVCACHE_DRAIN_ON_SIGTERM": "1"}, {})
    assert config.kvcache == KvCacheConfig(enabled=True, max_bytes=2097152, wire_format="q8_0",
                                           drain_on_sigterm=True)
    for layer, key in [({"kvcache.wire_format": "f16"}, "kvcache.wire_format"),
                       ({"kvcache.max_bytes": 10}, "kvcache.max_bytes"),
                       ({"kvcache.nope": 1}, "kvcache.nope")]:
        with pytest.raises(ConfigError) as info:
            build_config(layer)
        assert info.value.key == key
