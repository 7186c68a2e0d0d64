import dataclasses
import json
import os
import subprocess
import sys

import pytest

from pdtui.core import config
from pdtui.core.config import ConfigError


def _flag(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("name", ["cpu", "one-gpu", "two-gpu", "1p2d"])
def test_every_shipped_profile_renders_a_consistent_pair(name, tmp_path):
    cfg = config.load_profile(name)
    specs = config.render(cfg, model_root=tmp_path)
    roles = [s.role for s in specs]
    assert roles[0] == "prefill" and "decode" in roles
    shared = ["serve", "--dtype", "--kv-cache-dtype", "--block-size", "--tensor-parallel-size", "--max-model-len"]
    for flag in shared[1:]:
        assert len({_flag(s.argv, flag) for s in specs}) == 1, flag
    assert len({s.argv[4] for s in specs}) == 1  # same model path
    ktc = [json.loads(_flag(s.argv, "--kv-transfer-config")) for s in specs]
    assert {k["kv_connector"] for k in ktc} == {"NixlConnector"}
    assert [k["kv_role"] for k in ktc] == ["kv_producer" if r == "prefill" else "kv_consumer" for r in roles]
    ports = [_flag(s.argv, "--port") for s in specs]
    side = [s.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for s in specs]
    assert len(set(ports)) == len(ports) and len(set(side)) == len(side)
    assert all(_flag(s.argv, "--host") == "127.0.0.1" for s in specs)


def test_cpu_profile_pins_cores_and_uses_the_cpu_buffer(tmp_path):
    cfg = config.load_profile("cpu")
    p, d = config.render(cfg, model_root=tmp_path)
    assert (p.env["VLLM_CPU_OMP_THREADS_BIND"], d.env["VLLM_CPU_OMP_THREADS_BIND"]) == ("0", "1")
    assert p.env["UCX_NET_DEVICES"] == "lo" and p.env["VLLM_HOST_IP"] == "127.0.0.1"
    assert json.loads(_flag(p.argv, "--kv-transfer-config"))["kv_buffer_device"] == "cpu"
    assert "--enforce-eager" in p.argv and _flag(p.argv, "--load-format") == "dummy"
    # eager means eager: no 16 s sampler compile at the first logprobs request (the warm-up's)
    assert p.env["TORCH_COMPILE_DISABLE"] == d.env["TORCH_COMPILE_DISABLE"] == "1"
    assert _flag(p.argv, "--kv-cache-memory-bytes") == _flag(d.argv, "--kv-cache-memory-bytes")
    assert (tmp_path / "tiny" / "config.json").exists()  # the synthetic model was made on first use
    ktc = json.loads(_flag(d.argv, "--kv-transfer-config"))
    assert ktc["kv_connector"] == "NixlConnector" and ktc["kv_connector_module_path"] == "pdtui.engine.nixl_quiet"
    assert d.env["PDTUI_NIXL_PROG_DELAY_US"] == "1000"
    # vLLM's NIXL worker moves the model thread to the last core; nixl_quiet keeps it on its own
    assert p.env["PDTUI_NIXL_KEEP_AFFINITY"] == d.env["PDTUI_NIXL_KEEP_AFFINITY"] == "1"


def test_one_gpu_profile_pins_the_pools():
    cfg = config.load_profile("one-gpu")
    assert {i.kv_cache_memory_bytes for i in cfg.instances} == {8 * 2**30}
    assert {i.gpu_memory_utilization for i in cfg.instances} == {0.4}
    assert {i.cuda_devices for i in cfg.instances} == {"0"}


def _pair(**overrides_d):
    return config.from_dict({
        "pair": {"model": "tiny", "block_size": 128},
        "instance": [
            {"role": "prefill", "port": 18100, "side_channel_port": 15600},
            {"role": "decode", "port": 18200, "side_channel_port": 15700, **overrides_d},
        ],
    })


@pytest.mark.parametrize("field,value", [("dtype", "float16"), ("block_size", 256), ("model", "qwen2.5-0.5b"),
                                         ("connector", "LMCacheConnectorV1"), ("tensor_parallel_size", 2)])
def test_a_mismatched_pair_is_refused_naming_the_field(field, value):
    cfg = _pair(**{field: value})
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        config.validate(cfg)


def test_port_clash_is_refused():
    cfg = _pair(side_channel_port=15600)
    with pytest.raises(ConfigError, match="port clash.*15600"):
        config.validate(cfg)


def test_extra_args_cannot_override_kv_shaped_flags():
    cfg = _pair(extra_args=["--dtype=float16"])
    with pytest.raises(ConfigError, match="use the field 'dtype'"):
        config.validate(cfg)


def test_cpu_block_size_must_be_a_multiple_of_32():
    cfg = _pair()
    cfg.block_size = 16
    with pytest.raises(ConfigError, match="multiple of 32"):
        config.validate(cfg)


def test_unknown_fields_and_roles_are_named():
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        config.from_dict({"pair": {"colour": "red"}})
    with pytest.raises(ConfigError, match="role must be"):
        config.from_dict({"instance": [{"role": "both", "port": 1, "side_channel_port": 2}]})
    with pytest.raises(ConfigError, match="no profile 'nope'"):
        config.load_profile("nope")


def test_precedence_flags_over_env_over_file():
    cfg = config.load_profile("cpu")
    assert cfg.proxy_port == 8000
    config.apply_overrides(cfg, config.env_overrides({"PDTUI_PROXY_PORT": "9100", "PDTUI_WARMUP": "false"}))
    assert cfg.proxy_port == 9100 and cfg.warmup is False
    config.apply_overrides(cfg, {"proxy_port": 9200, "model": None})
    assert cfg.proxy_port == 9200 and cfg.model == "tiny"
    with pytest.raises(ConfigError, match="expected an integer"):
        config.apply_overrides(cfg, {"proxy_port": "many"})


def test_shift_ports_moves_every_port_and_keeps_the_original():
    cfg = config.load_profile("cpu")
    moved = config.shift_ports(cfg, 1000)
    assert moved.proxy_port == 9000
    assert [i.port for i in moved.instances] == [9100, 9200]
    assert [i.side_channel_port for i in moved.instances] == [6600, 6700]
    assert [i.port for i in cfg.instances] == [8100, 8200]


def test_dict_settings_from_the_environment_add_to_the_profiles():
    cfg = config.load_profile("one-gpu")
    config.apply_overrides(cfg, config.env_overrides({"PDTUI_ENV": '{"UCX_TLS": "tcp", "UCX_LOG_LEVEL": "info"}'}))
    assert cfg.env["VLLM_USE_FLASHINFER_SAMPLER"] == "0"  # kept from the profile
    assert cfg.env["UCX_TLS"] == "tcp" and cfg.env["UCX_LOG_LEVEL"] == "info"  # set or replaced


def test_gpu_profiles_read_the_kv_over_cuda_ipc():
    for name in ("one-gpu", "two-gpu"):
        cfg = config.load_profile(name)
        p, d = config.render(cfg)
        for spec in (p, d):
            assert spec.env["PDTUI_UCX_ERROR_HANDLING_MODE"] == "none"
            assert "cuda_ipc" in spec.env["UCX_TLS"] and spec.env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
            assert json.loads(_flag(spec.argv, "--kv-transfer-config"))["kv_connector_module_path"] == "pdtui.engine.nixl_quiet"


@pytest.mark.parametrize("name", ["cpu", "one-gpu", "two-gpu"])
def test_render_single_is_the_prefill_instance_without_the_connector(name, tmp_path):
    cfg = config.load_profile(name)
    p = config.render(cfg, model_root=tmp_path)[0]
    s = config.render_single(cfg, model_root=tmp_path)
    assert s.role == "single" and s.url == p.url
    assert "--kv-transfer-config" not in s.argv and "--enable-chunked-prefill" in s.argv
    for flag in ("--dtype", "--kv-cache-dtype", "--block-size", "--max-model-len", "--port", "--tensor-parallel-size"):
        assert _flag(s.argv, flag) == _flag(p.argv, flag), flag
    assert s.argv[4] == p.argv[4] and ("--enforce-eager" in s.argv) == ("--enforce-eager" in p.argv)
    for key in ("VLLM_CPU_OMP_THREADS_BIND", "CUDA_VISIBLE_DEVICES"):
        assert s.env.get(key) == p.env.get(key)
    assert "PDTUI_NIXL_PROG_DELAY_US" not in s.env and "PDTUI_NIXL_KEEP_AFFINITY" not in s.env


def test_prefill_failure_is_a_pair_field_checked_by_validate():
    cfg = config.load_profile("cpu")
    assert cfg.prefill_failure == "retry"
    config.apply_overrides(cfg, config.env_overrides({"PDTUI_PREFILL_FAILURE": "decode-locally"}))
    assert cfg.prefill_failure == "decode-locally"
    config.validate(cfg)
    cfg.prefill_failure = "fallback"  # type: ignore[assignment]
    with pytest.raises(ConfigError, match="prefill_failure = 'fallback'"):
        config.validate(cfg)


# ----- typed fields: a wrong type is refused naming the field and where it was set -------------

CPU_PAIR = """
[pair]
model = "tiny"
device = "cpu"
block_size = 128
{pair}
[[instance]]
role = "prefill"
port = {port}
side_channel_port = 5600
[[instance]]
role = "decode"
port = 8200
side_channel_port = 5700
{decode}
"""


def _profile(tmp_path, pair="", port="8100", decode=""):
    path = tmp_path / "mine.toml"
    path.write_text(CPU_PAIR.format(pair=pair, port=port, decode=decode))
    return path


def test_every_field_of_the_config_has_a_checked_type():
    # every annotation resolves, and every default passes its own strict check
    for cls in (config.PairConfig, config.InstanceConfig):
        for f in dataclasses.fields(cls):
            if f.name in ("role", "port", "side_channel_port"):
                continue
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            value, err = config.typed(cls, f.name, default, strict=True, where="x")
            assert err is None and value == default, (cls.__name__, f.name, err)


def test_a_quoted_port_in_a_profile_is_refused_naming_the_field_and_the_file(tmp_path):
    path = _profile(tmp_path, port='"8100"')
    with pytest.raises(ConfigError) as e:
        config.load_profile(path)
    msg = str(e.value)
    assert "mine.toml [[instance]] #1 (prefill): port = \"8100\": expected an integer" in msg, msg
    assert "no quotes: port = 8100" in msg


def test_warmup_no_in_a_profile_is_refused_not_taken_as_true(tmp_path):
    with pytest.raises(ConfigError, match=r'mine.toml \[pair\]: warmup = "no": expected true or false'):
        config.load_profile(_profile(tmp_path, pair='warmup = "no"'))
    assert config.load_profile(_profile(tmp_path, pair="warmup = false")).warmup is False


def test_every_wrong_type_of_a_profile_is_named_at_once(tmp_path):
    path = _profile(tmp_path, pair='warmup = "no"\nenv = {A = 1}', port='"8100"',
                    decode='cpu_core = 1.5\nextra_args = ["--foo", 2]\nblock_size = "128"')
    with pytest.raises(ConfigError) as e:
        config.load_profile(path)
    msg = str(e.value)
    assert msg.startswith("6 problems in "), msg
    for part in ('warmup = "no"', "env['A'] = 1: expected a string", 'port = "8100"',
                 "(decode): cpu_core = 1.5: expected an integer", "extra_args[1] = 2: expected a string",
                 '(decode): block_size = "128": expected an integer'):
        assert part in msg, (part, msg)


def test_literal_fields_name_their_choices(tmp_path):
    path = _profile(tmp_path)
    path.write_text(path.read_text().replace('device = "cpu"', 'device = "gpu"'))
    with pytest.raises(ConfigError, match=r"device = \"gpu\": expected 'cpu' or 'cuda'"):
        config.load_profile(path)


def test_environment_values_are_parsed_and_refusals_name_the_variable():
    cfg = config.load_profile("cpu")
    config.apply_overrides(cfg, config.env_overrides({"PDTUI_WARMUP": "no", "PDTUI_READY_TIMEOUT_S": "90"}),
                           source=lambda n: f"PDTUI_{n.upper()}")
    assert cfg.warmup is False and cfg.ready_timeout_s == 90.0
    for env, words in (({"PDTUI_PROXY_PORT": "80x"}, 'PDTUI_PROXY_PORT = "80x" (field proxy_port): expected an integer'),
                       ({"PDTUI_WARMUP": "maybe"}, 'PDTUI_WARMUP = "maybe" (field warmup): expected true or false'),
                       ({"PDTUI_ENV": '{"A": 1}'}, "PDTUI_ENV['A'] = 1 (field env): expected a string"),
                       ({"PDTUI_EXTRA_ARGS": "--x"}, "PDTUI_EXTRA_ARGS = '--x': expected JSON")):
        with pytest.raises(ConfigError) as e:
            config.apply_overrides(config.load_profile("cpu"), config.env_overrides(env),
                                   source=lambda n: f"PDTUI_{n.upper()}")
        assert words in str(e.value), (words, str(e.value))


def test_a_flag_refusal_names_the_flag():
    with pytest.raises(ConfigError, match=r"--prefill-failure = \"sometimes\" \(field prefill_failure\): expected"):
        config.apply_overrides(config.load_profile("cpu"), {"prefill_failure": "sometimes"},
                               source=lambda n: "--" + n.replace("_", "-"))


def test_pdtui_config_refuses_a_quoted_port_with_exit_2_and_no_traceback(tmp_path):
    path = _profile(tmp_path, port='"8100"')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PDTUI_")}
    out = subprocess.run([sys.executable, "-m", "pdtui", "config", "--profile", str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert 'mine.toml [[instance]] #1 (prefill): port = "8100": expected an integer' in out.stderr
    assert "Traceback" not in out.stderr
